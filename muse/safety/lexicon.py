"""The moderation lexicon: curated regular expressions per category and language, and the scanner.

The word lists live in `muse/safety_data/lexicon.toml` (its header explains the format). A category
scores 1 - prod(1 - weight) over the distinct terms that match: one strong term (0.9) or two weak
ones (0.4 each) reach the default threshold of 0.5. Look-alike phrases ("kill the process",
"大麻烦", "跳楼价") are removed before a category is matched, which is how context keeps
precision up without an ML model.
"""

from __future__ import annotations

import functools
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from muse.errors import MuseError
from muse.safety.normalize import variants

CATEGORIES = ("violence", "self_harm", "sexual_minors", "hate", "weapons", "sexual", "harassment", "drugs")
LANGS = ("en", "zh")
_MACRO = re.compile(r"<<(\w+)>>")
# Combos must meet inside one sentence, so a long text does not pair words pages apart.
_SENTENCE_END = re.compile(r"[.!?。！？;；\n]+")


@dataclass
class Term:
    regex: re.Pattern
    weight: float
    kind: str        # strong | weak | combo
    lang: str
    source: str      # the lexicon pattern, for reports
    partner: re.Pattern | None = None   # combos: the second pattern that must share the sentence


@dataclass
class Category:
    name: str
    description: str
    description_zh: str
    benign: re.Pattern | None
    terms: list[Term] = field(default_factory=list)


@dataclass
class Scan:
    """What the lexicon found: scores per category (all of them), which have a strong match, and the hits."""
    scores: dict[str, float]
    strong: set[str]
    matches: list[dict]      # {"category", "kind", "lang", "text" (the normalised text that matched)}


def lexicon_path() -> Path:
    return Path(str(resources.files("muse") / "safety_data" / "lexicon.toml"))


def _compile(pattern: str, lang: str, macros: dict[str, str], where: str) -> re.Pattern:
    def expand(m: re.Match) -> str:
        if m.group(1) not in macros:
            raise MuseError(f"{where}: unknown macro <<{m.group(1)}>> in {pattern!r}; define it under [macros]")
        return macros[m.group(1)]

    source = _MACRO.sub(expand, pattern)
    if lang == "en":  # whole words only: "kill" must not match "skill"
        source = f"(?<![a-z0-9])(?:{source})(?![a-z0-9])"
    try:
        return re.compile(source)
    except re.error as e:
        raise MuseError(f"{where}: the pattern {pattern!r} is not a valid regular expression ({e})") from None


def _union(patterns: list[tuple[str, str]], macros: dict[str, str], where: str) -> re.Pattern | None:
    parts = [_compile(p, lang, macros, where).pattern for p, lang in patterns]
    return re.compile("|".join(parts)) if parts else None


def _category(name: str, spec: dict, common: list[tuple[str, str]], macros: dict, weights: dict,
              where: str) -> Category:
    benign = list(common)
    terms: list[Term] = []
    for lang in LANGS:
        part = spec.get(lang, {})
        here = f"{where} [{name}.{lang}]"
        benign += [(p, lang) for p in part.get("benign", [])]
        for kind in ("strong", "weak"):
            terms += [Term(_compile(p, lang, macros, here), weights[kind], kind, lang, p) for p in part.get(kind, [])]
        for pair in part.get("combos", []):
            if len(pair) != 2:
                raise MuseError(f"{here}: each combo is a pair [A, B], got {pair!r}")
            a, b = (_compile(p, lang, macros, here) for p in pair)
            terms.append(Term(a, weights["combo"], "combo", lang, " + ".join(pair), partner=b))
    return Category(name, spec.get("description", name), spec.get("description_zh", name),
                    _union(benign, macros, f"{where} [{name}] benign"), terms)


@functools.lru_cache(maxsize=4)
def load_lexicon(path: str | None = None) -> dict[str, Category]:
    """Compile a lexicon file (default: the bundled one) into categories."""
    file = Path(path) if path else lexicon_path()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MuseError(f"Cannot read the moderation lexicon {file}: {e}") from None
    macros = data.get("macros", {})
    weights = {"strong": 0.9, "weak": 0.4, "combo": 0.9, **data.get("weights", {})}
    common = [(p, lang) for lang in LANGS for p in data.get("common", {}).get(f"benign_{lang}", [])]
    unknown = set(data) - set(CATEGORIES) - {"macros", "weights", "common"}
    if unknown:
        raise MuseError(f"{file}: unknown categories {sorted(unknown)}; the categories are {', '.join(CATEGORIES)}")
    return {name: _category(name, data.get(name, {}), common, macros, weights, str(file)) for name in CATEGORIES}


def _hits(cat: Category, text: str) -> list[tuple[Term, str]]:
    """(term, matched text) for every term of `cat` in `text` (benign look-alikes removed first)."""
    if cat.benign is not None:
        text = cat.benign.sub(" ", text)
    found = []
    for term in cat.terms:
        if term.partner is None:
            m = term.regex.search(text)
            if m:
                found.append((term, m.group(0)))
            continue
        for sentence in _SENTENCE_END.split(text):
            a, b = term.regex.search(sentence), term.partner.search(sentence)
            if a and b:
                found.append((term, f"{a.group(0)} … {b.group(0)}"))
                break
    return found


def scan(text: str, path: str | None = None) -> Scan:
    """Score `text` against every category of the lexicon (both languages, both normalised variants)."""
    lex = load_lexicon(path)
    forms = variants(text)
    scores, strong, matches = {}, set(), []
    for name, cat in lex.items():
        seen: dict[int, Term] = {}
        for form in forms:
            for term, matched in _hits(cat, form):
                if id(term) not in seen:
                    seen[id(term)] = term
                    matches.append({"category": name, "kind": term.kind, "lang": term.lang, "text": matched})
        scores[name] = round(1.0 - math.prod(1.0 - t.weight for t in seen.values()), 4)
        if any(t.kind != "weak" for t in seen.values()):
            strong.add(name)
    return Scan(scores, strong, matches)
