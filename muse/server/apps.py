"""The Muse app endpoints under /api, and the web app at / — thin layers over `muse.apps`.

    conversations  /api/conversations …        (muse.apps.assistant.Assistant)
    personas       /api/personas, memories /api/memories, feedback /api/feedback
    documents      /api/kb/documents, /api/kb/search, /api/kb/ask   (muse.apps.kb, muse.apps.uploads)
    writing desk   /api/write, /api/write/versions …                (muse.apps.writer, muse.apps.diff)
    creative       /api/create; analysis /api/classify, /api/sentiment, /api/extract (muse.apps.entities)

Requests are pydantic models with their ranges; every error has the OpenAI routes' JSON shape
(`muse.server.errors`): 400 a bad value (named in `error.param`), 404 an unknown conversation,
document, persona, memory or version, 413 a text over the server's limit, 429 a full queue.

Generation: the apps run in a worker thread and see a `ServedModel`, whose `stream` queues the
prompt on the server's `Scheduler` — so generation runs only on the scheduler's thread, batched
with the OpenAI routes' requests (Chinese verse too: its form is a grammar constraint). Label scoring
(classify, sentiment) is a forward pass, not a stream: `ServedModel.score_ids` hands it to the
scheduler thread too (`Scheduler.call`), between two steps, so only that thread ever runs the model.
A client that goes away (or the web app's stop button, which aborts its fetch) stops the work at
once: its scheduler rows are freed at the next step, and a reply being streamed is kept as far as
it got (the assistant marks it "stopped").

Streaming endpoints (`"stream": true`, the default where there is one) answer with server-sent
events, one JSON object per `data:` line, each with a "type":

    start {context} | citations {citations, found}      what the answer will be built on
    delta {text}                                         the next piece of text
    done  {…}                                            the result (what stream=false returns)
    error {error: {message, type, param, code}}          a failure after the stream began
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import threading
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from muse.api import Model
from muse.apps.language import supports_chinese
from muse.apps.entities import FIELDS_TOKENS
from muse.errors import MuseError
from muse.fileio import remove_stale_temps, safe_join
from muse.generation import SamplingParams
from muse.sampling import RANGES
from muse.text import language
from muse.server.errors import APIError, too_busy
from muse.server.schemas import ErrorResponse
from muse.server.streaming import EventStreamResponse, check_chars, client_gone, sse, stream_error, usage

STATIC = Path(__file__).parent / "static"
WORKERS = 32  # app requests working at once (more wait for a thread); the scheduler batches their generation
MAX_LABELS = 50

_ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "A bad value (named in error.param), or a text the model cannot take (too long, wrong language)."),
    (401, "A missing or wrong API key."),
    (404, "No such conversation, persona, memory, document, version or model."),
    (413, "A request body or text over the server's limits."),
    (429, "Too many requests are waiting; retry later."),
)}
_SSE = {200: {"content": {"text/event-stream": {}},
              "description": "Server-sent events (see the module docs), or JSON with stream=false"}}

router = APIRouter(responses=_ERRORS)


# -- generation from worker threads --------------------------------------------------

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_END = object()


def _workers() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="muse-app")
        return _pool


class Stopped(BaseException):
    """Raised inside a worker when its client went away or stopped it (a BaseException, like
    GeneratorExit, so that no app code mistakes it for a failure it should handle)."""


class Admission:
    """Counts app jobs running or waiting for a worker thread; beyond `limit`, 429 (not an endless queue)."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0
        self._lock = threading.Lock()

    def enter(self) -> Callable[[], None]:
        """Take a place (or raise a 429); returns the function that gives it back (idempotent)."""
        with self._lock:
            if self.active >= self.limit:
                raise too_busy(f"{self.active} app requests are running or waiting; retry in a moment.")
            self.active += 1
        left = threading.Event()

        def leave() -> None:
            with self._lock:
                if not left.is_set():
                    left.set()
                    self.active -= 1
        return leave


def _admission(request: Request) -> Admission:
    state = request.app.state
    with _state_lock:
        if getattr(state, "app_admission", None) is None:
            state.app_admission = Admission(WORKERS + state.service.limits.max_queued)
        return state.app_admission


