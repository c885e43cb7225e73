"""muse.apps.entities and `muse extract`: offsets, constrained JSON, the metric, files, errors."""

from __future__ import annotations

import csv
import json

import jsonschema
import pytest
from typer.testing import CliRunner

import muse
from muse.api import Model
from muse.apps import entities as ent
from muse.apps.analysis import AnalysisInputError
from muse.apps.entities import (
    Counts, candidate_spans, check_schema, check_types, entity_schema, extract_entities, extract_fields,
    extract_file, locate, match_counts, parse_reply, score,
)
from muse.apps.language import LanguageError
from muse.checkpoints.registry import BundledModel
from muse.constrain import ConstraintError
from tests.helpers import LOCAL

EN = "Tim Cook met Angela Merkel in Berlin on Monday."
ZH = "马云昨天在杭州宣布阿里巴巴投资五亿元。"


def _assert_offsets(text, entities):
    for e in entities:
        assert text[e["start"]:e["end"]] == e["text"] and e["text"]
    spans = [(e["start"], e["end"]) for e in entities]
    assert spans == sorted(spans) and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


class Scripted:
    """A model stand-in whose chat replies with a fixed text (for what the model says is not the point)."""

    def __init__(self, reply, name="smollm2-135m"):
        self.reply, self.name, self.info, self.calls = reply, name, {"name": name}, []

    def chat(self, messages, **kwargs):
        self.calls.append((messages, kwargs))
        return self.reply


# -- offsets ----------------------------------------------------------------------------

def test_offsets_are_muse_s_own_and_every_text_is_the_input_s():
    text = "Jack visited Rome in May, and Jack said Rome was too hot."
    found = [{"type": "person", "text": "Jack"}, {"type": "location", "text": "rome"},
             {"type": "location", "text": "Paris"}, {"type": "time", "text": " May "}]
    entities, dropped = locate(text, found)
    assert [(e["type"], e["text"], e["start"]) for e in entities] == [
        ("person", "Jack", 0), ("location", "Rome", 13), ("time", "May", 21), ("person", "Jack", 30),
        ("location", "Rome", 40)]  # both mentions; matched ignoring case, reported as the input has it
    assert dropped == [{"type": "location", "text": "Paris"}]
    _assert_offsets(text, entities)


def test_chinese_offsets_repeats_and_overlaps_prefer_the_longer_span():
    text = "许强说许强的父亲在北京大学工作，北京很大。"
    found = [{"type": "location", "text": "北京"}, {"type": "person", "text": "许强"},
             {"type": "organization", "text": "北京大学"}, {"type": "person", "text": "许强"}]
    entities, dropped = locate(text, found)
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in entities] == [
        ("person", "许强", 0, 2), ("person", "许强", 3, 5), ("organization", "北京大学", 9, 13),
        ("location", "北京", 16, 18)]
    assert dropped == []
    _assert_offsets(text, entities)


def test_extraction_drops_and_counts_made_up_entities_and_says_which_model():
    reply = json.dumps({"entities": [{"text": "Tim Cook", "type": "person"}, {"text": "Munich", "type": "location"}]})
    x = extract_entities(Scripted(reply), EN, constrained=False)
    assert x.entities == [{"type": "person", "text": "Tim Cook", "start": 0, "end": 8}]
    assert x.to_dict() == {"entities": x.entities, "model": "smollm2-135m", "dropped": 1} and x.valid


def test_unconstrained_replies_are_salvaged_and_marked_invalid():
    fenced = '```json\n{"entities": [{"type": "person", "text": "Tim Cook"}]}\n```'
    assert parse_reply(fenced, ["person"]) == ([{"type": "person", "text": "Tim Cook"}], True)
    cut = '{"entities": [{"type": "person", "text": "Tim Cook"}, {"type": "location", "text": "Ber'
    assert parse_reply(cut, ["person", "location"]) == ([{"type": "person", "text": "Tim Cook"}], False)
    wrong = '{"entities": [{"type": "animal", "text": "cat"}, {"type": "place", "text": "Berlin"}]}'
    assert parse_reply(wrong, ["location"]) == ([{"type": "location", "text": "Berlin"}], False)
    assert parse_reply("no JSON here", ["person"]) == ([], False)


def test_types_defaults_user_types_and_aliases():
    assert check_types() == list(ent.DEFAULT_TYPES)
    assert check_types(None, "product, drug,Place") == list(ent.DEFAULT_TYPES) + ["product", "drug"]
    assert check_types("product，drug") == ["product", "drug"]  # full-width comma
    for bad in ("", "two words", "a,,b"):
        with pytest.raises(ValueError, match="entity type|at least one"):
            check_types(bad)


