"""The personal assistant: kept conversations, personas, remembered facts and a stated context policy.

    from muse.apps.assistant import Assistant
    a = Assistant(muse.load())
    a.add_persona("tutor", "You are a patient tutor. Answer with one short example.")
    cid = a.new_conversation(persona="tutor")
    for chunk in a.stream_reply(cid, "What is recursion?"):
        print(chunk.text, end="")
    a.remember("I write Python at work.")

Everything lives in the one database (`muse.store.Store`, `MUSE_HOME/muse.db`):

- **Messages.** The user's message is committed before generation starts. The reply is committed once it
  is complete; if the caller stops the stream (closes it, Ctrl-C, a dropped HTTP client) the text so far
  is committed instead, with meta `finish_reason: "stopped"`. A reply is never lost and never half-written.
- **The prompt** is one system message (the conversation's system prompt — set with `set_system`, else its
  persona's — then the remembered facts relevant to the new message, then the summary of earlier turns),
  the turns not covered by the summary, and the new message. It must leave `max_new_tokens` free in the
  model's window (`model.config.block_size`).
- **Context policy**, when the prompt does not fit (`Assistant(model, policy=...)`):
  `"summarize"` (default): the oldest turns — at least half of them, whole exchanges — are summarized by the
  model into `conversations.summary`, which stands in for them from then on (`summarized_through` is the
  last message it covers). `"drop"`: the oldest turns are left out of this prompt. Either way the stored
  messages stay (search, export) and `ReplyStream.context.notice` says what happened. If the prompt still
  does not fit, the summary and then the facts are left out too. A message that does not fit on its own
  (with the system prompt) raises `MessageTooLongError` (a `ContextLengthError`) and nothing is stored.
- **Memory**: facts the user asked to remember. The few most relevant to the new message (BM25 over English
  words and Chinese characters and character pairs) go into the system prompt under
  "Facts the user asked you to remember".
- **Search**: an FTS5 trigram index (migration `m004_message_search`) finds substrings in every message,
  Chinese included; terms shorter than 3 characters are matched by a scan.
- **Export / import** as JSON or Markdown (`muse.conversation/1`); export → import → export is identical.

`Assistant(None)` manages conversations, personas and memories without a model (the CLI's list/show/export).
It is safe to share between threads: `Store` serialises database access.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from muse.apps.feedback import add_feedback
from muse.text import language, pack, terms
from muse.errors import ContextLengthError, MuseError
from muse.safety import SafetyBlocked, guard, guard_stream
from muse.sampling import SamplingParams
from muse.store import Store, now

if TYPE_CHECKING:  # muse.generation imports torch, which listing conversations does not need
    from muse.generation import GenerationChunk

POLICIES = ("summarize", "drop")
ROLES = ("system", "user", "assistant", "tool")
MEMORY_K = 3  # remembered facts brought into one prompt, at most
SUMMARY_TOKENS = 200  # longest summary of earlier turns (less on small windows: block_size // 8)
TITLE_CHARS = 60
EXPORT_FORMAT = "muse.conversation/1"

FACTS_HEADER = {"en": "Facts the user asked you to remember:", "zh": "用户让你记住的事实："}
SUMMARY_HEADER = {"en": "Summary of the earlier conversation:", "zh": "之前对话的摘要："}
SUMMARY_TASK = {
    "en": "Summarize the conversation below in a few sentences, for your own later reference. Keep names, facts, "
          "numbers, decisions and open questions. Reply with the summary only.",
    "zh": "请用几句话总结下面的对话，供你之后参考。保留人名、事实、数字、决定和未解决的问题。只回复摘要。",
}
TRANSCRIPT_HEADER = {"en": "Conversation:", "zh": "对话："}
SPEAKERS = {"en": {"user": "User", "assistant": "Assistant", "tool": "Tool"},
            "zh": {"user": "用户", "assistant": "助手", "tool": "工具"}}


class ConversationNotFound(MuseError):
    """A conversation id (or prefix) that matches no conversation, or several."""


class MessageTooLongError(ContextLengthError):
    """A message that does not fit the context window even with no history."""

    def __init__(self, prompt_tokens: int, limit: int, max_new_tokens: int):
        self.prompt_tokens, self.limit, self.max_new_tokens = prompt_tokens, limit, max_new_tokens
        MuseError.__init__(
            self, f"This message needs a {prompt_tokens}-token prompt on its own, but the model's context window "
                  f"is {limit} tokens and {max_new_tokens} of them are kept for the reply (max_new_tokens). "
                  "Shorten the message (or split it over several), lower max_new_tokens, or use a model with a "
                  "longer context.")


@dataclass
class ContextInfo:
    """How the prompt for one reply was built."""

    policy: str
    window: int  # tokens the prompt may use: block_size - max_new_tokens
    prompt_tokens: int = 0
    summarized: int = 0  # earlier messages newly folded into the conversation's summary
    dropped: int = 0  # earlier messages left out of this prompt
    memories: list[int] = field(default_factory=list)  # ids of the remembered facts included
    left_out: list[str] = field(default_factory=list)  # "the summary", "remembered facts" when even they did not fit

    @property
    def notice(self) -> str | None:
        """One sentence for the user when the conversation outgrew the window, else None."""
        done = []
        if self.summarized:
            done.append(f"summarized the {self.summarized} oldest messages")
        if self.dropped:
            done.append(f"left out the {self.dropped} oldest messages")
        done += [f"left out {what}" for what in self.left_out]
        if not done:
            return None
        return (f"The conversation outgrew the model's context window ({self.window} tokens for the prompt): "
                f"{', '.join(done)} (policy: {self.policy}). All messages stay saved.")


class ReplyStream:
    """A reply being generated: iterate it for `GenerationChunk`s.

    `context` says how the prompt was built. After the last chunk, `message_id` is the stored reply's id and
    `text` its text. `close()` (or dropping the stream mid-way) stops generation; the text so far is stored,
    marked stopped.
    """

    def __init__(self, context: ContextInfo, run: Callable[["ReplyStream"], Iterator[GenerationChunk]]):
        self.context = context
        self.message_id: int | None = None
        self.text = ""
        self._gen = run(self)

    def __iter__(self) -> "ReplyStream":
        return self

    def __next__(self) -> GenerationChunk:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


class Assistant:
    """Conversations with `model`, kept in `store` (default: the database under MUSE_HOME).

    policy: what happens when a conversation outgrows the context window — "summarize" or "drop"
    (see the module docstring). memory_k: most remembered facts per prompt.
    """

    def __init__(self, model, store: Store | None = None, policy: str = "summarize", memory_k: int = MEMORY_K):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not isinstance(memory_k, int) or memory_k < 0:
            raise ValueError(f"memory_k must be an integer ≥ 0, got {memory_k!r}")
        self.model = model
        self.store = store if store is not None else Store()
        self.policy = policy
        self.memory_k = memory_k

    def _need_model(self):
        if self.model is None:
            raise MuseError("This Assistant has no model; create it with Assistant(muse.load()).")
        return self.model

    # -- conversations ------------------------------------------------------------------

    def new_conversation(self, title: str = "", persona: str | None = None) -> str:
        """Start a conversation (optionally with a persona's system prompt); returns its short id."""
        persona_id = self.get_persona(persona)["id"] if persona else None
        title = _clean_title(title) if title else ""
        with self.store.transaction():
            cid = secrets.token_hex(4)
            while self.store.one("SELECT 1 FROM conversations WHERE id = ?", (cid,)):
                cid = secrets.token_hex(4)
            self.store.execute("INSERT INTO conversations (id, title, persona_id, model) VALUES (?, ?, ?, ?)",
                               (cid, title, persona_id, self.model.name if self.model is not None else None))
        return cid

    def resolve(self, cid: str) -> str:
        """The full id of a conversation given its id or a unique prefix of it."""
        cid = (cid or "").strip() if isinstance(cid, str) else ""
        if not cid:
            raise ConversationNotFound("Give a conversation id; `muse conversations list` shows them.")
        if self.store.one("SELECT 1 FROM conversations WHERE id = ?", (cid,)):
            return cid
        rows = self.store.all("SELECT id FROM conversations WHERE id LIKE ? ESCAPE '\\' LIMIT 2",
                              (_like_escape(cid) + "%",))
        if len(rows) == 1:
            return rows[0]["id"]
        if rows:
            raise ConversationNotFound(f"{cid!r} matches several conversations; give more of the id.")
        raise ConversationNotFound(f"No conversation {cid!r}; `muse conversations list` shows the ids.")

    def list_conversations(self, limit: int = 50) -> list[dict]:
        """Most recently active first: id, title, persona, model, messages (count), created_at, updated_at."""
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer ≥ 1, got {limit!r}")
        return self.store.all(
            "SELECT c.id, c.title, p.name AS persona, c.model, c.created_at, c.updated_at, "
            "(SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS messages "
            "FROM conversations c LEFT JOIN personas p ON p.id = c.persona_id "
            "ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ?", (limit,))

    def last_conversation(self) -> str | None:
        """The id of the most recently active conversation, or None when there is none."""
        rows = self.list_conversations(limit=1)
        return rows[0]["id"] if rows else None

    def get_conversation(self, cid: str) -> dict:
        """id, title, persona, model, summary, summarized_through, created_at, updated_at and "messages":
        [{n (1-based position), id, role, content, meta (dict or None), created_at}]."""
        cid = self.resolve(cid)
        conv = self.store.one(
            "SELECT c.id, c.title, p.name AS persona, p.system_prompt AS persona_prompt, c.model, c.summary, "
            "c.summarized_through, c.created_at, c.updated_at "
            "FROM conversations c LEFT JOIN personas p ON p.id = c.persona_id WHERE c.id = ?", (cid,))
        rows = self.store.all("SELECT id, role, content, meta, created_at FROM messages "
                              "WHERE conversation_id = ? ORDER BY id", (cid,))
        conv["messages"] = [dict(r, n=i, meta=json.loads(r["meta"]) if r["meta"] else None)
                            for i, r in enumerate(rows, 1)]
        return conv

    def rename(self, cid: str, title: str) -> None:
        cid = self.resolve(cid)
        with self.store.transaction():
            self.store.execute("UPDATE conversations SET title = ? WHERE id = ?", (_clean_title(title), cid))

    def delete(self, cid: str) -> None:
        """Delete a conversation and its messages (feedback given on them is kept)."""
        cid = self.resolve(cid)
        with self.store.transaction():
            self.store.execute("DELETE FROM conversations WHERE id = ?", (cid,))

    def set_system(self, cid: str, text: str | None) -> None:
        """Set the conversation's own system prompt (replacing its persona's); None or "" goes back to the persona's."""
        cid = self.resolve(cid)
        with self.store.transaction():
            self.store.execute("DELETE FROM messages WHERE conversation_id = ? AND role = 'system'", (cid,))
            if text and text.strip():
                self._add_message(cid, "system", text.strip())

    def set_persona(self, cid: str, persona: str | None) -> None:
        """Give the conversation a persona (None: no persona)."""
        cid = self.resolve(cid)
        persona_id = self.get_persona(persona)["id"] if persona else None
        with self.store.transaction():
            self.store.execute("UPDATE conversations SET persona_id = ? WHERE id = ?", (persona_id, cid))

    def _add_message(self, cid: str, role: str, content: str, meta: dict | None = None) -> int:
        with self.store.transaction():
            cur = self.store.execute("INSERT INTO messages (conversation_id, role, content, meta) VALUES (?, ?, ?, ?)",
                                     (cid, role, content, json.dumps(meta, ensure_ascii=False) if meta else None))
            self.store.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now(), cid))
            if role == "user":  # the first message names an untitled conversation
                self.store.execute("UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                                   (_auto_title(content), cid))
        return cur.lastrowid

    # -- search -------------------------------------------------------------------------

    def search(self, query: str, limit: int = 20) -> list[dict]:
        """Conversations whose title or one message contains every whitespace-separated term of `query`
        (case-insensitive substrings, Chinese included), most recently active first:
        [{id, title, updated_at, matches (messages that matched), message_id, snippet}]."""
        terms = query.split() if isinstance(query, str) else []
        if not terms:
            raise ValueError("search query must not be empty")
        if "\x00" in query:  # SQLite cuts strings at NUL: the index would see a broken query
            raise ValueError("search query must not contain a NUL character (\\x00); type the words to find")
        hits: dict[str, dict] = {}
        for row in self._matching_messages(terms):
            hit = hits.setdefault(row["conversation_id"], {"matches": 0, "message_id": row["id"],
                                                           "snippet": _snippet(row["content"], terms)})
            hit["matches"] += 1
        convs = self.store.all("SELECT id, title, updated_at FROM conversations ORDER BY updated_at DESC, rowid DESC")
        out = []
        for c in convs:
            titled = all(t.lower() in c["title"].lower() for t in terms)
            if c["id"] in hits or titled:
                out.append(dict(c, **hits.get(c["id"], {"matches": 0, "message_id": None, "snippet": c["title"]})))
        return out[:limit]

    def _matching_messages(self, terms: list[str]) -> list[dict]:
        # Terms of 3+ characters go through the trigram index; shorter ones (e.g. a two-character
        # Chinese word) cannot, so they filter the index's candidates (or every message) with instr().
        long = [t for t in terms if len(t) >= 3]
        where, args = [], []
        if long:
            where.append("id IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?)")
            args.append(" AND ".join('"' + t.replace('"', '""') + '"' for t in long))
        for t in terms:
            if len(t) < 3:
                where.append("instr(lower(content), lower(?)) > 0")
                args.append(t)
        return self.store.all(f"SELECT id, conversation_id, content FROM messages WHERE {' AND '.join(where)} "
                              "ORDER BY id DESC", tuple(args))

    # -- replies ------------------------------------------------------------------------

    def stream_reply(self, cid: str, text: str, params: SamplingParams | None = None) -> ReplyStream:
        """Store the user's message `text`, build the prompt (applying the context policy), and return the
        reply as a stream of `GenerationChunk`s; the reply is stored when the stream ends or is closed.

        Errors (unknown conversation, empty text, MessageTooLongError) are raised here, before anything is
        stored; summarizing older turns (policy "summarize") also happens here.
        """
        model = self._need_model()
        params = params if params is not None else model.params()  # the model's recommended sampling
        if not isinstance(text, str) or not text.strip():
            raise ValueError("message must be non-empty text")
        cid = self.resolve(cid)
        guard(text, "input", source="chat")  # the safety switch: a no-op unless safety is on
        context = ContextInfo(self.policy, window=self._window(params))
        alone = _prompt(self._base_system(cid), [], None, [{"role": "user", "content": text}], "en")
        if (n := self._count(alone)) > context.window:
            raise MessageTooLongError(n, model.config.block_size, params.max_new_tokens)
        self._add_message(cid, "user", text)
        messages = self._context(cid, text, context)
        return ReplyStream(context, lambda stream: self._generate(cid, messages, params, stream))

    def reply(self, cid: str, text: str, params: SamplingParams | None = None) -> str:
        """The whole reply to `text` (stored, like `stream_reply`)."""
        return "".join(c.text for c in self.stream_reply(cid, text, params))

    def _generate(self, cid: str, messages: list[dict], params: SamplingParams,
                  stream: ReplyStream) -> Iterator[GenerationChunk]:
        parts, last, done = [], None, False
        try:
            for chunk in guard_stream(self.model.stream_chat(messages, params), source="chat"):
                parts.append(chunk.text)
                last = chunk
                yield chunk
            done = True
        except SafetyBlocked as e:
            parts = [str(e)]  # what is kept instead of the blocked reply
            raise
        finally:  # also on close() (GeneratorExit) and Ctrl-C: keep what was generated
            stream.text = "".join(parts)
            if done or stream.text:
                meta = {"model": self.model.name, "finish_reason": last.finish_reason if done and last else "stopped"}
                if last is not None:
                    meta.update(prompt_tokens=last.prompt_tokens, generation_tokens=last.generation_tokens)
                stream.message_id = self._add_message(cid, "assistant", stream.text, meta)

    # -- the prompt and the context policy ----------------------------------------------

    def _window(self, params: SamplingParams) -> int:
        block = self.model.config.block_size
        if block - params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={params.max_new_tokens} leaves no room for the conversation in "
                             f"{self.model.name}'s {block}-token context window; lower it (e.g. to {block // 4}).")
        return block - params.max_new_tokens

    def _count(self, messages: list[dict]) -> int:
        prompt = self.model.chat_prompt(messages)
        return len(self.model.tokenizer.encode(prompt, add_special_tokens=False))

    def _base_system(self, cid: str) -> str | None:
        """The conversation's own system prompt (its latest system message), else its persona's."""
        row = self.store.one("SELECT content FROM messages WHERE conversation_id = ? AND role = 'system' "
                             "ORDER BY id DESC LIMIT 1", (cid,))
        if row is None:
            row = self.store.one("SELECT p.system_prompt AS content FROM conversations c "
                                 "JOIN personas p ON p.id = c.persona_id WHERE c.id = ?", (cid,))
        return row["content"] if row else None

    def _turns(self, cid: str) -> list[dict]:
        """The non-system messages the summary does not cover, oldest first (the new message last)."""
        return self.store.all(
            "SELECT m.id, m.role, m.content FROM messages m JOIN conversations c ON c.id = m.conversation_id "
            "WHERE m.conversation_id = ? AND m.role != 'system' AND m.id > coalesce(c.summarized_through, 0) "
            "ORDER BY m.id", (cid,))

    def _context(self, cid: str, text: str, context: ContextInfo) -> list[dict]:
        """The messages for the prompt, applying the context policy (see the module docstring)."""
        lang = language(text)
        base = self._base_system(cid)
        facts = self.relevant_memories(text)
        summary = self.store.one("SELECT summary FROM conversations WHERE id = ?", (cid,))["summary"]
        turns = self._turns(cid)
        k = self._first_kept(lambda k: _prompt(base, facts, summary, turns[k:], lang), turns, context.window)
        if k and self.policy == "summarize":
            k = _exchange_start(turns, max(k, (len(turns) - 1) // 2))  # summarize at least half: not every turn
            new_summary = self._summarize(summary, turns[:k], lang)
            if new_summary:
                with self.store.transaction():
                    self.store.execute("UPDATE conversations SET summary = ?, summarized_through = ? WHERE id = ?",
                                       (new_summary, turns[k - 1]["id"], cid))
                summary, turns, context.summarized = new_summary, turns[k:], k
        # Shed what is left in order: old turns, then the summary, then the remembered facts.
        for summ, fs in ((summary, facts), (None, facts), (None, [])):
            k = self._first_kept(lambda k: _prompt(base, fs, summ, turns[k:], lang), turns, context.window)
            if k is not None:
                break
        if k is None:  # only when the facts/summary changed since the check in stream_reply
            raise MessageTooLongError(self._count(_prompt(base, [], None, turns[-1:], lang)),
                                      self.model.config.block_size, self.model.config.block_size - context.window)
        context.dropped = k
        context.left_out = ((["the summary"] if summary and not summ else [])
                            + (["remembered facts"] if facts and not fs else []))
        context.memories = [f["id"] for f in fs]
        messages = _prompt(base, fs, summ, turns[k:], lang)
        context.prompt_tokens = self._count(messages)
        return messages

    def _first_kept(self, build: Callable[[int], list[dict]], turns: list[dict], window: int) -> int | None:
        """The smallest k such that the prompt with turns[k:] fits `window` (k starting an exchange), or None."""
        n = len(turns) - 1  # turns[-1] is the new message: always kept
        fits = lambda k: self._count(build(k)) <= window  # noqa: E731
        if not fits(n):
            return None
        lo, hi = 0, n
        while lo < hi:  # fewer turns → shorter prompt, so the first k that fits is found by bisection
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
        return _exchange_start(turns, lo)

    def _summarize(self, summary: str | None, turns: list[dict], lang: str) -> str:
        """Fold `turns` into `summary` with the model, one window-sized piece of transcript at a time."""
        model = self.model
        block = model.config.block_size
        params = SamplingParams(max_new_tokens=max(16, min(SUMMARY_TOKENS, block // 8)), temperature=0.0)
        transcript = "\n\n".join(f"{SPEAKERS[lang].get(t['role'], t['role'])}: {t['content']}" for t in turns)

        def count(s: str) -> int:
            return len(model.tokenizer.encode(s, add_special_tokens=False))

        # room for one piece: the window less the reply, the running summary (≤ the reply's size) and the task
        overhead = self._count(_summary_messages(None, "", lang)) + 16
        budget = max(16, block - 2 * params.max_new_tokens - overhead)
        for piece in pack(transcript, budget, count):
            try:
                summary = model.chat(_summary_messages(summary, piece.strip(), lang), params).strip() or summary
            except ContextLengthError:  # a window too small to summarize in: the caller drops turns instead
                break
        return summary or ""

    # -- memory -------------------------------------------------------------------------

    def remember(self, fact: str, cid: str | None = None) -> int:
        """Keep a fact for later conversations (cid: where it was said); returns its id."""
        if not isinstance(fact, str) or not fact.strip():
            raise ValueError("the fact to remember must be non-empty text, e.g. /remember I live in Lyon")
        cid = self.resolve(cid) if cid else None
        with self.store.transaction():
            cur = self.store.execute("INSERT INTO memories (content, conversation_id) VALUES (?, ?)",
                                     (" ".join(fact.split()), cid))
        return cur.lastrowid

    def memories(self) -> list[dict]:
        """Every remembered fact, oldest first: id, content, conversation_id, created_at."""
        return self.store.all("SELECT id, content, conversation_id, created_at FROM memories ORDER BY id")

    def forget(self, memory_id: int) -> None:
        if isinstance(memory_id, bool) or not isinstance(memory_id, int):
            raise ValueError(f"memory_id must be an integer (see `muse memory list`), got {memory_id!r}")
        with self.store.transaction():
            cur = self.store.execute("DELETE FROM memories WHERE id = ?", (memory_id,))
        if cur.rowcount == 0:
            raise MuseError(f"No remembered fact #{memory_id}; `muse memory list` shows their numbers.")

    def relevant_memories(self, text: str, k: int | None = None) -> list[dict]:
        """The remembered facts most relevant to `text` (BM25 score > 0), best first, at most k (memory_k)."""
        k = self.memory_k if k is None else k
        facts = self.memories()
        query = terms(text)[0]
        if not facts or not query or k == 0:
            return []
        scores = _bm25([terms(f["content"])[0] for f in facts], query)
        ranked = sorted(((s, i) for i, s in enumerate(scores) if s > 0), key=lambda si: (-si[0], -si[1]))
        return [dict(facts[i], score=float(s)) for s, i in ranked[:k]]

    # -- personas -----------------------------------------------------------------------

    def add_persona(self, name: str, system_prompt: str) -> dict:
        """Add a persona, or replace the system prompt of the one with that name; returns it."""
        name = name.strip() if isinstance(name, str) else ""
        if not name or len(name.split()) != 1:
            raise ValueError(f"persona name must be one word, e.g. tutor or 翻译, got {name!r}")
        if not isinstance(system_prompt, str) or not system_prompt.strip():
            raise ValueError("the persona's system prompt must be non-empty text, e.g. 'You are a patient tutor.'")
        with self.store.transaction():
            self.store.execute("INSERT INTO personas (name, system_prompt) VALUES (?, ?) "
                               "ON CONFLICT (name) DO UPDATE SET system_prompt = excluded.system_prompt",
                               (name, system_prompt.strip()))
        return self.get_persona(name)

    def list_personas(self) -> list[dict]:
        """Every persona by name: id, name, system_prompt, created_at."""
        return self.store.all("SELECT id, name, system_prompt, created_at FROM personas ORDER BY name")

    def delete_persona(self, name: str) -> None:
        """Delete a persona; its conversations keep their messages and lose the persona's system prompt."""
        persona = self.get_persona(name)
        with self.store.transaction():
            self.store.execute("DELETE FROM personas WHERE id = ?", (persona["id"],))

    def get_persona(self, name: str) -> dict:
        """The persona called `name`: id, name, system_prompt, created_at (MuseError if there is none)."""
        row = self.store.one("SELECT id, name, system_prompt, created_at FROM personas WHERE name = ?",
                             ((name or "").strip(),))
        if row is None:
            raise MuseError(f"No persona {name!r}. Add it with `muse persona add {name or 'NAME'} \"You are …\"`; "
                            "`muse persona list` shows the others.")
        return row

    # -- feedback -----------------------------------------------------------------------

    def rate(self, cid: str, rating: int, comment: str | None = None, message: int | None = None,
             correction: str | None = None) -> int:
        """Rate an answer (+1 / -1): message is its position `n` in the conversation (default: the last
        answer); `correction` is the answer wanted instead of a bad one. The exchange it answered is
        stored with the rating; returns the feedback id."""
        conv = self.get_conversation(cid)
        msgs = conv["messages"]
        if message is None:
            answers = [m for m in msgs if m["role"] == "assistant"]
            if not answers:
                raise MuseError("There is no answer to rate yet in this conversation.")
            target = answers[-1]
        else:
            if not isinstance(message, int) or not 1 <= message <= len(msgs):
                raise ValueError(f"message must be a position from 1 to {len(msgs)} "
                                 f"(see `muse conversations show {conv['id']}`), got {message!r}")
            target = msgs[message - 1]
            if target["role"] != "assistant":
                raise MuseError(f"Message {message} is the {target['role']}'s, not an answer; "
                                "rate an assistant message.")
        before = [{"role": m["role"], "content": m["content"]} for m in msgs
                  if m["n"] < target["n"] and m["role"] != "system"]
        base = self._base_system(conv["id"])
        prompt = ([{"role": "system", "content": base}] if base else []) + before
        return add_feedback(self.store, rating, target["content"], prompt, comment, target["id"], correction)

    # -- export / import ----------------------------------------------------------------

    def export_conversation(self, cid: str, fmt: str = "json") -> str:
        """The conversation as JSON or Markdown (`fmt`: json | markdown | md), for `import_conversation`."""
        fmt = (fmt or "").lower()
        if fmt not in ("json", "markdown", "md"):
            raise ValueError(f"fmt must be json or markdown, got {fmt!r}")
        data = self._export_dict(self.get_conversation(cid))
        return json.dumps(data, ensure_ascii=False, indent=2) + "\n" if fmt == "json" else _to_markdown(data)

    def _export_dict(self, conv: dict) -> dict:
        persona = {"name": conv["persona"], "system_prompt": conv["persona_prompt"]} if conv["persona"] else None
        data = {"format": EXPORT_FORMAT, "title": conv["title"], "persona": persona, "model": conv["model"],
                "created_at": conv["created_at"], "messages": []}
        for m in conv["messages"]:
            msg = {"role": m["role"], "content": m["content"], "created_at": m["created_at"]}
            if m["meta"]:
                msg["meta"] = m["meta"]
            data["messages"].append(msg)
        if conv["summary"]:
            data["summary"] = conv["summary"]
            data["summary_covers"] = sum(m["id"] <= conv["summarized_through"] for m in conv["messages"])
        return data

    def import_conversation(self, text: str) -> str:
        """Add a conversation from `export_conversation` output (JSON or Markdown; also a plain {"messages": [...]}
        chat or Markdown with "## User" / "## Assistant" headings); returns the new conversation's id."""
        data = _parse_import(text)
        with self.store.transaction():
            persona_id = None
            if data["persona"]:
                p = data["persona"]
                if not self.store.one("SELECT 1 FROM personas WHERE name = ?", (p["name"],)):
                    self.add_persona(p["name"], p["system_prompt"])
                persona_id = self.get_persona(p["name"])["id"]
            cid = self.new_conversation()
            self.store.execute("UPDATE conversations SET title = ?, persona_id = ?, model = ?, created_at = ? "
                               "WHERE id = ?", (data["title"], persona_id, data["model"],
                                                data["created_at"] or now(), cid))
            ids = [self._insert_imported(cid, m) for m in data["messages"]]
            covers = data["summary_covers"]
            if data["summary"] and 0 < covers <= len(ids):
                self.store.execute("UPDATE conversations SET summary = ?, summarized_through = ? WHERE id = ?",
                                   (data["summary"], ids[covers - 1], cid))
            self.store.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now(), cid))
        return cid

    def _insert_imported(self, cid: str, m: dict) -> int:
        meta = json.dumps(m["meta"], ensure_ascii=False) if m.get("meta") else None
        cur = self.store.execute(
            "INSERT INTO messages (conversation_id, role, content, meta, created_at) VALUES (?, ?, ?, ?, ?)",
            (cid, m["role"], m["content"], meta, m.get("created_at") or now()))
        return cur.lastrowid


# -- helpers: prompts ---------------------------------------------------------------------


def _prompt(base: str | None, facts: list[dict], summary: str | None, turns: list[dict], lang: str) -> list[dict]:
    """[system (base prompt, facts, summary)] + turns, as chat messages."""
    parts = [base] if base else []
    if facts:
        parts.append(FACTS_HEADER[lang] + "\n" + "\n".join(f"- {f['content']}" for f in facts))
    if summary:
        parts.append(SUMMARY_HEADER[lang] + "\n" + summary)
    system = [{"role": "system", "content": "\n\n".join(parts)}] if parts else []
    return system + [{"role": t["role"], "content": t["content"]} for t in turns]


def _summary_messages(summary: str | None, piece: str, lang: str) -> list[dict]:
    text = SUMMARY_TASK[lang]
    if summary:
        text += f"\n\n{SUMMARY_HEADER[lang]}\n{summary}"
    return [{"role": "user", "content": f"{text}\n\n{TRANSCRIPT_HEADER[lang]}\n{piece}"}]


def _exchange_start(turns: list[dict], k: int) -> int:
    """Move k forward to a user message, so the kept history never opens with a reply."""
    while k < len(turns) - 1 and turns[k]["role"] != "user":
        k += 1
    return k


# -- helpers: memory relevance ------------------------------------------------------------

def _bm25(docs: list[list[str]], query: list[str]) -> list[float]:
    import bm25s

    index = bm25s.BM25()
    index.index(docs, show_progress=False)
    return [float(s) for s in index.get_scores(query)]


# -- helpers: text ------------------------------------------------------------------------


def _clean_title(title: str) -> str:
    title = " ".join(title.split()) if isinstance(title, str) else ""
    if not title:
        raise ValueError("title must be non-empty text")
    return title


def _auto_title(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1].rstrip() + "…"


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _snippet(content: str, terms: list[str], width: int = 90) -> str:
    """About `width` characters of `content` around the first term found."""
    flat = " ".join(content.split())
    at = min((i for i in (flat.lower().find(t.lower()) for t in terms) if i >= 0), default=0)
    start = max(0, at - width // 3)
    end = min(len(flat), start + width)
    return ("…" if start else "") + flat[start:end] + ("…" if end < len(flat) else "")


# -- export / import formats --------------------------------------------------------------

_MSG_RE = re.compile(r"^<!-- muse:message (\{.*\}) -->$", re.M)
_CONV_RE = re.compile(r"^<!-- muse:conversation (\{.*\}) -->$", re.M)
_ESCAPE_RE = re.compile(r"^(\\*<!-- muse:)", re.M)  # content lines that could be read as markers
_UNESCAPE_RE = re.compile(r"^\\(\\*<!-- muse:)", re.M)
_PLAIN_HEADING_RE = re.compile(r"^#{1,6}[ \t]*(system|user|assistant|tool|系统|用户|助手)[ \t]*[:：]?[ \t]*$",
                               re.M | re.I)
HEADINGS = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
_PLAIN_ROLES = {"系统": "system", "用户": "user", "助手": "assistant"}


def _comment_json(obj) -> str:
    # One line of JSON safe inside an HTML comment: '>' only occurs inside strings, where \u003e is the same.
    return json.dumps(obj, ensure_ascii=False).replace(">", "\\u003e")


def _to_markdown(data: dict) -> str:
    """Readable Markdown that keeps everything: a marker comment (one line of JSON) before each message.

    Content is written as-is, except that a line starting with (backslashes and) "<!-- muse:" gets one more
    backslash, which import removes; so messages may hold any Markdown, code blocks and headings included.
    """
    head = {k: v for k, v in data.items() if k != "messages"}
    out = [f"# {data['title'] or 'Untitled conversation'}\n\n<!-- muse:conversation {_comment_json(head)} -->\n\n"]
    for m in data["messages"]:
        info = {k: v for k, v in m.items() if k != "content"}
        content = _ESCAPE_RE.sub(r"\\\1", m["content"])
        out.append(f"<!-- muse:message {_comment_json(info)} -->\n### {HEADINGS[m['role']]}\n\n{content}\n\n")
    return "".join(out)


def _from_markdown(text: str) -> dict:
    head = _CONV_RE.search(text)
    marks = list(_MSG_RE.finditer(text))
    if not marks:
        return _from_plain_markdown(text)
    data = json.loads(head.group(1)) if head else {}
    data["messages"] = []
    for i, m in enumerate(marks):
        body = text[m.end() + 1: marks[i + 1].start() if i + 1 < len(marks) else len(text)]
        if body.startswith("### "):
            body = body.split("\n", 1)[1] if "\n" in body else ""
            body = body[1:] if body.startswith("\n") else body
        body = body[:-2] if body.endswith("\n\n") else body.rstrip("\n")
        data["messages"].append(dict(json.loads(m.group(1)), content=_UNESCAPE_RE.sub(r"\1", body)))
    return data


def _from_plain_markdown(text: str) -> dict:
    """Markdown someone wrote: '## User' / '## Assistant' (or 用户 / 助手) headings before each message."""
    heads = list(_PLAIN_HEADING_RE.finditer(text))
    if not heads:
        raise MuseError("No messages found in this Markdown. Import a file written by `muse conversations export`, "
                        "or put a '## User' / '## Assistant' heading before each message.")
    title = re.search(r"^#[ \t]+(.+)$", text[: heads[0].start()], re.M)
    messages = []
    for i, h in enumerate(heads):
        role = h.group(1).lower()
        body = text[h.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        messages.append({"role": _PLAIN_ROLES.get(role, role), "content": body.strip("\n")})
    return {"title": title.group(1).strip() if title else "", "messages": messages}


def _parse_import(text: str) -> dict:
    """Parse and check an exported conversation; the result has every key `import_conversation` reads."""
    if not isinstance(text, str) or not text.strip():
        raise MuseError("Nothing to import: the text is empty.")
    if text.lstrip()[:1] in "{[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MuseError(f"Not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); import a file written "
                            "by `muse conversations export`.") from None
        data = {"messages": data} if isinstance(data, list) else data
    else:
        try:
            data = _from_markdown(text)
        except json.JSONDecodeError as e:
            raise MuseError(f"A <!-- muse:... --> marker in this Markdown holds broken JSON ({e.msg}); "
                            "restore it from the exported file.") from None
    return _check_import(data)


def _check_import(data) -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise MuseError('Expected a conversation: an object with a "messages" list (as `muse conversations export` '
                        "writes).")
    fmt = data.get("format", EXPORT_FORMAT)
    if fmt != EXPORT_FORMAT:
        raise MuseError(f"This file is in format {fmt!r}; this Muse reads {EXPORT_FORMAT!r}. Upgrade Muse.")
    for i, m in enumerate(data["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise MuseError(f"messages[{i}] must be an object with role {'|'.join(ROLES)} and string content.")
        if not isinstance(m.get("created_at", 0), (int, float)) or not isinstance(m.get("meta") or {}, dict):
            raise MuseError(f"messages[{i}]: created_at must be a number and meta an object.")
    persona = data.get("persona")
    if persona is not None and not (isinstance(persona, dict) and isinstance(persona.get("name"), str)
                                    and isinstance(persona.get("system_prompt"), str)):
        raise MuseError('"persona" must be null or an object with "name" and "system_prompt".')
    title = data.get("title") or ""
    covers = data.get("summary_covers") or 0
    if not isinstance(title, str) or not isinstance(covers, int):
        raise MuseError('"title" must be text and "summary_covers" a number of messages.')
    return {"title": " ".join(title.split()), "persona": persona, "model": data.get("model"),
            "created_at": data.get("created_at"), "messages": data["messages"],
            "summary": data.get("summary"), "summary_covers": covers}