class Work:
    """One request's work: app code run in a worker thread, its generations on the scheduler.

    `stop()` (the client left or pressed stop) cancels the scheduler streams at once and makes
    the worker raise `Stopped` where it waits for its next token. At most `WORKERS` jobs run and
    `Limits.max_queued` wait for a thread; more are answered 429 with Retry-After.
    """

    def __init__(self, request: Request):
        self.request = request
        self.service = request.app.state.service
        self.loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._stopped = False
        self._pending: concurrent.futures.Future | None = None
        self._streams: set = set()

    def model(self, name: str | None = None, text: str = "", chinese: bool = False) -> "ServedModel":
        """The served model `name`. With no name, a request in Chinese (`text` is, or the output is
        to be: `chinese`) goes to a served model that reads Chinese when the default does not, as the
        web app routes it from /api/info."""
        if name is None and (chinese or text):
            name = _for_chinese(self.service, chinese or language(text) == "zh")
        return ServedModel(self.service.model(name), self.service.scheduler(name), self)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._pending is not None:
                self._pending.cancel()  # wakes the worker waiting for a token
            streams, self._streams = list(self._streams), set()
        for s in streams:
            s.cancel()  # the scheduler frees its row at the next step

    def follow(self, stream) -> Iterator:
        """A scheduler `Stream` (submitted with our loop) read from the worker thread."""
        chunks = stream.__aiter__()
        try:
            while True:
                with self._lock:
                    if self._stopped:
                        raise Stopped()
                    self._streams.add(stream)
                    self._pending = asyncio.run_coroutine_threadsafe(anext(chunks), self.loop)
                try:
                    chunk = self._pending.result()
                except StopAsyncIteration:
                    return
                except concurrent.futures.CancelledError:
                    raise Stopped() from None
                yield chunk
        finally:
            stream.cancel()
            with self._lock:
                self._streams.discard(stream)

    async def call(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) in a worker thread; stopped if the client goes away first."""
        leave = _admission(self.request).enter()
        future = self.loop.run_in_executor(_workers(), functools.partial(fn, *args, **kwargs))
        future.add_done_callback(lambda f: leave() or f.cancelled() or f.exception())  # never "not retrieved"
        gone = asyncio.ensure_future(client_gone(self.request))
        done, _ = await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            gone.cancel()
            return future.result()
        self.stop()
        raise APIError(499, "The client closed the request.", None, "client_closed")

    async def respond(self, events: Iterator[dict], stream: bool) -> Response:
        """Server-sent events of `events` (a generator run in a worker), or its "done" event as JSON."""
        if stream:
            leave = _admission(self.request).enter()
            return EventStreamResponse(self._sse(events, leave), on_close=lambda: (self.stop(), leave()))
        last = await self.call(_last, events)
        return JSONResponse({k: v for k, v in last.items() if k != "type"})

    async def _sse(self, events: Iterator[dict], leave: Callable[[], None]):
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item) -> None:
            try:
                self.loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening
                self.stop()

        def produce() -> None:
            try:
                for event in events:
                    if self._stopped:
                        events.close()
                        break
                    emit(event)
            except Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 — sent to the client as an error event
                emit(e)
            finally:
                leave()
                emit(_END)

        try:
            self.loop.run_in_executor(_workers(), produce)
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    item = {"type": "error", **stream_error(item)}
                yield sse(item)
        finally:
            self.stop()


def _for_chinese(service, chinese: bool) -> str | None:
    """The served model for a request without a model name: the default, unless the request is in
    Chinese, the default reads English only and another served model reads Chinese."""
    if not chinese or supports_chinese(service.model()):
        return None
    return next((name for name, m in service.models.items() if supports_chinese(m)), None)


def _last(events: Iterator[dict]) -> dict:
    last = {}
    for last in events:
        pass
    return last


class ServedModel(Model):
    """The served model as the apps see it: generation goes through the server's scheduler
    (`Work.follow`), everything else (tokenizer, chat template, config) is the model's own."""

    def __init__(self, model: Model, scheduler, work: Work):
        super().__init__(model.model, model.tokenizer, model.info)
        self.scheduler, self.work = scheduler, work

    def stream(self, prompt, params: SamplingParams | None = None, **kwargs):
        return self.work.follow(self.scheduler.submit(prompt, self.params(params, **kwargs), loop=self.work.loop))

    def generate(self, prompt, params: SamplingParams | None = None, **kwargs) -> str:
        return "".join(c.text for c in self.stream(prompt, params, **kwargs))

    def score_ids(self, prefix: list[int], continuations: list[list[int]]) -> list[list[float]]:
        from muse.generation import score

        return self.scheduler.call(score, self.model, prefix, continuations).result()