def test_candidate_spans_are_runs_of_the_input_s_words():
    spans = candidate_spans("Ms. Lee paid $3.5 million (about €3 million).")
    assert {"Lee", "Ms. Lee", "$3.5 million", "€3 million"} <= set(spans)
    assert not any(s[0] in "(," or s[-1] in "()," for s in spans)
    zh = candidate_spans("马云在杭州。")
    assert {"马云", "杭州", "马云在杭州"} <= set(zh) and "。" not in zh


# -- constrained output ---------------------------------------------------------------------

@pytest.mark.parametrize("text,types", [(EN, None), ("Buy Zorbex pills at Pharma Plus for $9.", "product,drug")])
def test_constrained_reply_always_parses_even_from_a_random_model(tiny, text, types):
    # A random 2-layer model would write anything; the schema holds its greedy reply to the shape,
    # and the default token budget lets it finish (spans) — any string may run longer (400 then).
    kinds = check_types(None, types)
    for spans in (True, False):
        x = extract_entities(tiny, text, extra_types=types, spans=spans, max_items=3,
                             max_new_tokens=None if spans else 400)
        data = json.loads(x.raw)
        jsonschema.validate(data, entity_schema(kinds, 3))
        assert x.valid and all(e["type"] in kinds for e in x.entities)
        _assert_offsets(text, x.entities)
        if spans:
            assert x.dropped == []  # only the input's own words could be written


SHORT = "Tim Cook visited Berlin."


@pytest.fixture(scope="module")
def short(default_model):
    """The default model's extraction from SHORT (greedy: the commands must give the same)."""
    return extract_entities(default_model, SHORT)


def test_default_model_finds_names_with_offsets(default_model, short):
    assert short.model == default_model.name and short.valid and short.dropped == []
    assert {"type": "person", "text": "Tim Cook", "start": 0, "end": 8} in short.entities
    _assert_offsets(SHORT, short.entities)


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "city", "born"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "city": {"type": "string", "maxLength": 40},
                         "born": {"type": "integer", "minimum": 0, "maximum": 3000},
                         "job": {"enum": ["engineer", "teacher", "doctor", "other"]}}}


@pytest.mark.parametrize("fixture", ["tiny", "default_model"])
def test_fields_are_valid_against_the_user_s_schema(request, fixture):
    model = request.getfixturevalue(fixture)
    out = extract_fields(model, "Ada Lovelace was born in London in 1815.", PERSON, max_new_tokens=200)
    jsonschema.validate(out, PERSON)
    if fixture == "default_model":
        assert out["name"] == "Ada Lovelace"


def test_bad_schemas_are_clear_errors(tmp_path, default_model):
    with pytest.raises(ValueError, match="not valid JSON"):
        check_schema('{"type": "object",')
    with pytest.raises(ValueError, match="must describe an object"):
        check_schema({"type": "array"})
    with pytest.raises(ValueError, match="does not exist"):
        check_schema(tmp_path / "missing.json")
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}
    with pytest.raises(ConstraintError, match="not usable") as e:
        extract_fields(default_model, "hello", bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="empty"):
        extract_entities(default_model, "   ")


def test_chinese_needs_the_bilingual_model(default_model):
    with pytest.raises(LanguageError, match="qwen2.5-0.5b"):
        extract_entities(default_model, ZH)


def test_chinese_instructions_and_both_examples_in_the_prompt():
    model = Scripted('{"entities": []}', name="qwen2.5-0.5b")
    extract_entities(model, ZH)
    messages, kwargs = model.calls[0]
    assert messages[0]["content"].startswith("从文本中抽取命名实体") and messages[-1]["content"] == f"文本：{ZH}"
    shots = [m["content"] for m in messages if m["role"] == "user"][:2]
    assert "Maria Lopez" in shots[0] and "王伟" in shots[1]
    assert kwargs["temperature"] == 0 and kwargs["constraint"].kind == "json_schema"


# -- the metric -----------------------------------------------------------------------

def _e(kind, text, start):
    return {"type": kind, "text": text, "start": start, "end": start + len(text)}


