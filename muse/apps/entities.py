"""Information extraction: named entities with character offsets, and fields from a JSON schema.

The model is asked only for each entity's type and text, its output held to a JSON schema by
constrained decoding (`muse.Constraint`, llguidance), so the reply always parses. Muse then finds
each text in the input and reports its offsets: every entity returned has
`text == input[start:end]`; a text the model made up (not in the input) is dropped and counted.

>>> extract_entities(model, "Tim Cook visited Berlin on Monday.")
Extraction(entities=[{'type': 'person', 'text': 'Tim Cook', 'start': 0, 'end': 8}, ...], model='smollm2-135m', ...)
>>> extract_fields(model, "Ada Lovelace, born 1815 in London.", {"type": "object", "properties": {...}})
{'name': 'Ada Lovelace', 'born': 1815, ...}

Chinese text needs a bilingual model (`check_language` raises LanguageError otherwise); the CLI picks
it by language as `muse serve` does (Chinese → qwen2.5-0.5b when no --model is given).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable

from muse.apps.analysis import AnalysisInputError, _format, _write_rows, read_rows
from muse.apps.language import check_language
from muse.errors import MuseError
from muse.sampling import Constraint

DEFAULT_TYPES = ("person", "organization", "location", "time", "money")
TYPE_ALIASES = {"place": "location", "org": "organization", "date": "time", "per": "person", "loc": "location"}
MAX_ENTITIES = 24     # schema maxItems: bounds the output of a model that would list forever
MAX_ENTITY_CHARS = 64  # schema maxLength of one entity's text: names, not sentences
MAX_SPAN_WORDS = 12    # an entity's text is at most this many words (Han characters count one each)
MAX_SPAN_CHOICES = 4000  # beyond this many candidate spans the text is a free string (maxLength bound)
FIELDS_TOKENS = 512    # extract_fields' default token limit: room for a schema's worth of JSON
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PIECE = re.compile(rf"[{_HAN}]|[^\W{_HAN}]+|[^\w\s]")  # a Han character, a word, or one symbol
_EDGE = set(",;:!?()[]{}\"'“”‘’，。、；：！？（）《》【】")  # no span starts or ends with these

# What each default type covers, per instruction language; a user's own type is described by its name.
_DESCRIBE = {
    "en": {"person": "people's names", "organization": "companies, institutions, teams, agencies",
           "location": "places: countries, cities, regions, streets, rivers, buildings",
           "time": "dates and times, as written", "money": "amounts of money with their currency"},
    "zh": {"person": "人名", "organization": "公司、机构、学校、球队、政府部门", "location": "地名：国家、城市、地区、街道、河流、建筑",
           "time": "日期和时间（照原文）", "money": "金额（连同货币单位）"},
}
_INSTRUCTION = {
    "en": ("Extract the named entities from the text. Types: {types}. Copy each entity's text exactly as it "
           "appears in the text, list each one once, and answer with JSON only."),
    "zh": "从文本中抽取命名实体。类型：{types}。实体文本必须与原文一字不差，每个实体列出一次，只用 JSON 回答。",
}
_TEXT = {"en": "Text: {text}", "zh": "文本：{text}"}
# Few-shot: one English and one Chinese worked example, whatever the text's language (measured on the
# dev split: see bench/extract.py). Compact JSON, so the model answers compactly too.
_SHOTS = (
    ("Maria Lopez joined Siemens in Munich on 3 May 2021 for a salary of €60,000.",
     [("person", "Maria Lopez"), ("organization", "Siemens"), ("location", "Munich"),
      ("time", "3 May 2021"), ("money", "€60,000")]),
    ("去年十月，王伟在上海加入了华为公司，月薪两万元。",
     [("time", "去年十月"), ("person", "王伟"), ("location", "上海"), ("organization", "华为公司"),
      ("money", "两万元")]),
)


class ExtractionError(MuseError):
    """Output that could not be turned into the requested result (e.g. cut off by the token limit)."""


@dataclasses.dataclass
class Extraction:
    """What `extract_entities` found.

    entities: [{"type", "text", "start", "end"}] in input order, `text == input[start:end]`.
    model: the name of the model that answered. dropped: entities whose text is not in the input.
    valid: whether the model's raw reply parsed as the requested JSON (always, when constrained).
    raw: that reply.
    """
    entities: list[dict]
    model: str
    dropped: list[dict] = dataclasses.field(default_factory=list)
    valid: bool = True
    raw: str = ""

    def to_dict(self) -> dict:
        return {"entities": self.entities, "model": self.model, "dropped": len(self.dropped)}


# -- types and schema -----------------------------------------------------------------

def check_types(types=None, extra=None) -> list[str]:
    """Entity types as a list: `types` (default DEFAULT_TYPES) then `extra`, each a list or "a,b"
    string; lower-cased, aliases resolved (place → location), duplicates dropped. ValueError for a
    blank or odd name."""
    out: list[str] = []
    for group in (DEFAULT_TYPES if types is None else types, extra or ()):
        if isinstance(group, str):
            group = re.split(r"[,，]", group)
        for name in group:
            name = str(name).strip().lower()
            name = TYPE_ALIASES.get(name, name)
            if not _NAME.match(name):
                raise ValueError(f"entity type {name!r}: use a short name of letters, digits, - or _ "
                                 "(e.g. --types product,drug)")
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("give at least one entity type, e.g. --types person,product")
    return out


def candidate_spans(text: str, max_words: int = MAX_SPAN_WORDS) -> list[str]:
    """Every run of 1..max_words words of `text` (Han characters one word each; punctuation its own),
    not starting or ending with punctuation such as , ( 。: what an entity's text may be."""
    pieces = [(m.start(), m.end()) for m in _PIECE.finditer(text)]
    out: dict[str, None] = {}
    for i, (start, _) in enumerate(pieces):
        if text[start] in _EDGE:
            continue
        for j in range(i, min(i + max_words, len(pieces))):
            end = pieces[j][1]
            if text[end - 1] not in _EDGE:
                out[text[start:end]] = None
    return list(out)


def entity_schema(types: list[str], max_items: int = MAX_ENTITIES, max_chars: int = MAX_ENTITY_CHARS,
                  spans: list[str] | None = None) -> dict:
    """The JSON schema of the model's reply: {"entities": [{"text", "type"}, …]}.

    "text" comes first so the model copies the span before it names its type; both bounds keep a
    small model that would go on listing (or copy the whole sentence) from running long. With
    `spans` the text must be one of them (the input's own words: nothing made up)."""
    text = {"enum": spans} if spans else {"type": "string", "minLength": 1, "maxLength": max_chars}
    item = {"type": "object",
            "properties": {"text": text, "type": {"enum": list(types)}},
            "required": ["text", "type"], "additionalProperties": False}
    return {"type": "object", "properties": {"entities": {"type": "array", "items": item, "maxItems": max_items}},
            "required": ["entities"], "additionalProperties": False}


def _token_budget(text: str, max_items: int) -> int:
    """Enough tokens for `max_items` entities of compact JSON, each as long as the text's longest
    candidate span (in characters: a token is at least one character for the texts a model takes),
    so a constrained reply ends complete rather than cut off. Greedy decoding under the schema
    stops at the closing brace, so a generous budget costs nothing there."""
    longest = max((len(c) for c in candidate_spans(text)), default=1)
    return 24 + max_items * (24 + min(longest, MAX_ENTITY_CHARS))


# -- prompt ----------------------------------------------------------------------------

def messages_for(text: str, types: list[str], lang: str) -> list[dict]:
    """The chat: instruction (in the text's language) with two worked examples, then the text."""
    describe = _DESCRIBE[lang]
    sep = "; " if lang == "en" else "；"
    listed = sep.join(f"{t} ({describe[t]})" if t in describe else t for t in types)
    system = _INSTRUCTION[lang].format(types=listed)
    messages = [{"role": "system", "content": system}]
    for shot, ents in _SHOTS:
        kept = [{"text": t, "type": k} for k, t in ents if k in types]
        messages.append({"role": "user", "content": _TEXT[lang].format(text=shot)})
        messages.append({"role": "assistant", "content": json.dumps({"entities": kept}, ensure_ascii=False)})
    messages.append({"role": "user", "content": _TEXT[lang].format(text=text)})
    return messages


# -- parsing and offsets ---------------------------------------------------------------

_ITEM = re.compile(r"\{[^{}]*\}")


def parse_reply(raw: str, types: list[str]) -> tuple[list[dict], bool]:
    """(entities as [{"type", "text"}], whether `raw` was valid JSON of the requested shape).

    Invalid or cut-off replies are salvaged: every complete {...} object with a known type and a
    text is kept (so a reply stopped by the token limit still yields what it finished)."""
    body = raw.strip()
    if body.startswith("```"):  # a fenced block, as unconstrained models like to write
        body = re.sub(r"^```[a-zA-Z]*\s*|\s*```\s*$", "", body)
    valid, items = False, None
    try:
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("entities"), list):
            items, valid = data["entities"], True
    except json.JSONDecodeError:
        pass
    if items is None:
        items = []
        for m in _ITEM.finditer(raw):
            try:
                items.append(json.loads(m.group()))
            except json.JSONDecodeError:
                continue
    out = []
    for item in items:
        kind = item.get("type") if isinstance(item, dict) else None
        kind = TYPE_ALIASES.get(kind.lower(), kind.lower()) if isinstance(kind, str) else None
        text = item.get("text") if isinstance(item, dict) else None
        if kind in types and isinstance(text, str) and text.strip():
            out.append({"type": kind, "text": text})
        else:
            valid = False
    return out, valid