# -- shared state and request pieces -------------------------------------------------------

@dataclasses.dataclass
class _State:
    store: object  # muse.store.Store
    kb: object  # muse.apps.kb.KnowledgeBase
    uploads: Path


_state_lock = threading.Lock()


def _state(request: Request) -> _State:
    """The app's database and knowledge base, opened on first use (MUSE_HOME is read then).

    The knowledge base uses embeddings when the server has an embedding model (create_app's
    `embedder`), keyword search alone when it was turned off.
    """
    app_state = request.app.state
    with _state_lock:
        if getattr(app_state, "muse_apps", None) is None:
            from muse.apps.kb import KnowledgeBase
            from muse.store import Store

            store = Store()
            kb = KnowledgeBase(store, embeddings="auto" if app_state.service.embedder else "none")
            app_state.muse_apps = _State(store, kb, store.path.parent / "uploads")
            remove_stale_temps(app_state.muse_apps.uploads)  # uploads a killed server was writing
        return app_state.muse_apps


def _assistant(request: Request, model: Model | None = None):
    from muse.apps.assistant import Assistant

    return Assistant(model, _state(request).store)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class Sampling(_Body):
    """Generation options; those left out keep the app's defaults."""

    model: Optional[str] = Field(None, description="A model id from GET /v1/models (default: the first served).")
    max_tokens: Optional[int] = Field(None, **RANGES["max_new_tokens"].bounds(), description="Most tokens to generate.")
    temperature: Optional[float] = Field(None, **RANGES["temperature"].bounds(), description="0 = greedy.")
    top_p: Optional[float] = Field(None, **RANGES["top_p"].bounds())
    top_k: Optional[int] = Field(None, **RANGES["top_k"].bounds())
    repetition_penalty: Optional[float] = Field(None, **RANGES["repetition_penalty"].bounds())
    seed: Optional[int] = Field(None, **RANGES["seed"].bounds())

    def params(self, base: SamplingParams | None = None) -> SamplingParams | None:
        """The options given, over `base` (None and nothing given: None, the app's own default)."""
        given = {k: v for k, v in dict(max_new_tokens=self.max_tokens, temperature=self.temperature,
                                       top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                                       seed=self.seed).items() if v is not None}
        if not given:
            return base
        return (base or SamplingParams()).replace(**given)


def _check_chars(request: Request, chars: int, param: str) -> None:
    check_chars(request.app.state.service.limits, chars, param)


class _NotFound:
    """`with _NotFound("conversation"):` — a lookup's MuseError becomes a 404 naming `param`."""

    def __init__(self, param: str):
        self.param = param

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is not None and issubclass(kind, MuseError) and not isinstance(e, APIError):
            raise APIError(404, str(e), self.param, "not_found") from None
        return False


# -- the server ---------------------------------------------------------------------------

@router.get("/api/info", tags=["Server"], summary="The models served (the first is the default) and the features on")
def info(request: Request):
    from muse.apps.language import supports_chinese
    from muse.checkpoints.registry import BUNDLED

    service = request.app.state.service
    return {"models": list(service.models), "default": service.default,
            "embeddings": service.embedder.name if service.embedder else None,
            # what each model reads and writes: the web app says so before it sends Chinese to an English-only one
            "languages": {name: ["zh", "en"] if supports_chinese(m) else ["en"] for name, m in service.models.items()},
            "bilingual": next(m.name for m in BUNDLED.values() if "zh" in m.languages)}  # the one to install


# -- conversations ----------------------------------------------------------------------

class NewConversation(_Body):
    title: str = Field("", max_length=200, description="Empty: named after the first message.")
    persona: Optional[str] = Field(None, min_length=1, description="A persona's name (its system prompt).")


class Rename(_Body):
    title: str = Field(min_length=1, max_length=200)


class SetPersona(_Body):
    persona: Optional[str] = Field(None, min_length=1, description="A persona's name; null for none.")


class NewMessage(Sampling):
    content: str = Field(min_length=1, description="The user's message.")
    stream: bool = Field(True, description="Server-sent events (true) or one JSON answer.")


class ImportBody(_Body):
    text: str = Field(min_length=1, description="A conversation as exported (JSON or Markdown).")


@router.get("/api/conversations", tags=["Conversations"], summary="List conversations, most recent first")
def list_conversations(request: Request, limit: int = Query(50, ge=1, le=1000)):
    return {"data": _assistant(request).list_conversations(limit)}