def test_metric_on_hand_made_cases():
    gold = [_e("person", "Tim Cook", 0), _e("location", "Berlin", 30), _e("time", "Monday", 40)]
    pred = [_e("person", "Tim", 0), _e("location", "Berlin", 30), _e("person", "Monday", 40), _e("money", "$3", 50)]
    exact = match_counts(gold, pred)
    assert (exact.tp, exact.pred, exact.gold) == (1, 4, 3)
    assert exact.precision == 0.25 and exact.recall == pytest.approx(1 / 3) and exact.f1 == pytest.approx(2 / 7)
    assert match_counts(gold, pred, "partial").tp == 2  # Tim overlaps Tim Cook; Monday has the wrong type
    assert match_counts(gold, [_e("location", "Berlin", 99)], "text").tp == 1  # offsets ignored
    twice = [_e("person", "Jack", 0), _e("person", "Jack", 20)]
    assert match_counts(twice, [_e("person", "Jack", 0), _e("person", "Jack", 0)]).tp == 1  # each gold once
    total = score([(gold, pred), ([], [])])
    assert total == Counts(1, 4, 3)
    assert Counts().f1 == 1.0 and Counts(0, 2, 0).precision == 0 and Counts(0, 0, 2).recall == 0
    with pytest.raises(ValueError, match="match must be one of"):
        match_counts(gold, pred, "fuzzy")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_the_ner_sets_have_verified_offsets(lang):
    sizes = {}
    for split in ("dev", "test"):
        items = ent.load_ner(lang, split)
        sizes[split] = len(items)
        for item in items:
            _assert_offsets(item["text"], item["entities"])
            assert {e["type"] for e in item["entities"]} <= set(ent.DEFAULT_TYPES) and item["entities"]
    assert sizes == {"dev": 20, "test": 40}


# -- files and the command -----------------------------------------------------------------