def _occurrences(haystack: str, needle: str) -> list[int]:
    starts, i = [], haystack.find(needle)
    while i >= 0:
        starts.append(i)
        i = haystack.find(needle, i + len(needle))
    return starts


def locate(text: str, found: list[dict]) -> tuple[list[dict], list[dict]]:
    """(entities with offsets, the dropped ones) for [{"type", "text"}] found in `text`.

    Each entity text is located at every place it occurs (a name mentioned twice is two entities),
    matched exactly, else ignoring case (the input's own spelling is reported). Overlaps are resolved
    in favour of the longer span ("New York Times" over "New York"), then the one named first; a
    text found nowhere is dropped. Always `text[start:end] == entity["text"]`."""
    folded = text.casefold() if len(text.casefold()) == len(text) else None
    spans, dropped, seen = [], [], set()
    for rank, ent in enumerate(found):
        needle = ent["text"].strip()
        key = (ent["type"], needle)
        if key in seen:
            continue
        seen.add(key)
        starts = _occurrences(text, needle) if needle else []
        if not starts and needle and folded is not None and len(needle.casefold()) == len(needle):
            starts = _occurrences(folded, needle.casefold())
        if not starts:
            dropped.append(ent)
        spans += [(s, s + len(needle), rank, ent["type"]) for s in starts]
    spans.sort(key=lambda s: (-(s[1] - s[0]), s[2], s[0]))
    taken: list[tuple[int, int, int, str]] = []
    for span in spans:
        if all(span[1] <= t[0] or span[0] >= t[1] for t in taken):
            taken.append(span)
    taken.sort()
    return [{"type": kind, "text": text[s:e], "start": s, "end": e} for s, e, _, kind in taken], dropped