@router.post("/api/conversations", tags=["Conversations"], status_code=201, summary="Start a conversation")
def new_conversation(body: NewConversation, request: Request):
    assistant = _assistant(request, request.app.state.service.model())
    with _NotFound("persona"):
        cid = assistant.new_conversation(body.title, body.persona)
    return assistant.get_conversation(cid)


@router.get("/api/conversations/search", tags=["Conversations"], summary="Find conversations by words they contain")
def search_conversations(request: Request, q: str = Query(min_length=1, max_length=500),
                               limit: int = Query(20, ge=1, le=200)):
    return {"data": _assistant(request).search(q, limit)}


@router.post("/api/conversations/import", tags=["Conversations"], status_code=201,
             summary="Import a conversation (JSON or Markdown as exported)")
def import_conversation(body: ImportBody, request: Request):
    _check_chars(request, len(body.text), "text")
    assistant = _assistant(request)
    return assistant.get_conversation(assistant.import_conversation(body.text))


@router.get("/api/conversations/{cid}", tags=["Conversations"], summary="A conversation with its messages")
def get_conversation(cid: str, request: Request):
    with _NotFound("conversation"):
        return _assistant(request).get_conversation(cid)


@router.post("/api/conversations/{cid}/rename", tags=["Conversations"], summary="Rename a conversation")
def rename_conversation(cid: str, body: Rename, request: Request):
    assistant = _assistant(request)
    with _NotFound("conversation"):
        cid = assistant.resolve(cid)
    assistant.rename(cid, body.title)
    return {"id": cid, "title": assistant.get_conversation(cid)["title"]}


@router.post("/api/conversations/{cid}/persona", tags=["Conversations"], summary="Change a conversation's persona")
def set_persona(cid: str, body: SetPersona, request: Request):
    assistant = _assistant(request)
    with _NotFound("conversation"):
        cid = assistant.resolve(cid)
    with _NotFound("persona"):
        assistant.set_persona(cid, body.persona)
    return {"id": cid, "persona": body.persona}


@router.delete("/api/conversations/{cid}", tags=["Conversations"], summary="Delete a conversation")
def delete_conversation(cid: str, request: Request):
    assistant = _assistant(request)
    with _NotFound("conversation"):
        cid = assistant.resolve(cid)
    assistant.delete(cid)
    return {"id": cid, "deleted": True}


@router.get("/api/conversations/{cid}/export", tags=["Conversations"], summary="Export a conversation",
            responses={200: {"content": {"application/json": {}, "text/markdown": {}}}})