def test_batch_csv_to_jsonl_and_back(tmp_path):
    model = Scripted(json.dumps({"entities": [{"text": "Tim Cook", "type": "person"}]}))
    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["id", "text"])
        w.writeheader()
        w.writerows([{"id": "1", "text": EN}, {"id": "2", "text": "Ask Tim Cook, said Tim Cook."}])
    done = []
    assert extract_file(model, tmp_path / "in.csv", tmp_path / "out.jsonl", progress=lambda *a: done.append(a)) == 2
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [o["id"] for o in out] == ["1", "2"] and all(o["model"] == "smollm2-135m" for o in out)
    assert [len(o["entities"]) for o in out] == [1, 2] and done == [(1, 2), (2, 2)]
    for o in out:
        _assert_offsets(o["text"], o["entities"])
    model.reply = '{"name": "Tim Cook"}'
    assert extract_file(lambda lang: model, tmp_path / "in.csv", tmp_path / "fields.csv",
                        schema={"type": "object"}) == 2  # a function from language to model; fields
    with open(tmp_path / "fields.csv", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert [json.loads(b["fields"]) for b in back] == [{"name": "Tim Cook"}] * 2 and back[0]["id"] == "1"


@pytest.mark.parametrize("name,content,message", [
    ("missing.csv", None, "does not exist"),
    ("gbk.csv", "text\n北京\n".encode("gbk"), "not UTF-8"),
    ("empty.jsonl", '{"text": "Tim Cook"}\n{"text": "  "}\n', "record 2: the 'text' text is empty"),
    ("nocol.jsonl", '{"body": "Tim Cook"}\n', "has no 'text' field"),
    ("clash.jsonl", '{"text": "Tim Cook", "entities": []}\n', "would overwrite"),
])
def test_bad_batch_files_are_named_and_nothing_is_written(tmp_path, name, content, message):
    model = Scripted('{"entities": []}')
    if content is not None:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(AnalysisInputError, match=message):
        extract_file(model, tmp_path / name, tmp_path / "out.jsonl")
    assert not model.calls and list(tmp_path.iterdir()) == ([tmp_path / name] if content is not None else [])


def test_command_on_text_csv_and_jsonl(default_model, short, tmp_path, monkeypatch):
    from muse.cli import app

    monkeypatch.setattr(muse, "load", lambda *a, **k: default_model)
    r = CliRunner().invoke(app, ["extract", "--text", SHORT, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == short.to_dict()
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": SHORT, "n": 1}) + "\n", encoding="utf-8")
    r = CliRunner().invoke(app, ["extract", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.csv")])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "out.csv", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert json.loads(row["entities"]) == short.entities and row["model"] == default_model.name
    (tmp_path / "in.csv").write_text(f"text\n{SHORT}\n", encoding="utf-8")
    r = CliRunner().invoke(app, ["extract", str(tmp_path / "in.csv"), "-o", str(tmp_path / "out.jsonl")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))["entities"] == short.entities


def test_command_fields_from_a_schema_file(default_model, tmp_path, monkeypatch):
    from muse.cli import app

    monkeypatch.setattr(muse, "load", lambda *a, **k: default_model)
    (tmp_path / "person.json").write_text(json.dumps(PERSON), encoding="utf-8")
    (tmp_path / "bio.txt").write_text("Ada Lovelace was born in London in 1815.", encoding="utf-8")
    r = CliRunner().invoke(app, ["extract", "--schema", str(tmp_path / "person.json"), str(tmp_path / "bio.txt")])
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.stdout), PERSON)


def test_command_sends_chinese_to_the_bilingual_model(qwen, qwen_gguf, default_model, tmp_path, monkeypatch):
    from muse.cli import app

    loaded = []

    def load(name=None, **kwargs):
        loaded.append(name)
        return qwen if name == "qwen2.5-0.5b" else default_model

    monkeypatch.setattr(muse, "load", load)
    real = BundledModel.installed_file  # the joined GGUF lives in the session's MUSE_HOME, not this test's
    monkeypatch.setattr(BundledModel, "installed_file",
                        lambda self: qwen_gguf if self.name == "qwen2.5-0.5b" else real(self))
    text = "李娜在成都开了一家咖啡馆。"
    r = CliRunner().invoke(app, ["extract", "--text", text, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert loaded == ["qwen2.5-0.5b"] and out["model"] == qwen.name  # decided without loading the default first
    assert "answered by qwen2.5-0.5b" in r.output
    _assert_offsets(text, out["entities"])
    assert {"type": "person", "text": "李娜", "start": 0, "end": 2} in out["entities"]


@pytest.mark.parametrize("args,message", [
    (["extract"], "give a FILE"),
    (["extract", "a.txt", "--text", "hi"], "give a FILE"),
    (["extract", "missing.txt"], "missing.txt does not exist"),
    (["extract", "gbk.txt"], "not UTF-8"),
    (["extract", "--text", "   "], "the text is empty"),
    (["extract", "rows.csv"], "give --output"),
    (["extract", "--text", "hi", "--schema", "bad.json"], "not valid JSON"),
    (["extract", "--text", "hi", "--schema", "lookbehind.json"], "constraint is not usable"),
    (["extract", "--text", "hi", "--only"], "--only needs --types"),
    (["extract", "--text", "hi", "--types", "two words"], "entity type 'two words'"),
])
def test_command_reports_bad_input_in_one_line_and_writes_nothing(args, message, tmp_path, monkeypatch):
    from muse.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(muse, "load", lambda *a, **k: Model(None, None, {"name": "scripted"}))
    (tmp_path / "gbk.txt").write_bytes("北京".encode("gbk"))
    (tmp_path / "rows.csv").write_text("text\nhi\n", encoding="utf-8")
    (tmp_path / "bad.json").write_text('{"type": ', encoding="utf-8")
    (tmp_path / "lookbehind.json").write_text(json.dumps(
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}), encoding="utf-8")
    before = set(tmp_path.iterdir())
    r = CliRunner().invoke(app, args + ["-o", "out.json"] if "rows.csv" not in args else args)
    assert r.exit_code in (1, 2) and "Traceback" not in r.output, r.output
    assert message in " ".join(r.stderr.split())
    assert set(tmp_path.iterdir()) == before


# -- the server ----------------------------------------------------------------------

def test_server_extract_route(tiny):
    from fastapi.testclient import TestClient

    from muse.server import create_app

    with TestClient(create_app({"tiny": tiny}, embedder=None), base_url=LOCAL) as c:
        r = c.post("/api/extract", json={"text": EN, "types": ["product"]})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == "tiny" and set(out) == {"entities", "model", "dropped"}
        _assert_offsets(EN, out["entities"])
        assert all(e["type"] in check_types(None, ["product"]) for e in out["entities"])
        r = c.post("/api/extract", json={"text": EN, "schema": PERSON, "max_tokens": 200})
        assert r.status_code == 200, r.text
        jsonschema.validate(r.json()["fields"], PERSON)
        bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}
        for body in ({"text": EN, "schema": bad}, {"text": ""}, {"text": "  "}, {"text": EN, "types": ["two words"]}):
            r = c.post("/api/extract", json=body)
            assert r.status_code == 400 and r.json()["error"]["message"], (body, r.text)
