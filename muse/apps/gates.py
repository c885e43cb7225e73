"""Output gates: checks on a writing action's finished output against its input, run before the
output is shown as done or saved (issue #15).

    >>> check("translate", "预算是30万元。", "The budget is $30,000.")
    [Problem(gate='invented', message='not in the text: 30,000 (numbers, dates, amounts)', items=('30,000',))]

Each gate returns `Problem`s a user can read; an empty list means the output passed:
- `repetition`: a line or sentence repeated (or nearly: ≥ 90 % alike), or a phrase looping, more
  often than in the input;
- `preamble`: a leftover "Here is…" / "The short answer is:" / "以下是…：" line or label
  (the patterns of `muse.apps.cleaning`, applied to every line);
- `commentary`: an answer that opens by talking about the text ("I've made these changes: …");
- `unchanged`: a rewrite or translation that gives the input back;
- `invented`: numbers, dates and amounts (compared by value across scripts: 30万 = 300,000 =
  300000 = 三十万) and names (capitalised words inside a sentence; Chinese place, firm and person
  names before 路/公司/经理…) that the input does not have;
- `dropped`: the input's numbers, dates and amounts (and, in the same language, names) that the
  output lost;
- `length`: shorten ≤ 75 % of the input, expand ≥ 110 %, summarize within its requested length;
- `shape`: titles = N distinct short lines, not prose; outline = bulleted or numbered lines;
- `language`: a translation whose script shows it is not in the target language (`wrong_script`).

`repair` fixes what needs no model first: repeated lines, leftover labels, surplus titles, and the
Chinese names a translation into English left in characters (in pinyin: `muse.text.romanize`).

Which gates apply depends on the action (`GATES`). Lengths are words for English and Han
characters for Chinese. The checks are plain string work: no model, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import SequenceMatcher

from muse.apps.cleaning import PREAMBLES
from muse.apps.language import writes_cjk
from muse.text import HAN, has_number, language, numbers, romanize, sentence_spans, sentences, strip_list_marker

SHORTEN_MAX = 0.75   # shorten: at most this share of the input's length
SHORTEN_MIN = 0.2    # and at least this share: less is a headline, not the text's key points
TOO_SHORT = "too short to keep the key points"  # how that length problem's message starts
EXPAND_MIN = 1.10    # expand: at least this share
SUMMARY_SLACK = 1.5  # summarize: at most this times the requested length (default: SUMMARY_MAX of the input)
SUMMARY_MAX = 0.6
NEAR = 0.9           # two sentences this alike (difflib ratio) count as a repeat
TITLES = 5           # what the titles prompt asks for

# action → the gates that apply to it
# ("unchanged" is not a gate of polish: a text without mistakes may rightly come back as it was.)
GATES: dict[str, tuple[str, ...]] = {
    "rewrite": ("repetition", "preamble", "commentary", "unchanged", "invented", "dropped"),
    "polish": ("repetition", "preamble", "commentary", "invented", "dropped"),
    # shorten keeps the facts (every number, date, amount and name) and drops the words around them
    "shorten": ("repetition", "preamble", "commentary", "invented", "dropped", "length"),
    "expand": ("repetition", "preamble", "commentary", "numbers", "dropped", "length"),
    "summarize": ("repetition", "preamble", "commentary", "invented", "length"),
    "translate": ("repetition", "preamble", "commentary", "unchanged", "numbers", "dropped", "language"),
    "titles": ("preamble", "shape"),
    "outline": ("repetition", "preamble", "numbers", "shape"),
    "continue": ("repetition",),
}


@dataclass(frozen=True)
class Problem:
    gate: str     # repetition | preamble | commentary | unchanged | invented | dropped | length | shape | language
    message: str  # what is wrong, for the user
    items: tuple[str, ...] = ()  # invented / dropped: every number or name at fault (the message shows 6)

    def __str__(self) -> str:
        return f"{self.gate}: {self.message}"


def check(action: str, source: str, output: str, *, length: int | None = None, titles: int = TITLES,
          to: str | None = None) -> list[Problem]:
    """The problems of `output`, what `action` made of `source` (empty: it passed). `length` is
    summarize's requested length; `titles` how many titles were asked for; `to` a translation's
    target (a writer.LANGUAGES code)."""
    gates = GATES.get(action, ("repetition", "preamble"))
    problems: list[Problem] = []
    if not output.strip():
        return [Problem("shape", "the output is empty")]
    if "repetition" in gates:
        problems += repetition(source, output)
    if "preamble" in gates:
        problems += preambles(source, output)
    if "commentary" in gates:
        problems += commentary(source, output)
    if "unchanged" in gates:
        problems += unchanged(source, output)
    if "invented" in gates or "numbers" in gates:
        problems += invented(source, output, names="invented" in gates and not _crosses_scripts(source, output))
    if "dropped" in gates:
        problems += dropped(source, output)
    if "length" in gates:
        problems += length_target(action, source, output, length)
    if "language" in gates and to:
        problems += wrong_script(source, output, to)
    if action == "titles":
        problems += titles_shape(source, output, titles)
    elif action == "outline":
        problems += outline_shape(output)
    return problems


def summary(problems: list[Problem]) -> str:
    """The problems as one line."""
    return "; ".join(str(p) for p in problems)


def repair(action: str, source: str, output: str, titles: int = TITLES, to: str | None = None) -> str:
    """`output` with what can be fixed without the model fixed: a line or sentence repeated word for
    word is kept once (unless the source repeats it too), a leftover label line ("The short answer
    is:") is dropped, titles keep the first `titles` distinct ones, and a translation into a language
    not written in CJK characters (`to`) writes the Chinese words it left in pinyin (`romanize`). What
    is left is for `check`."""
    twice = {u for u in _units(source) if _units(source).count(u) > 1}
    src = _norm(source)
    seen: set[str] = set()
    lines = []
    for line in output.splitlines():
        head = strip_list_marker(line).strip()
        m = _LABEL.match(head) or next((p.match(head) for p in PREAMBLES if p.match(head)), None)
        if m and m.end() > 0 and _norm(head[:m.end()]) not in src:
            rest = head[m.end():].strip()
            if not rest:
                continue
            line = line[:len(line) - len(line.lstrip())] + rest
        kept, spans = [], sentence_spans(line)
        for a, b in spans:
            n = _norm(strip_list_marker(line[a:b]))
            if n and n in seen and n not in twice and (len(n.split()) >= 2 or _han(n) >= 4):
                continue
            seen.add(n)
            kept.append(line[a:b])
        if spans and not kept:
            continue
        lines.append(line[:spans[0][0]] + "".join(kept) if spans else line)
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if out == re.sub(r"\n{3,}", "\n\n", "\n".join(output.splitlines())).strip():
        out = output  # nothing to fix: exactly as generated (its white space too)
    if action == "shorten":
        out = _trim_plain_sentences(source, out)
    if action == "titles":
        picked, seen_titles = [], []
        for line in out.splitlines():
            t = _norm(strip_list_marker(line))
            if t and not any(t == s or SequenceMatcher(None, t, s).ratio() >= NEAR for s in seen_titles):
                seen_titles.append(t)
                picked.append(line)
        out = "\n".join(strip_list_marker(line).strip() for line in picked[:titles])  # renumbered: plain lines
    if action == "translate" and to and not writes_cjk(to) and language(out) != "zh":
        out = romanize(out)
    return out


def _trim_plain_sentences(source: str, output: str) -> str:
    """A shortening that came back too long (the small models often copy the text) loses its
    sentences that carry no number, date, amount or name, last first (closing formulas, asides),
    until it is SHORTEN_MAX of the source's length; the facts and the opening sentence stay.
    Unchanged if that is not enough."""
    limit = SHORTEN_MAX * size(source)
    if size(output) <= limit:
        return output
    lines = output.splitlines()
    spans = {i: sentence_spans(line) for i, line in enumerate(lines)}
    ordered = [(i, a, b) for i, line_spans in spans.items() for a, b in line_spans]
    plain = [(i, a, b) for i, a, b in ordered[1:]  # the first sentence stays: it usually says what the text is about
             if not numbers(lines[i][a:b]) and not _new_names("", lines[i][a:b])]
    drop: set[tuple[int, int, int]] = set()
    left = size(output)
    for i, a, b in reversed(plain):
        if left <= limit:
            break
        drop.add((i, a, b))
        left -= size(lines[i][a:b])
    if left > limit:
        return output
    kept = []
    for i, line in enumerate(lines):
        if not spans[i]:
            kept.append(line)
            continue
        text = line[:spans[i][0][0]] + "".join(line[a:b] for a, b in spans[i] if (i, a, b) not in drop)
        if text.strip():
            kept.append(text)
    return "\n".join(kept).strip()


# -- repetition -----------------------------------------------------------------------------

def _norm(s: str) -> str:
    return re.sub(r"[\W_]+", " ", s.lower()).strip()


def _units(text: str) -> list[str]:
    """Lines, and the sentences of each line, normalised; short ones (one word, < 4 Han) left out."""
    out = []
    for line in text.splitlines():
        line = strip_list_marker(line)
        if not line.strip():
            continue
        parts = sentences(line) or [line]
        for u in ([line] if len(parts) > 1 else []) + parts:
            n = _norm(u)
            if len(n.split()) >= 2 or _han(n) >= 4:
                out.append(n)
    return out


def repetition(source: str, output: str) -> list[Problem]:
    """A sentence or line the output repeats (exactly or ≥ NEAR alike) more often than the input, or
    a phrase of ≥ 4 words / 8 characters looping three times or more."""
    have = _units(source)
    seen: list[str] = []
    for u in _units(output):
        twin = next((s for s in seen if s == u or (abs(len(s) - len(u)) < 0.2 * max(len(s), len(u))
                                                   and SequenceMatcher(None, s, u).ratio() >= NEAR)), None)
        if twin is not None and sum(1 for h in have if h == u) < 2:
            times = 1 + sum(1 for s in _units(output) if s == twin or SequenceMatcher(None, s, twin).ratio() >= NEAR)
            return [Problem("repetition", f"repeated {times - 1 if times > 2 else 2} times: "
                                          f"{_quote(u)}")]
        seen.append(u)
    loop = _loop(output)
    if loop and _loop(source) != loop:
        return [Problem("repetition", f"a phrase loops: {_quote(loop)}")]
    return []


def _loop(text: str) -> str | None:
    """A word 4-gram (English) or 8-character run (Chinese) occurring 3+ times."""
    words = _norm(text).split()
    counts: dict[str, int] = {}
    for i in range(len(words) - 3):
        g = " ".join(words[i:i + 4])
        counts[g] = counts.get(g, 0) + 1
        if counts[g] >= 3:
            return g
    han = re.sub(r"[^\u4e00-\u9fff]", "", text)
    for i in range(len(han) - 7):
        g = han[i:i + 8]
        if han.count(g) >= 3:
            return g
    return None


# -- preambles and labels -------------------------------------------------------------------

_LABEL = re.compile(
    r"^(?:(?:the|a|an|my|your)\s+)?(?:short|shortened|shorter|final|rewritten|revised|polished|corrected|"
    r"formal|casual|expanded|new|improved|edited)?\s*(?:answer|version|text|result|response|output|rewrite|summary|"
    r"outline|titles?|translation)(?:\s+(?:is|are|would be))?\s*[:：]", re.IGNORECASE)


def preambles(source: str, output: str) -> list[Problem]:
    """A line of the output (not also in the source) that is a preamble or label: "Here is…:",
    "The short answer is:", "Sure!", "以下是…：", "译文：" — anywhere, not only at the start."""
    src = _norm(source)
    for line in output.splitlines():
        s = strip_list_marker(line).strip()
        if not s or (_norm(s) and _norm(s) in src):
            continue
        head = s[:80]
        if _LABEL.match(head) or any(p.match(head) for p in PREAMBLES):
            return [Problem("preamble", f"a leftover preamble or label: {_quote(s)}")]
    return []


# -- invented facts -------------------------------------------------------------------------

_NAME = re.compile(r"\b[A-Z][A-Za-z'’\-]*[A-Za-z]\b|\b[A-Z]{2,}\b")
_HONORIFIC = {"Mr", "Mrs", "Ms", "Dr", "Dear", "I", "I'm", "I'll", "I've", "I'd", "OK", "Ok", "Hi", "Hello", "Thanks",
              "Thank", "Please", "Best", "Regards", "Sincerely", "Note", "P.S", "PS", "Yes", "No", "Oh", "Wow"}
_CN_NAME = re.compile(r"([\u4e00-\u9fff])(路|街|市|省|县|公司|餐馆|菜馆|饭店|酒店|大学|医院|银行|经理|先生|女士|老师|总监|小区|广场|中心)")
_CN_NOT_NAME = set("的是在了和与到为由从向对把被给也都就还又总副各该本此这那个新老大小请")


# An answer that talks about the text instead of being the text: "I've made these changes: …",
# "This sentence needs attention as it contains …", "以下是修改说明" — small models do it, and a retry's
# repair note invites it.
_COMMENTARY = re.compile(
    r"^(?:i(?:'ve| have)? (?:made|changed|corrected|revised|rewrote|rewritten|fixed|adjusted|improved)\b"
    r"|(?:this|the) (?:text|sentence|passage|paragraph|draft) (?:requires|needs|contains|has been|is written|uses)\b"
    r"|here (?:are|is) (?:the|some|a few|my) (?:changes|corrections|edits|adjustments|suggestions)\b"
    r"|(?:changes|corrections|edits) (?:made|i made)\s*:"
    r"|(?:我|以下)(?:对|是)?(?:原文|文本|这段话)?(?:做了|进行了)?(?:以下|如下)?(?:修改|改动|调整)(?:说明|之处|如下)?[：:])",
    re.IGNORECASE)


def commentary(source: str, output: str) -> list[Problem]:
    """An output that opens by talking about the text (its changes, its problems) instead of being it."""
    first = next((line.strip() for line in output.splitlines() if line.strip()), "")
    if _COMMENTARY.match(first) and not _COMMENTARY.match(source.strip()):
        return [Problem("commentary", f"talks about the text instead of rewriting it: {_quote(first)}")]
    return []


def unchanged(source: str, output: str) -> list[Problem]:
    """The output is the input given back word for word (rewrite, translate), white space aside; a
    change of case or punctuation counts as a change."""
    if " ".join(output.split()) == " ".join(source.split()):
        return [Problem("unchanged", "the output is the input, unchanged")]
    return []


def invented(source: str, output: str, names: bool = True) -> list[Problem]:
    """Numbers, dates and amounts in `output` whose value `source` does not have, and with `names`,
    names it does not have (English: capitalised words not at a sentence's start; Chinese: the
    character before 路, 公司, 经理 … with it)."""
    have = numbers(source, generous=True)
    new = [raw for value, raw in numbers(output).items()
           if value != 0 and not has_number(value, have)]
    problems = []
    if new:
        problems.append(Problem("invented", f"not in the text: {', '.join(new[:6])} (numbers, dates, amounts)",
                                tuple(new)))
    if names:
        extra = _new_names(source, output)
        if extra:
            problems.append(Problem("invented", f"names not in the text: {', '.join(extra[:6])}", tuple(extra)))
    return problems


def dropped(source: str, output: str) -> list[Problem]:
    """Numbers, dates and amounts of `source` that `output` lost, compared by value in any form the
    output may write them (1,350 = 1350, 39 dollars = $39, 1 September = September 1, 30万 = 300,000),
    and, in the same language, its names (as `invented` finds them): a rewrite, polish, expansion or
    translation keeps every one (shorten and summarize may drop)."""
    have = numbers(output, generous=True)
    readings = numbers(source, generous=True)  # also 5pm as 17: the output may write 17:00
    lost = []
    for value, raw in numbers(source).items():
        other = [v for v, r in readings.items() if re.match(re.escape(raw) + r"(?!\d)", r)]  # same written number
        if value != 0 and not any(has_number(v, have) for v in [value, *other]):
            lost.append(raw)
    problems = [Problem("dropped", f"lost from the text: {', '.join(lost[:6])} (numbers, dates, amounts)", tuple(lost))
                ] if lost else []
    names = [] if _crosses_scripts(source, output) else _new_names(output, source)  # the source's, not in the output
    if names:
        problems.append(Problem("dropped", f"names lost from the text: {', '.join(names[:6])}", tuple(names)))
    return problems


# The characters a text in these languages cannot do without: Chinese characters; kana or kanji; hangul.
_SCRIPTS = {"zh": f"[{HAN}]", "ja": f"[\u3040-\u30ff{HAN}]", "ko": "[\uac00-\ud7af]"}


def wrong_script(source: str, output: str, to: str) -> list[Problem]:
    """A translation whose script shows it is not in the language `to`: into Chinese, Japanese or
    Korean without a character of that script, or from Chinese into any other language still
    mostly Chinese. (Latin-script languages are not told apart: a word test would refuse good ones.)"""
    script = _SCRIPTS.get(to.split("-")[0])
    if script is not None:
        return [] if re.search(script, output) else [Problem("language", f"the translation has no {to} text in it")]
    if language(source) == "zh" and language(output) == "zh":
        return [Problem("language", "the translation is still mostly Chinese")]
    return []


_SHORT = {"mon": "monday", "tue": "tuesday", "tues": "tuesday", "wed": "wednesday", "thu": "thursday",
          "thur": "thursday", "thurs": "thursday", "fri": "friday", "sat": "saturday", "sun": "sunday",
          "jan": "january", "feb": "february", "mar": "march", "apr": "april", "jun": "june", "jul": "july",
          "aug": "august", "sep": "september", "sept": "september", "oct": "october", "nov": "november",
          "dec": "december"}


def _misspelt(word: str, words: set[str]) -> bool:
    """Whether `word` (5+ letters) is one of `words` but for one letter added, dropped, changed or two
    swapped (optimal string alignment distance 1): a polish that corrects "Feburary" keeps the name."""
    if len(word) < 5:
        return False
    for w in words:
        if abs(len(w) - len(word)) > 1 or len(w) < 5:
            continue
        i = next((k for k, (a, b) in enumerate(zip(w, word)) if a != b), min(len(w), len(word)))
        a, b = w[i:], word[i:]  # the rest after the first difference must match after one edit
        if a[1:] == b[1:] or a[1:] == b or a == b[1:] or (a[:2] == b[1::-1] and a[2:] == b[2:]):
            return True
    return False


def _new_names(source: str, output: str) -> list[str]:
    # a code's letters are a word without their hyphen: BK-5531 holds "bk"
    words = {w.lower().rstrip("'’-") for w in re.findall(r"[A-Za-z][A-Za-z'’\-]*", source)}
    words |= {_SHORT[w] for w in words if w in _SHORT}
    stems = {w[:5] for w in words if len(w) >= 5}
    extra: list[str] = []
    for line in output.splitlines():
        line = strip_list_marker(line)
        for sent in sentences(line) or [line]:
            for m in _NAME.finditer(sent):
                w = m.group(0)
                lead = sent[:m.start()]
                if not re.search(r"[A-Za-z0-9\u4e00-\u9fff]", lead) or re.search(r"[:：\"“(]\s*$", lead):
                    continue  # the first word of a sentence, or after a colon or quote
                key = w.lower().rstrip("'’s")
                if (w in _HONORIFIC or key in words or w.lower() in words or (len(key) >= 5 and key[:5] in stems)
                        or w in extra or _misspelt(key, words)):
                    continue
                extra.append(w)
    for m in _CN_NAME.finditer(output):
        if m.group(1) in _CN_NOT_NAME or m.group(0) in source:
            continue
        if m.group(0) not in extra:
            extra.append(m.group(0))
    return extra


def _crosses_scripts(source: str, output: str) -> bool:
    """Whether the output is in another language than the source (a translation): names change
    script then (王 → Wang), so only numbers can be compared."""
    return language(source) != language(output)


# -- length ---------------------------------------------------------------------------------

def size(text: str) -> int:
    """Han characters for Chinese text, words for any other."""
    return _han(text) if language(text) == "zh" else len(re.findall(r"[\w'’-]+", text))


def length_target(action: str, source: str, output: str, length: int | None = None) -> list[Problem]:
    n_in, n_out = size(source), size(output)
    unit = "characters" if language(source) == "zh" else "words"
    if action == "shorten" and n_out > SHORTEN_MAX * n_in:
        return [Problem("length", f"not clearly shorter: {n_out} of {n_in} {unit} "
                                  f"({100 * n_out // max(n_in, 1)} %; at most {int(100 * SHORTEN_MAX)} %)")]
    if action == "shorten" and n_out < SHORTEN_MIN * n_in:
        return [Problem("length", f"{TOO_SHORT}: {n_out} of {n_in} {unit} "
                                  f"({100 * n_out // max(n_in, 1)} %; at least {int(100 * SHORTEN_MIN)} %)")]
    if action == "expand" and n_out < EXPAND_MIN * n_in:
        return [Problem("length", f"not longer: {n_out} {unit} from {n_in}")]
    if action == "summarize":
        limit = int(SUMMARY_SLACK * length) if length else int(SUMMARY_MAX * n_in)
        if n_out > max(limit, 1):
            return [Problem("length", f"{n_out} {unit}, over the {length or limit} asked for")]
    return []


# -- shape ----------------------------------------------------------------------------------



def title_lines(output: str) -> list[str]:
    """The titles of a titles answer: its non-empty lines without list markers and quotes."""
    out = []
    for line in output.splitlines():
        t = strip_list_marker(line).strip().strip("\"“”「」'*")
        if t:
            out.append(t)
    return out


def titles_shape(source: str, output: str, n: int = TITLES) -> list[Problem]:
    """`n` distinct titles, one per line: short (≤ 14 words / 30 characters), not sentences of prose."""
    titles = title_lines(output)
    problems = []
    long = [t for t in titles if (_han(t) > 30 if language(t) == "zh" else len(t.split()) > 14)
            or len(sentences(t)) > 1]
    if long:
        problems.append(Problem("shape", f"prose, not a title: {_quote(long[0])}"))
    dupes = _near_duplicates(titles)
    if dupes:
        problems.append(Problem("shape", f"the same title more than once: {_quote(dupes[0])}"))
    distinct = len(titles) - len(dupes)
    if distinct != n:
        problems.append(Problem("shape", f"{distinct} distinct title{'s' if distinct != 1 else ''}, not {n}"))
    return problems


def _near_duplicates(items: list[str]) -> list[str]:
    seen, dupes = [], []
    for t in items:
        n = _norm(t)
        if any(n == s or SequenceMatcher(None, n, s).ratio() >= NEAR for s in seen):
            dupes.append(t)
        else:
            seen.append(n)
    return dupes


_BULLET = re.compile(r"^\s*(?:[-*•·+]|\d{1,2}[.)、]|[（(]?\d{1,2}[)）]|[一二三四五六七八九十]+[、.])\s*\S")


def outline_shape(output: str) -> list[Problem]:
    """At least two bullet or numbered lines, and no paragraph of prose outside them (a heading
    line is fine)."""
    lines = [line for line in output.splitlines() if line.strip()]
    bullets = [line for line in lines if _BULLET.match(line)]
    if len(bullets) < 2:
        return [Problem("shape", "not an outline: no bulleted or numbered list")]
    prose = [line for line in lines if not _BULLET.match(line) and len(sentences(line)) > 1]
    if prose:
        return [Problem("shape", f"prose outside the list: {_quote(prose[0])}")]
    return []


# -- helpers --------------------------------------------------------------------------------

def _han(text: str) -> int:
    return len(re.findall(r"[\u4e00-\u9fff]", text))


def _quote(s: str, width: int = 60) -> str:
    s = " ".join(s.split())
    return f"“{s if len(s) <= width else s[:width - 1] + '…'}”"