def export_conversation(cid: str, request: Request, format: Literal["json", "markdown"] = "json"):
    with _NotFound("conversation"):
        assistant = _assistant(request)
        cid = assistant.resolve(cid)
    text = assistant.export_conversation(cid, format)
    kind, ext = ("application/json", "json") if format == "json" else ("text/markdown", "md")
    return Response(text, media_type=f"{kind}; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="conversation-{cid}.{ext}"'})


@router.post("/api/conversations/{cid}/messages", tags=["Conversations"], responses=_SSE,
             summary="Send a message; the reply streams back (both are saved)")
async def send_message(cid: str, body: NewMessage, request: Request):
    _check_chars(request, len(body.content), "content")
    work = Work(request)
    assistant = _assistant(request, work.model(body.model, body.content))
    with _NotFound("conversation"):
        cid = assistant.resolve(cid)
    reply = await work.call(assistant.stream_reply, cid, body.content, body.params())
    return await work.respond(_reply_events(cid, reply), body.stream)


def _reply_events(cid: str, reply) -> Iterator[dict]:
    c = reply.context
    yield {"type": "start", "conversation": cid,
           "context": {"notice": c.notice, "prompt_tokens": c.prompt_tokens, "summarized": c.summarized,
                       "dropped": c.dropped, "memories": c.memories}}
    last = None
    try:
        for last in reply:
            if last.text:
                yield {"type": "delta", "text": last.text}
    finally:
        reply.close()  # stored as it stands, if stopped
    yield {"type": "done", "conversation": cid, "message_id": reply.message_id, "content": reply.text,
           "finish_reason": last.finish_reason if last else "stop", "usage": usage(last)}


# -- personas, memories, feedback ---------------------------------------------------------

class NewPersona(_Body):
    name: str = Field(min_length=1, max_length=64, description="One word, e.g. tutor or 翻译.")
    system_prompt: str = Field(min_length=1, max_length=20000)


class NewMemory(_Body):
    fact: str = Field(min_length=1, max_length=2000)
    conversation: Optional[str] = Field(None, description="Where it was said (a conversation id).")


class NewFeedback(_Body):
    rating: Literal[1, -1] = Field(description="+1 good, -1 bad.")
    comment: Optional[str] = Field(None, max_length=4000)
    correction: Optional[str] = Field(None, max_length=32000, description="The answer wanted instead "
                                      "(rating -1 only): fine-tuning data and an eval item's reference.")
    conversation: Optional[str] = Field(None, description="Rate an answer in this conversation …")
    message_id: Optional[int] = Field(None, ge=1, description="… this one (default: the last answer).")
    response: Optional[str] = Field(None, min_length=1, description="Or rate an answer given elsewhere …")
    prompt: Optional[list[dict]] = Field(None, min_length=1, description="… to these {role, content} messages.")


@router.get("/api/personas", tags=["Personas"], summary="List personas")
def list_personas(request: Request):
    return {"data": _assistant(request).list_personas()}


@router.post("/api/personas", tags=["Personas"], status_code=201, summary="Add (or replace) a persona")
def add_persona(body: NewPersona, request: Request):
    return _assistant(request).add_persona(body.name, body.system_prompt)


@router.delete("/api/personas/{name}", tags=["Personas"], summary="Delete a persona")
def delete_persona(name: str, request: Request):
    with _NotFound("persona"):
        _assistant(request).delete_persona(name)
    return {"name": name, "deleted": True}


@router.get("/api/memories", tags=["Memories"], summary="List remembered facts")
def list_memories(request: Request):
    return {"data": _assistant(request).memories()}


@router.post("/api/memories", tags=["Memories"], status_code=201, summary="Remember a fact for later conversations")
def remember(body: NewMemory, request: Request):
    with _NotFound("conversation"):
        mid = _assistant(request).remember(body.fact, body.conversation)
    return {"id": mid, "content": " ".join(body.fact.split())}


@router.delete("/api/memories/{memory_id}", tags=["Memories"], summary="Forget a fact")
def forget(memory_id: int, request: Request):
    with _NotFound("memory_id"):
        _assistant(request).forget(memory_id)
    return {"id": memory_id, "deleted": True}


@router.post("/api/feedback", tags=["Feedback"], status_code=201, summary="Rate an answer 👍 / 👎 with a comment")
def add_feedback(body: NewFeedback, request: Request):
    if body.conversation is not None:
        assistant = _assistant(request)
        with _NotFound("conversation"):
            conv = assistant.get_conversation(body.conversation)
        n = None
        if body.message_id is not None:
            from muse.apps.feedback import message_number

            with _NotFound("message_id"):
                n = message_number(conv, body.message_id)
        fid = assistant.rate(conv["id"], body.rating, body.comment, n, body.correction)
    elif body.response is not None and body.prompt is not None:
        from muse.apps.feedback import add_feedback as add

        fid = add(_state(request).store, body.rating, body.response, body.prompt, body.comment,
                  correction=body.correction)
    else:
        raise APIError(400, "Say what is rated: conversation (and message_id), or response and prompt.",
                       "conversation", "invalid_parameter")
    return {"id": fid, "rating": body.rating}


@router.get("/api/feedback", tags=["Feedback"], summary="List ratings, oldest first")
def list_feedback(request: Request):
    from muse.apps.feedback import list_feedback as listed

    return {"data": listed(_state(request).store)}


# -- knowledge base -----------------------------------------------------------------------

class NewText(_Body):
    name: str = Field(min_length=1, max_length=200, description="The document's title.")
    text: str = Field(min_length=1)


class Question(Sampling):
    question: str = Field(min_length=1)
    k: int = Field(4, ge=1, le=20, description="Passages to retrieve.")
    stream: bool = True


@router.get("/api/kb/documents", tags=["Knowledge base"], summary="List documents")
def list_documents(request: Request):
    return {"data": _state(request).kb.list()}


@router.post("/api/kb/documents", tags=["Knowledge base"], status_code=201,
             summary="Upload files (txt, md, html, pdf, docx) into the knowledge base")
async def upload_documents(request: Request, files: list[UploadFile] = File(description="One or more files.")):
    from muse.apps.extract import Extractor
    from muse.apps.uploads import UploadError, add_uploads, upload_name

    state = _state(request)
    extractor = Extractor()
    try:
        uploads = [(upload_name(f.filename), await f.read()) for f in files]  # a bad name: before any body is read
        return {"data": await Work(request).call(add_uploads, state.kb, state.uploads, uploads, extractor)}
    except UploadError as e:
        raise APIError(400, str(e), "files", _UPLOAD_CODES.get(e.code, e.code)) from None
    finally:
        extractor.cancel()  # a client that left (499) stops the extraction at once; after the work, a no-op


_UPLOAD_CODES = {"invalid_name": "invalid_parameter"}  # the library's reasons → the API's error codes


@router.post("/api/kb/text", tags=["Knowledge base"], status_code=201, summary="Add pasted text as a document")
async def add_text(body: NewText, request: Request):
    _check_chars(request, len(body.text), "text")
    return await Work(request).call(_state(request).kb.add_text, body.name, body.text)


@router.delete("/api/kb/documents/{doc_id}", tags=["Knowledge base"], summary="Remove a document")
def remove_document(doc_id: int, request: Request):
    state = _state(request)
    with _NotFound("doc_id"):
        removed = state.kb.remove(doc_id)
    path = Path(removed["path"])
    if path.parent == state.uploads.resolve():  # an uploaded copy: it goes too
        path.unlink(missing_ok=True)
    return {**removed, "deleted": True}


@router.get("/api/kb/search", tags=["Knowledge base"], summary="Passages that match a query")
async def search_documents(request: Request, q: str = Query(min_length=1, max_length=2000),
                           k: int = Query(5, ge=1, le=50)):
    hits = await Work(request).call(_state(request).kb.search, q, k)
    return {"data": [dataclasses.asdict(h) for h in hits]}


@router.post("/api/kb/ask", tags=["Knowledge base"], responses=_SSE,
             summary="Answer a question from the documents, with numbered citations")
async def ask(body: Question, request: Request):
    from muse.apps.kb import DEFAULT_PARAMS, stream_ask

    _check_chars(request, len(body.question), "question")
    work = Work(request)
    answer = await work.call(stream_ask, work.model(body.model, body.question), _state(request).kb, body.question,
                             body.params(DEFAULT_PARAMS), body.k)
    return await work.respond(_ask_events(answer), body.stream)


def _ask_events(answer) -> Iterator[dict]:
    yield {"type": "citations", "found": answer.found, "citations": [dataclasses.asdict(c) for c in answer.citations]}
    for chunk in answer:
        if chunk.text:
            yield {"type": "delta", "text": chunk.text}
    a = answer.answer
    yield {"type": "done", "text": a.text, "found": a.found, "quoted": a.quoted,
           "citations": [dataclasses.asdict(c) for c in a.citations]}


# -- writing desk ---------------------------------------------------------------------------

DESK = "desk:"  # version keys of the web desk's documents (the CLI keys files by their path)


class WriteBody(Sampling):
    action: str = Field(description="continue, rewrite, polish, expand, shorten, outline, titles, summarize, "
                                    "translate (GET /api/write/actions).")
    text: str = Field(min_length=1)
    tone: Optional[str] = Field(None, description="rewrite / expand only, e.g. formal.")
    to: Optional[str] = Field(None, description="translate only: a language code such as zh, en, fr.")
    length: Optional[int] = Field(None, ge=1, le=100000, description="summarize only: words (English) / "
                                                                    "characters (Chinese).")
    document: str = Field("draft", min_length=1, max_length=200,
                          description="The desk document whose versions keep the text and the result.")
    check: bool = Field(True, description="Check the output (repetition, preambles, invented facts, length, "
                                          "shape), retry, and refuse to save one that still fails; false: "
                                          "one attempt, saved as it is.")
    stream: bool = True


@router.get("/api/write/actions", tags=["Writing desk"], summary="Writing actions, tones and target languages")
def write_actions():
    from muse.apps import writer

    return {"actions": [{"name": a.name, "help": a.help, "tone": a.tone} for a in writer.ACTIONS.values()],
            "tones": {name: {"en": en, "zh": zh} for name, (en, zh) in writer.TONES.items()},
            "languages": {code: {"en": en, "zh": zh} for code, (en, zh) in writer.LANGUAGES.items()}}


@router.post("/api/write", tags=["Writing desk"], responses=_SSE,
             summary="Run a writing action; the text and the result are saved as versions")
async def write(body: WriteBody, request: Request):
    """The output is checked (`muse.apps.writer.stream_checked`) and retried before it is saved.
    Events: "delta" (the first attempt, as it is generated: a draft), "retry" {attempt, problems}
    when it failed its checks, then "done" whose `output` replaces the draft — or, when every
    attempt failed, an "error" event (JSON: a 400) naming the problems, and no version is saved."""
    from muse.apps.writer import ATTEMPTS, default_params, into_chinese, stream_checked

    _check_chars(request, len(body.text), "text")
    work = Work(request)
    model = work.model(body.model, body.text, chinese=into_chinese(body.to))
    params = body.params(default_params(model, body.action, body.to))
    items = await work.call(stream_checked, model, body.action, body.text, tone=body.tone,
                            to=body.to, length=body.length, params=params, attempts=ATTEMPTS if body.check else 1)
    return await work.respond(_write_events(_state(request).store, body, items), body.stream)


def _write_events(store, body: WriteBody, items) -> Iterator[dict]:
    from muse.apps.diff import word_diff
    from muse.apps.writer import Checked, CheckFailedError, Retry, keep_version, save_result

    key = DESK + body.document
    keep_version(store, key, body.text)  # first: the text is kept even if the action is stopped or fails
    name = f"the desk document {body.document!r}"
    result = None
    for item in items:
        if isinstance(item, Retry):
            yield {"type": "retry", "attempt": item.attempt, "problems": [dataclasses.asdict(p) for p in item.problems]}
        elif isinstance(item, Checked):
            result = item
        elif item.text:
            yield {"type": "delta", "text": item.text}
    if body.check and not result.ok and result.output.strip():  # an empty one: save_result refuses it
        raise CheckFailedError(result, name, "Try again, e.g. with another seed or temperature.")
    seq, text = save_result(store, key, body.action, body.text, result.output, name)
    last = result.last
    yield {"type": "done", "document": body.document, "version": seq, "output": result.output, "text": text,
           "finish_reason": last.finish_reason if last else "stop", "attempts": result.attempts,
           "diff": word_diff(body.text, text)}


@router.get("/api/write/versions", tags=["Writing desk"], summary="A desk document's versions, oldest first")
def list_versions(request: Request, document: str = Query("draft", min_length=1, max_length=200)):
    from muse.apps.writer import history

    return {"document": document, "data": history(_state(request).store, DESK + document)}


@router.get("/api/write/versions/{seq}", tags=["Writing desk"], summary="One version's text")
def get_version(seq: int, request: Request, document: str = Query("draft", min_length=1, max_length=200)):
    from muse.apps.writer import get_version as get

    with _NotFound("seq"):
        return {"document": document, "seq": seq, "content": get(_state(request).store, DESK + document, seq)}


@router.get("/api/write/versions/{seq}/diff", tags=["Writing desk"],
            summary="What changed from the previous version to this one")
def diff_version(seq: int, request: Request, document: str = Query("draft", min_length=1, max_length=200)):
    from muse.apps.writer import version_diff

    with _NotFound("seq"):
        return {"document": document, "seq": seq, **version_diff(_state(request).store, DESK + document, seq)}


@router.post("/api/write/versions/{seq}/restore", tags=["Writing desk"],
             summary="Bring a version back as the newest one (itself undoable)")
def restore_version(seq: int, request: Request, document: str = Query("draft", min_length=1, max_length=200)):
    from muse.apps.writer import history, restore

    store = _state(request).store
    with _NotFound("seq"):
        content = restore(store, DESK + document, seq)
    return {"document": document, "seq": history(store, DESK + document)[-1]["seq"], "restored": seq,
            "content": content}


# -- creative writing and analysis -----------------------------------------------------------

class CreateBody(Sampling):
    """Sampling options given go over the creative app's own defaults (varied sampling, a presence
    penalty, a length per kind: `muse.apps.creative.default_params`), as on the CLI."""

    kind: Literal["poem", "story", "slogan", "product"]
    topic: str = Field(min_length=1, max_length=2000)
    form: Optional[Literal["wujue", "qijue", "wulv", "qilv", "haiku", "free"]] = Field(
        None, description="poem only: a classical Chinese form, haiku, or free verse.")
    attempts: int = Field(4, ge=1, le=8, description="Tries until the text conforms to its form.")


class ClassifyBody(_Body):
    model: Optional[str] = None
    text: str = Field(min_length=1)
    labels: list[str] = Field(min_length=2, max_length=MAX_LABELS)
    calibrate: Optional[bool] = Field(None, description="Contextual calibration (likelihood only); default: the "
                                                         "method's own choice.")
    method: Literal["auto", "likelihood", "constrained", "embedding"] = Field(
        "auto", description="auto: the method measured best for the model and language; likelihood: score each "
                            "label; constrained: the model answers, held to the labels; embedding: the label "
                            "nearest the text in the multilingual embedding model.")


class SentimentBody(_Body):
    model: Optional[str] = None
    text: str = Field(min_length=1)
    method: Literal["auto", "likelihood", "constrained", "embedding", "probe"] = Field(
        "auto", description="auto: the sentiment probe mixed into the model's likelihood (English) or the "
                            "embedding method (Chinese), as measured best; likelihood, constrained, embedding as for /api/classify; probe: the classifier "
                            "over the text's embedding alone, trained on reviews bundled with Muse.")


@router.post("/api/create", tags=["Creative"], summary="Write a poem, story, slogan or product copy, form-checked")
async def create(body: CreateBody, request: Request):
    from muse.apps.creative import FORMS, create as make, default_params

    work = Work(request)
    # Every form is generated on the scheduler (Chinese verse under a grammar constraint).
    model = work.model(body.model, body.topic, chinese=body.form in FORMS and FORMS[body.form].chinese)
    c = await work.call(make, model, body.kind, body.topic, body.form, body.params(default_params(body.kind)),
                        body.attempts)
    return {"text": c.text, "form": c.form, "ok": c.ok, "problems": list(c.problems), "tries": c.tries}


@router.post("/api/classify", tags=["Analysis"], summary="Probabilities of labels for a text")
async def classify(body: ClassifyBody, request: Request):
    from muse.apps.analysis import classify as scores, top_label

    _check_chars(request, len(body.text), "text")
    work = Work(request)
    model = work.model(body.model, body.text + " " + " ".join(body.labels))
    probs = await work.call(scores, model, body.text, body.labels, body.calibrate, method=body.method)
    return {"label": top_label(probs, body.method), "scores": probs}


@router.post("/api/sentiment", tags=["Analysis"], summary="Positive, negative or neutral")
async def sentiment(body: SentimentBody, request: Request):
    from muse.apps.analysis import sentiment as judge

    _check_chars(request, len(body.text), "text")
    work = Work(request)
    return await work.call(judge, work.model(body.model, body.text), body.text, method=body.method)


class ExtractBody(_Body):
    model: Optional[str] = None
    text: str = Field(min_length=1)
    types: Optional[list[str]] = Field(None, max_length=MAX_LABELS,
                                       description="Entity types added to the five defaults (or, with only, instead).")
    only: bool = False
    json_schema: Optional[dict] = Field(None, alias="schema", description="Extract these fields instead of entities.")
    max_tokens: int = Field(FIELDS_TOKENS, ge=1, le=4096, description="Most tokens for a schema answer.")


@router.post("/api/extract", tags=["Analysis"], summary="Named entities with offsets, or fields of a JSON schema")
async def extract(body: ExtractBody, request: Request):
    from muse.apps.entities import check_types, extract_entities, extract_fields

    _check_chars(request, len(body.text), "text")
    types = check_types(body.types) if body.only else check_types(None, body.types)
    work = Work(request)
    model = work.model(body.model, body.text)  # generation goes through the scheduler, constrained
    if body.json_schema is not None:
        fields = await work.call(extract_fields, model, body.text, body.json_schema, max_new_tokens=body.max_tokens)
        return {"fields": fields, "model": model.name}
    return (await work.call(extract_entities, model, body.text, types)).to_dict()


# -- the web app ------------------------------------------------------------------------------

@router.get("/", include_in_schema=False)
async def index(request: Request):
    """The web app's page, with this launch's token for its API calls (see security.py)."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    page = page.replace("__MUSE_LAUNCH_TOKEN__", request.app.state.launch_token)
    return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})


@router.get("/static/{path:path}", include_in_schema=False)
async def static(path: str):
    try:
        file = safe_join(STATIC, path)
    except MuseError:
        file = None
    if file is None or not file.is_file():
        raise APIError(404, f"No such file: /static/{path}", None, "not_found")
    return FileResponse(file, headers={"Cache-Control": "no-cache"})
