"""The personal assistant: kept conversations, context policy, memory, personas, search, export/import,
feedback, and their CLI. Mechanics run on a scripted model with the default tokenizer and chat template."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import muse
from muse.api import Model
from muse.apps.assistant import FACTS_HEADER, SUMMARY_HEADER, Assistant, MessageTooLongError
from muse.apps.feedback import add_feedback, export_feedback, list_feedback
from muse.errors import ContextLengthError, MuseError
from muse.eval.suites import read_items
from muse.generation import SamplingParams
from muse.training.finetune import ChatBatches, read_chats
from tests.helpers import ScriptedLM

P = SamplingParams(max_new_tokens=16, temperature=0.0)


class PromptLM(ScriptedLM):
    """A scripted model that picks its reply from the prompt it is given (`rule(prompt_text) -> reply`) and
    records every prompt; with `interrupt_after=n`, Ctrl-C arrives once n tokens are out."""

    def __init__(self, tokenizer, rule, block_size=512, interrupt_after=None):
        super().__init__([], tokenizer.vocab_size, block_size)
        self.tok, self.rule, self.interrupt_after = tokenizer, rule, interrupt_after
        self.prompts: list[str] = []
        self.prompt_tokens: list[int] = []

    def forward(self, idx, targets=None, cache=None, last_only=False):
        if cache.pos == 0:
            prompt = self.tok.decode(idx[0].tolist())
            self.prompts.append(prompt)
            self.prompt_tokens.append(idx.shape[1])
            self.script = self.tok.encode(self.rule(prompt), add_special_tokens=False)
        elif self.interrupt_after is not None and cache.pos - self.start >= self.interrupt_after - 1:
            raise KeyboardInterrupt
        return super().forward(idx, targets, cache, last_only)


@pytest.fixture
def scripted(default_model):
    """make(rule or reply text, block_size=512, ...) -> (Model, PromptLM)."""

    def make(rule="Hello there, friend!", **kw):
        lm = PromptLM(default_model.tokenizer, rule if callable(rule) else (lambda prompt: rule), **kw)
        return Model(lm, default_model.tokenizer, {"name": "scripted"}), lm

    return make


def texts(a, cid):
    return [(m["role"], m["content"]) for m in a.get_conversation(cid)["messages"]]


# -- replies ---------------------------------------------------------------------------------


def test_reply_is_stored_and_the_next_prompt_holds_the_history(scripted):
    model, lm = scripted("Nice to meet you, Ada.")
    a = Assistant(model)
    cid = a.new_conversation()
    assert a.reply(cid, "My name is Ada.", P) == "Nice to meet you, Ada."
    a.reply(cid, "What is my name?", P)
    conv = a.get_conversation(cid)
    assert conv["title"] == "My name is Ada." and conv["model"] == "scripted"
    assert texts(a, cid) == [("user", "My name is Ada."), ("assistant", "Nice to meet you, Ada."),
                             ("user", "What is my name?"), ("assistant", "Nice to meet you, Ada.")]
    assert conv["messages"][1]["meta"]["finish_reason"] == "stop"
    assert lm.prompts[1] == model.chat_prompt([{"role": r, "content": c} for r, c in texts(a, cid)[:3]])


def test_user_message_is_stored_first_and_the_reply_only_when_complete(scripted):
    model, _ = scripted("One two three four five.")
    a = Assistant(model)
    cid = a.new_conversation()
    stream = a.stream_reply(cid, "Count to five.", P)
    assert texts(a, cid) == [("user", "Count to five.")]
    first = next(stream)
    assert first.text and texts(a, cid) == [("user", "Count to five.")]  # no half-written reply
    rest = "".join(c.text for c in stream)
    assert texts(a, cid)[-1] == ("assistant", first.text + rest) == ("assistant", "One two three four five.")
    assert stream.message_id == a.get_conversation(cid)["messages"][-1]["id"]


def test_a_reply_without_params_samples_as_the_model_recommends(scripted, monkeypatch):
    model, _ = scripted("Hi.")
    model.info["sampling"] = {"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.1}
    seen = []
    real = Model.stream
    monkeypatch.setattr(Model, "stream", lambda self, prompt, params=None, **kw: seen.append(params) or
                        real(self, prompt, params, **kw))
    a = Assistant(model)
    assert a.reply(a.new_conversation(), "Hello?") == "Hi."
    assert seen == [SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.1)]


def test_a_stopped_reply_is_kept_and_marked(scripted):
    model, _ = scripted("One two three four five six seven.")
    a = Assistant(model)
    cid = a.new_conversation()
    stream = a.stream_reply(cid, "Count.", P)
    partial = next(stream).text + next(stream).text
    stream.close()  # what the CLI does on Ctrl-C, and what a dropped HTTP client does
    last = a.get_conversation(cid)["messages"][-1]
    assert (last["role"], last["content"], last["meta"]["finish_reason"]) == ("assistant", partial, "stopped")

    model, _ = scripted("One two three four five six seven.", interrupt_after=2)  # Ctrl-C inside the model
    a = Assistant(model)
    cid = a.new_conversation()
    got = []
    with pytest.raises(KeyboardInterrupt):
        for chunk in a.stream_reply(cid, "Count.", P):
            got.append(chunk.text)
    last = a.get_conversation(cid)["messages"][-1]
    assert len(got) == 2 and last["content"] == "".join(got) and last["meta"]["finish_reason"] == "stopped"


def test_drop_policy_keeps_the_newest_turns_that_fit(scripted):
    model, lm = scripted("Noted, thank you.", block_size=256)
    a = Assistant(model, policy="drop")
    cid = a.new_conversation()
    notices = []
    for i in range(8):
        stream = a.stream_reply(cid, f"Turn {i}: here are several words that take up room in the window.", P)
        "".join(c.text for c in stream)
        notices.append(stream.context)
    assert max(lm.prompt_tokens) <= 256 - P.max_new_tokens
    last = notices[-1]
    assert last.dropped > 0 and "left out the" in last.notice and "policy: drop" in last.notice
    assert notices[0].notice is None
    stored = [{"role": r, "content": c} for r, c in texts(a, cid)]
    assert len(stored) == 16  # everything stays saved
    assert lm.prompts[-1] == model.chat_prompt(stored[last.dropped:15])  # exactly the newest turns, in order
    assert "Turn 7:" in lm.prompts[-1] and "Turn 0:" not in lm.prompts[-1]


def test_summarize_policy_folds_old_turns_into_a_stored_summary(scripted):
    def rule(prompt):
        return "Ada talked about turns 0 to 3." if "Summarize the conversation" in prompt else "Noted."

    model, lm = scripted(rule, block_size=256)
    a = Assistant(model)  # policy="summarize" is the default
    cid = a.new_conversation()
    contexts = []
    for i in range(8):
        stream = a.stream_reply(cid, f"Turn {i}: here are several words that take up room in the window.", P)
        "".join(c.text for c in stream)
        contexts.append(stream.context)
    assert max(lm.prompt_tokens) <= 256 - P.max_new_tokens
    at = next(i for i, c in enumerate(contexts) if c.summarized)
    assert "summarized the" in contexts[at].notice
    summary_prompt = next(p for p in lm.prompts if "Summarize the conversation" in p)
    assert "Turn 0:" in summary_prompt and "Noted." in summary_prompt
    conv = a.get_conversation(cid)
    assert conv["summary"] == "Ada talked about turns 0 to 3."
    covered = [m for m in conv["messages"] if m["id"] <= conv["summarized_through"]]
    assert covered and covered[-1]["role"] == "assistant"  # whole exchanges
    assert SUMMARY_HEADER["en"] + "\nAda talked about turns 0 to 3." in lm.prompts[-1]
    assert "Turn 0:" not in lm.prompts[-1] and "Turn 7:" in lm.prompts[-1]
    assert len(conv["messages"]) == 16


def test_a_message_too_long_on_its_own_is_refused_before_anything_is_stored(scripted):
    model, _ = scripted(block_size=128)
    a = Assistant(model)
    cid = a.new_conversation()
    with pytest.raises(MessageTooLongError, match="Shorten the message") as e:
        a.reply(cid, "word " * 200, P)
    assert isinstance(e.value, ContextLengthError) and texts(a, cid) == []
    with pytest.raises(ValueError, match="max_new_tokens=128 leaves no room"):
        a.reply(cid, "hi", P.replace(max_new_tokens=128))
    with pytest.raises(ValueError, match="non-empty"):
        a.reply(cid, "   ", P)
    with pytest.raises(ValueError, match="policy"):
        Assistant(model, policy="forget")


# -- memory, personas ------------------------------------------------------------------------


def test_relevant_memories_in_english_and_chinese(scripted):
    a = Assistant(None)
    ids = [a.remember(f) for f in ("I live in Lyon.", "My cat is called Miso.", "我的猫叫小白。", "我在上海工作。")]
    assert a.relevant_memories("Where do I live these days?")[0]["content"] == "I live in Lyon."
    assert a.relevant_memories("What's my cat's name?")[0]["content"] == "My cat is called Miso."
    assert a.relevant_memories("我的猫叫什么名字？")[0]["content"] == "我的猫叫小白。"
    assert a.relevant_memories("你在哪里工作？")[0]["content"] == "我在上海工作。"
    assert a.relevant_memories("Tell me a joke.") == []
    a.forget(ids[0])
    assert [m["content"] for m in a.memories()][0] == "My cat is called Miso."
    with pytest.raises(MuseError, match="No remembered fact"):
        a.forget(ids[0])

    model, lm = scripted()
    a = Assistant(model, memory_k=1)
    cid = a.new_conversation()
    stream = a.stream_reply(cid, "What is my cat called?", P)
    "".join(c.text for c in stream)
    system = FACTS_HEADER["en"] + "\n- My cat is called Miso."
    assert lm.prompts[-1].startswith(model.chat_prompt([{"role": "system", "content": system}])[:-20])
    assert "小白" not in lm.prompts[-1] and stream.context.memories == [ids[1]]


def test_personas_and_system_prompts(scripted):
    model, lm = scripted()
    a = Assistant(model)
    a.add_persona("tutor", "You are a tutor.")
    assert a.add_persona("tutor", "You are a patient tutor.")["system_prompt"] == "You are a patient tutor."
    assert [p["name"] for p in a.list_personas()] == ["tutor"]
    cid = a.new_conversation(persona="tutor")
    a.reply(cid, "Hi", P)
    assert lm.prompts[-1] == model.chat_prompt([{"role": "system", "content": "You are a patient tutor."},
                                                {"role": "user", "content": "Hi"}])
    a.set_system(cid, "Answer in French.")
    a.reply(cid, "Hi again", P)
    assert "Answer in French." in lm.prompts[-1] and "patient tutor" not in lm.prompts[-1]
    a.delete_persona("tutor")
    assert a.list_personas() == [] and a.get_conversation(cid)["persona"] is None
    with pytest.raises(MuseError, match="No persona 'tutor'"):
        a.new_conversation(persona="tutor")
    with pytest.raises(ValueError, match="one word"):
        a.add_persona("two words", "x")


# -- conversations: search, rename, delete, export/import ----------------------------------------


def _import(a, title, *contents):
    roles = ["user", "assistant"] * len(contents)
    return a.import_conversation(json.dumps({"title": title, "messages": [
        {"role": r, "content": c} for r, c in zip(roles, contents)]}))


def test_search_rename_delete_in_english_and_chinese():
    a = Assistant(None)
    en = _import(a, "Animals", "The quick brown fox jumps.", "Over the lazy dog, 100% sure.")
    zh = _import(a, "旅行计划", "我住在北京，喜欢吃饺子。", "北京的饺子很好吃！")
    assert [h["id"] for h in a.search("QUICK fox")] == [en]
    assert a.search("quick fox")[0]["snippet"].startswith("The quick brown fox")
    assert [(h["id"], h["matches"]) for h in a.search("北京")] == [(zh, 2)]  # two characters: no trigram
    assert [h["id"] for h in a.search("吃饺子")] == [zh]
    assert [h["id"] for h in a.search("100%")] == [en] and a.search('"') == []
    assert [h["id"] for h in a.search("旅行")] == [zh]  # the title
    assert a.search("fox 北京") == []
    a.rename(en[:5], "Fox  story\n")  # a unique prefix works as an id
    assert a.list_conversations()[-1]["title"] == "Fox story"
    a.delete(zh)
    assert a.search("北京") == [] and [c["id"] for c in a.list_conversations()] == [en]
    with pytest.raises(MuseError, match="No conversation"):
        a.get_conversation(zh)
    with pytest.raises(ValueError, match="empty"):
        a.search("  ")


TRICKY = [
    {"role": "system", "content": "你是一个乐于助人的助手。", "created_at": 1700000000.5},
    {"role": "user", "content": "写一个 Python 函数，计算斐波那契数列。", "created_at": 1700000001.25},
    {"role": "assistant", "content": "```python\ndef fib(n):\n    # 返回第 n 项\n    return n if n < 2 else fib(n - 1) + "
                                     "fib(n - 2)\n```\n\n### User\n\n<!-- muse:message {\"role\": \"user\"} -->\n"
                                     "\\<!-- muse:escaped already\n", "created_at": 1700000002.0,
     "meta": {"model": "qwen2.5-0.5b", "finish_reason": "stop", "prompt_tokens": 40, "generation_tokens": 37}},
    {"role": "user", "content": "  Thanks! -->  \r\n\n", "created_at": 1700000003.0},
    {"role": "assistant", "content": "不客气", "created_at": 1700000004.0, "meta": {"finish_reason": "stopped"}},
]


@pytest.mark.parametrize("fmt", ["json", "markdown"])
def test_export_import_round_trip(fmt):
    a = Assistant(None)
    a.add_persona("助手", "Be kind.")
    data = {"format": "muse.conversation/1", "title": "斐波那契 & <code> → tests", "persona":
            {"name": "助手", "system_prompt": "Be kind."}, "model": "qwen2.5-0.5b", "created_at": 1700000000.0,
            "messages": TRICKY, "summary": "用户问了斐波那契。", "summary_covers": 3}
    cid = a.import_conversation(json.dumps(data, ensure_ascii=False))
    assert json.loads(a.export_conversation(cid, "json")) == data  # import keeps everything
    exported = a.export_conversation(cid, fmt)
    again = a.import_conversation(exported)
    assert again != cid and a.export_conversation(again, fmt) == exported
    assert a.export_conversation(again, "json") == a.export_conversation(cid, "json")
    if fmt == "markdown":
        assert "# 斐波那契 & <code> → tests" in exported and "```python\ndef fib(n):" in exported
    conv = a.get_conversation(again)
    assert conv["summary"] == "用户问了斐波那契。" and conv["summarized_through"] == conv["messages"][2]["id"]


def test_import_plain_chats_and_bad_input():
    a = Assistant(None)
    cid = a.import_conversation("# Trip\n\n## User\n\nWhere to go?\n\n## 助手\n\nKyoto.\n")
    assert a.get_conversation(cid)["title"] == "Trip" and texts(a, cid) == [("user", "Where to go?"),
                                                                          ("assistant", "Kyoto.")]
    line = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}'
    assert texts(a, a.import_conversation(line)) == [("user", "Hi"), ("assistant", "Hello!")]
    for bad, message in [("{not json", "Not valid JSON"), ('{"messages": [{"role": "bot", "content": "x"}]}',
                                                           r"messages\[0\] must be"),
                         ("Just some prose.", "No messages found"), ("", "empty"),
                         ('{"format": "muse.conversation/9", "messages": []}', "Upgrade Muse")]:
        with pytest.raises(MuseError, match=message):
            a.import_conversation(bad)
    assert len(a.list_conversations()) == 2  # no half-imported conversation


# -- feedback ----------------------------------------------------------------------------------


def test_feedback_exports_liked_exchanges_that_finetune_reads(scripted, tmp_path, default_model):
    model, _ = scripted("Paris.")
    a = Assistant(model)
    a.add_persona("geo", "Answer briefly.")
    cid = a.new_conversation(persona="geo")
    a.reply(cid, "Capital of France?", P)
    a.reply(cid, "And of Italy?", P)
    a.rate(cid, +1, comment="right")  # the last answer
    first = a.rate(cid, +1, message=2)
    a.rate(cid, -1, message=2)  # changed my mind: the latest rating counts
    with pytest.raises(MuseError, match="not an answer"):
        a.rate(cid, +1, message=1)
    assert [f["comment"] for f in list_feedback(a.store)] == ["right", None, None] and first == 2
    out = tmp_path / "liked.jsonl"
    assert export_feedback(a.store, out) == 1
    expected = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Paris."}]
    assert read_chats(out) == [expected]
    assert len(ChatBatches(out, default_model.tokenizer, 128).examples("train")) == 1
    a.delete(cid)  # feedback outlives its conversation
    assert export_feedback(a.store, out) == 1


def test_feedback_validation(tmp_path):
    a = Assistant(None)
    prompt = [{"role": "user", "content": "Hi"}]
    for kwargs, message in [(dict(rating=2), "rating"), (dict(response=" "), "response"),
                            (dict(prompt=[]), "prompt"), (dict(prompt=[{"role": "x", "content": ""}]), "prompt")]:
        args = dict(rating=1, response="Hello", prompt=prompt) | kwargs
        with pytest.raises(ValueError, match=message):
            add_feedback(a.store, args["rating"], args["response"], args["prompt"])
    add_feedback(a.store, -1, "Go away.", prompt)
    with pytest.raises(MuseError, match="No liked or corrected answers"):
        export_feedback(a.store, tmp_path / "liked.jsonl")
    assert not (tmp_path / "liked.jsonl").exists()
    with pytest.raises(ValueError, match="kind"):
        export_feedback(a.store, tmp_path / "liked.jsonl", kind="csv")


def test_corrections_train_and_disliked_answers_become_eval_items(scripted, tmp_path):
    model, _ = scripted("Lyon.")
    a = Assistant(model)
    cid = a.new_conversation()
    a.reply(cid, "Capital of France?", P)
    a.reply(cid, "Capital of Italy?", P)
    a.rate(cid, -1, message=2, correction=" Paris. ")
    a.rate(cid, -1, comment="wrong")  # the last answer: bad, no correction given
    with pytest.raises(ValueError, match="thumbs-down"):
        a.rate(cid, +1, correction="Rome.")
    with pytest.raises(ValueError, match="same as the answer"):
        a.rate(cid, -1, correction="Lyon.")
    assert [f["correction"] for f in list_feedback(a.store)] == ["Paris.", None]
    train, items = tmp_path / "train.jsonl", tmp_path / "items.jsonl"
    assert export_feedback(a.store, train) == 1  # the correction is learnt, never the rejected answer
    [chat] = read_chats(train)
    assert chat[-2:] == [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    assert export_feedback(a.store, items, kind="eval") == 2
    first, second = read_items(items)
    assert first["messages"][-1] == {"role": "user", "content": "Capital of France?"}
    assert (first["rejected"], first["reference"]) == ("Lyon.", "Paris.")
    assert second["rejected"] == "Lyon." and "reference" not in second
    assert second["messages"][-1]["content"] == "Capital of Italy?" and len(second["messages"]) >= 3
    a.rate(cid, +1, message=4)  # changed my mind about the last answer: liked now
    assert export_feedback(a.store, train) == 2 and read_chats(train)[1][-1]["content"] == "Lyon."
    assert export_feedback(a.store, items, kind="eval") == 1


# -- end to end on the default model ------------------------------------------------------------


def test_default_model_reply_matches_chat_and_resumes_with_history(default_model, monkeypatch):
    seen = []
    real = default_model.stream_chat
    monkeypatch.setattr(default_model, "stream_chat", lambda msgs, p: seen.append(msgs) or real(msgs, p))
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    cid = Assistant(default_model).new_conversation()
    first = Assistant(default_model).reply(cid, "My name is Ada. Say hello.", params)
    assert first.strip() and first == default_model.chat([{"role": "user", "content": "My name is Ada. Say hello."}],
                                                         params)
    second = Assistant(default_model).reply(cid, "What is my name?", params)  # a fresh Assistant: resumed from disk
    history = [{"role": "user", "content": "My name is Ada. Say hello."}, {"role": "assistant", "content": first},
               {"role": "user", "content": "What is my name?"}]
    assert seen[-1] == history  # before the reference call below, which goes through the spy too
    assert second == default_model.chat(history, params)


# -- the CLI ------------------------------------------------------------------------------------

runner = CliRunner()


def run(*args, input=None):
    from muse.cli import app

    return runner.invoke(app, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def cli_model(monkeypatch, scripted):
    """`muse.load` in the CLI returns a scripted model (the real one is tested above and in test_cli.py)."""
    holder = {"model": scripted("Hello! How can I help?")[0]}
    monkeypatch.setattr(muse, "load", lambda *a, **k: holder["model"])
    return holder


def test_cli_chat_then_conversations(cli_model, tmp_path):
    r = run("chat", "-n", "4", "-t", "0", "--message", "Hello there", "--message", "/remember I like green tea",
            "--message", "/title Tea talk", "--message", "/good short and sweet", "--message", "/bogus",
            "--message", "/fix", "--message", "/fix Hi! What shall we talk about?")
    assert r.exit_code == 0 and "remembered (#1)" in r.output and "feedback #1 saved" in r.output
    assert "Write the answer you wanted after /fix" in r.output and "feedback #2 saved" in r.output
    assert [(f["rating"], f["correction"]) for f in list_feedback(Assistant(None).store)] == [
        (1, None), (-1, "Hi! What shall we talk about?")]
    assert "Unknown command /bogus" in r.output
    cid = Assistant(None).last_conversation()
    r = run("conversations", "list")
    assert cid in r.output and "Tea talk" in r.output
    r = run("chat", "--continue", "-n", "4", "-t", "0", "--message", "Again")
    assert r.exit_code == 0 and "Resuming Tea talk" in r.output
    r = run("conversations", "show", cid)
    assert "1. user" in r.output and "Hello there" in r.output and "3. user" in r.output and "Again" in r.output
    assert [h["id"] for h in Assistant(None).search("hello")] == [cid]
    assert cid in run("conversations", "search", "hello").output
    out = tmp_path / "tea.md"
    assert run("conversations", "export", cid, "-o", str(out)).exit_code == 0
    r = run("conversations", "import", str(out))
    new = r.output.split("Imported as ")[1].split(";")[0]
    assert run("conversations", "export", new).output == run("conversations", "export", cid).output
    assert "I like green tea" in run("memory", "list").output
    assert run("memory", "delete", "1").exit_code == 0 and "Nothing remembered" in run("memory", "list").output
    assert run("conversations", "rename", new, "Copy").exit_code == 0
    assert run("conversations", "delete", new, "--yes").exit_code == 0
    assert [c["id"] for c in Assistant(None).list_conversations()] == [cid]
    r = run("chat", "--resume", "nope", "--message", "hi")
    assert r.exit_code == 1 and "No conversation 'nope'" in r.output


def test_cli_persona_memory_and_feedback_export(cli_model, tmp_path):
    assert run("persona", "add", "tutor", "You are a patient tutor.").exit_code == 0
    assert "patient tutor" in run("persona", "list").output
    r = run("chat", "--persona", "tutor", "-n", "4", "-t", "0", "--message", "Teach me.")
    cid = Assistant(None).last_conversation()
    assert r.exit_code == 0 and Assistant(None).get_conversation(cid)["persona"] == "tutor"
    r = run("feedback", "add", "--conversation", cid, "--message", "2", "--up", "--comment", "clear")
    assert r.exit_code == 0 and "feedback #1" in r.output
    r = run("feedback", "add", "--conversation", cid, "--up", "--down")
    assert r.exit_code == 2 and "exactly one of --up or --down" in r.output
    out = tmp_path / "liked.jsonl"
    r = run("feedback", "export", "-o", str(out))
    assert r.exit_code == 0 and "Wrote 1 chat" in r.output
    [chat] = read_chats(out)
    assert chat[:2] == [{"role": "system", "content": "You are a patient tutor."},
                        {"role": "user", "content": "Teach me."}] and chat[2]["role"] == "assistant"
    r = run("feedback", "export", "--as", "eval", "-o", str(tmp_path / "items.jsonl"))
    assert r.exit_code == 1 and "No disliked answers yet" in r.output
    r = run("feedback", "add", "--conversation", cid, "--correction", "Let us start with fractions.")
    assert r.exit_code == 0 and "feedback #2" in r.output  # a correction implies --down
    assert "Let us start with" in run("feedback", "list").output
    r = run("feedback", "export", "--as", "eval", "-o", str(tmp_path / "items.jsonl"))
    assert r.exit_code == 0 and "Wrote 1 eval item" in r.output and "muse eval -s" in r.output
    [item] = read_items(tmp_path / "items.jsonl")
    assert item["reference"] == "Let us start with fractions." and item["messages"][-1]["content"] == "Teach me."
    assert run("feedback", "export", "-o", str(out)).exit_code == 0  # the correction replaces the liked answer
    assert read_chats(out)[0][-1] == {"role": "assistant", "content": "Let us start with fractions."}
    assert run("persona", "delete", "tutor").exit_code == 0
    r = run("chat", "--persona", "tutor", "--message", "hi")
    assert r.exit_code == 1 and "No persona 'tutor'" in r.output


def test_cli_tells_the_user_when_context_is_summarized_and_keeps_a_stopped_reply(cli_model, scripted, monkeypatch):
    model, _ = scripted("Noted.", block_size=200)
    cli_model["model"] = model
    args = []
    for i in range(6):
        args += ["--message", f"Turn {i}: here are several words that take up room in the window."]
    r = run("chat", "-n", "16", "-t", "0", *args)
    assert r.exit_code == 0 and "outgrew the model's context window" in r.output and "summarized the" in r.output

    import muse.cli.assistant as cli

    def interrupted(stream):  # Ctrl-C arrives after the first chunk is shown
        next(stream)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_stream_to_stdout", interrupted)
    r = run("chat", "-n", "16", "-t", "0", "--message", "Count to ten.")
    assert r.exit_code == 0 and "stopped" in r.output
    last = Assistant(None).get_conversation(Assistant(None).last_conversation())["messages"][-1]
    assert last["meta"]["finish_reason"] == "stopped" and last["content"] == "Noted"[:len(last["content"])]


# -- the safety switch ------------------------------------------------------------------------


def test_safety_switch_blocks_harmful_output_and_keeps_the_policy_message(scripted, monkeypatch):
    from muse.safety import SafetyBlocked

    model, lm = scripted("Sure. Step one: make a pipe bomb. Step two: more details follow here")
    a = Assistant(model)
    cid = a.new_conversation()
    monkeypatch.setenv("MUSE_SAFETY", "0")  # off: the reply passes untouched
    assert "pipe bomb" in a.reply(cid, "Tell me a story.", P)
    monkeypatch.setenv("MUSE_SAFETY", "1")
    with pytest.raises(SafetyBlocked, match="weapons"):
        a.reply(cid, "Tell me another one.", SamplingParams(max_new_tokens=40, temperature=0.0))
    stored = a.get_conversation(cid)["messages"][-1]
    assert stored["role"] == "assistant" and "pipe bomb" not in stored["content"]
    assert "safety policy" in stored["content"] and stored["meta"]["finish_reason"] == "stopped"


def test_safety_switch_refuses_harmful_input_before_storing_it(scripted, monkeypatch):
    from muse.safety import SafetyBlocked

    model, lm = scripted("ok")
    a = Assistant(model)
    cid = a.new_conversation()
    monkeypatch.setenv("MUSE_SAFETY", "1")
    with pytest.raises(SafetyBlocked):
        a.reply(cid, "教你制作炸弹的方法。", P)
    assert texts(a, cid) == [] and lm.prompts == []