# -- public API ------------------------------------------------------------------------

def check_text(text) -> str:
    """`text` if it is a string with something in it; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("the text is empty: give some text to extract from")
    return text


def extract_entities(model, text: str, types=None, *, extra_types=None, constrained: bool = True,
                     spans: bool = True, max_new_tokens: int | None = None,
                     max_items: int | None = None) -> Extraction:
    """Named entities of `text` with offsets (see the module docstring), greedy decoding.

    types: default DEFAULT_TYPES; extra_types are added to them (e.g. ["product", "drug"]).
    spans (constrained only): the schema allows as an entity's text only runs of the input's own
    words (`candidate_spans`, while there are at most MAX_SPAN_CHOICES), so the model cannot make
    one up; otherwise any string up to MAX_ENTITY_CHARS.
    max_items: the most entities the reply may list; default one per four words of the text (at
    least 6, at most MAX_ENTITIES), so a model that repeats itself stops soon.
    constrained=False asks the same prompt without the schema and salvages what parses (for
    comparison: `valid` then says whether the reply was valid JSON of the right shape).
    Chinese text needs a bilingual model (LanguageError otherwise)."""
    text = check_text(text)
    types = check_types(types, extra_types)
    lang = check_language(model, text)
    if max_items is None:
        max_items = max(6, min(MAX_ENTITIES, len(_PIECE.findall(text)) // 4))
    choices = candidate_spans(text) if constrained and spans else None
    schema = entity_schema(types, max_items, spans=choices if choices and len(choices) <= MAX_SPAN_CHOICES else None)
    kwargs = {"constraint": Constraint.json_schema(schema)} if constrained else {}
    budget = max_new_tokens if max_new_tokens is not None else _token_budget(text, max_items)
    raw = model.chat(messages_for(text, types, lang), temperature=0, max_new_tokens=budget, **kwargs)
    found, valid = parse_reply(raw, types)
    entities, dropped = locate(text, found)
    return Extraction(entities, model.name, dropped, valid, raw)


def check_schema(schema) -> dict:
    """A user's JSON schema for `extract_fields`: a dict, JSON text, or the path of a JSON file,
    describing an object; ValueError otherwise. Whether the engine can compile it is checked when it runs."""
    if isinstance(schema, str) and schema.lstrip().startswith("{"):
        schema = _parse_schema(schema, "the schema")
    elif isinstance(schema, (str, Path)):
        path = Path(schema)
        try:
            raw = path.read_text(encoding="utf-8-sig")
        except (FileNotFoundError, IsADirectoryError):
            raise ValueError(f"schema file {path} does not exist") from None
        except UnicodeDecodeError:
            raise ValueError(f"schema file {path} is not UTF-8 text") from None
        schema = _parse_schema(raw, f"schema file {path}")
    if not isinstance(schema, dict):
        raise ValueError("the schema must be a JSON object, e.g. {\"type\": \"object\", \"properties\": {…}}")
    if schema.get("type", "object") != "object":
        raise ValueError(f"the schema must describe an object (\"type\": \"object\"), not {schema.get('type')!r}")
    return schema


def _parse_schema(raw: str, what: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


_FIELDS_INSTRUCTION = {
    "en": "Extract the information from the text as JSON with these fields (JSON schema):\n{schema}\n"
          "Use the words of the text; leave out what the text does not say unless a field is required.",
    "zh": "从文本中提取信息，按以下字段（JSON schema）输出 JSON：\n{schema}\n尽量使用原文的词语；文本没有提到的可选字段不要填写。",
}


def extract_fields(model, text: str, schema, *, max_new_tokens: int = FIELDS_TOKENS) -> dict:
    """A JSON object valid against the user's `schema`, filled from `text` (greedy, constrained).

    A schema the engine cannot use is a `muse.constrain.ConstraintError`; a reply the token limit
    cut off is an ExtractionError (raise max_new_tokens)."""
    text = check_text(text)
    schema = check_schema(schema)
    lang = check_language(model, text)
    constraint = Constraint.json_schema(schema)
    check_constraint(constraint)  # a clear one-line error before the prompt runs
    messages = [{"role": "system", "content": _FIELDS_INSTRUCTION[lang].format(
                    schema=json.dumps(schema, ensure_ascii=False))},
                {"role": "user", "content": _TEXT[lang].format(text=text)}]
    raw = model.chat(messages, temperature=0, max_new_tokens=max_new_tokens, constraint=constraint)
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ExtractionError(f"the reply was cut off at {max_new_tokens} tokens before the JSON was complete; "
                              "allow more with --max-tokens or ask for fewer fields") from None


def check_constraint(constraint: Constraint) -> None:
    """`muse.constrain.check`, its ConstraintError on one line."""
    from muse.constrain import ConstraintError, check

    try:
        check(constraint)
    except ConstraintError as e:
        raise ConstraintError(" ".join(str(e).split())) from None


# -- files -----------------------------------------------------------------------------

def read_batch(path_in: str | Path, column: str = "text") -> tuple[list[dict], list[str]]:
    """`read_rows`, and an AnalysisInputError naming the first record whose text is empty."""
    rows, fields = read_rows(path_in, column)
    for i, row in enumerate(rows, 1):
        if not row[column].strip():
            raise AnalysisInputError(f"{path_in} record {i}: the '{column}' text is empty; "
                                     "remove the row or fill it in")
    return rows, fields


def extract_file(model_for: "Callable[[str], object] | object", path_in: str | Path, path_out: str | Path,
                 column: str = "text", types=None, extra_types=None, schema=None,
                 progress: Callable[[int, int], None] | None = None) -> int:
    """Extract from the `column` of every record of a .csv/.jsonl file (muse.apps.analysis.read_rows).

    `model_for` is a model, or a function from a language ("en"/"zh") to the model for it. Writes
    the records to `path_out` (.csv or .jsonl) with `entities` (or, with `schema`, `fields`) and
    `model` added. Returns the number of records. Everything is checked before the model runs (an
    empty text is an error naming its record) and the output appears only when complete."""
    from muse.text import language

    path_in, path_out = Path(path_in), Path(path_out)
    _format(path_out)
    types = check_types(types, extra_types)
    schema = check_schema(schema) if schema is not None else None
    if schema is not None:
        check_constraint(Constraint.json_schema(schema))
    rows, fields = read_batch(path_in, column)
    added = ["fields" if schema is not None else "entities", "model"]
    clash = [name for name in added if name in fields]
    if clash:
        raise AnalysisInputError(f"{path_in} already has the field(s) {', '.join(clash)} that the results "
                                 "would overwrite; rename them and run again")
    pick = model_for if callable(model_for) and not hasattr(model_for, "chat") else (lambda lang: model_for)
    out = []
    for i, row in enumerate(rows):
        text = row[column]
        model = pick(language(text))
        if schema is not None:
            result = {"fields": extract_fields(model, text, schema), "model": model.name}
        else:
            x = extract_entities(model, text, types)
            result = {"entities": x.entities, "model": x.model}
        out.append({**row, **result})
        if progress is not None:
            progress(i + 1, len(rows))
    _write_rows(path_out, out, fields + added)
    return len(out)


# -- metric ----------------------------------------------------------------------------

@dataclasses.dataclass
class Counts:
    """Matched, predicted and gold entity counts; precision, recall and F1 from them."""
    tp: int = 0
    pred: int = 0
    gold: int = 0

    @property
    def precision(self) -> float:
        return self.tp / self.pred if self.pred else (1.0 if not self.gold else 0.0)

    @property
    def recall(self) -> float:
        return self.tp / self.gold if self.gold else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.pred + other.pred, self.gold + other.gold)


MATCHES = ("exact", "partial", "text")


def _same(g: dict, p: dict, match: str) -> bool:
    if match == "exact":
        return (g["type"], g["start"], g["end"]) == (p["type"], p["start"], p["end"])
    if match == "partial":
        return g["type"] == p["type"] and g["start"] < p["end"] and p["start"] < g["end"]
    return g["type"] == p["type"] and g["text"] == p["text"]


def match_counts(gold: list[dict], pred: list[dict], match: str = "exact") -> Counts:
    """Entity-level counts for one text, each gold entity matched at most once.

    exact: same type and span; partial: same type, spans overlap; text: same type and text, wherever
    it is (offsets ignored)."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
    free = list(gold)
    tp = 0
    for p in pred:
        hit = next((g for g in free if _same(g, p, match)), None)
        if hit is not None:
            free.remove(hit)
            tp += 1
    return Counts(tp, len(pred), len(gold))


def score(pairs, match: str = "exact") -> Counts:
    """Micro-averaged counts over (gold, predicted) entity lists."""
    total = Counts()
    for gold, pred in pairs:
        total = total + match_counts(gold, pred, match)
    return total


def load_ner(lang: str, split: str) -> list[dict]:
    """muse/eval/data/ner_{lang}_{split}.jsonl: [{"text", "entities": [{"type", "text", "start", "end"}]}]."""
    path = Path(__file__).resolve().parent.parent / "eval" / "data" / f"ner_{lang}_{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
