"""Text handling shared by the apps, safety and evaluation, for Chinese and English alike.

Sentences end at 。！？；… as well as at . ! ? followed by a space; paragraphs end at blank lines.
`pack` groups sentences into pieces that fit a token budget (knowledge-base chunks, the writer's
pieces of a long input) and never drops or cuts text silently: an over-long sentence is split
at the budget and the pieces still cover every character.
"""

from __future__ import annotations

import functools
import re
from typing import Callable

# CJK Unified Ideographs (+ extension A, compatibility), the Chinese punctuation block, full-width forms.
HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
HAN_RE = re.compile(f"[{HAN}]")
_NOT_HAN = re.compile(f"[^{HAN}]+")
# A sentence ends after Chinese end punctuation (plus closing quotes/brackets), after . ! ? followed by
# whitespace, or at a blank line. The lookbehind keeps the punctuation with its sentence. A full stop
# followed by a lower-case word ("6 a.m. and 8 p.m. on weekdays"), or ending a title or an initial
# ("Mr. Smith", "J. K. Rowling"), ends no sentence.
_ABBREVIATION = "".join(rf"(?<!\b{a}\.)" for a in ("Mr", "Mrs", "Ms", "Dr", "St", "vs", "No", "Prof", "e\\.g",
                                                   "i\\.e", "[A-Z]"))
_END = re.compile(
    r"(?<=[。！？；…!?])[”’」』）)\"']*\s*"                     # Chinese / any ! ? ends, optional closing quotes
    rf"|(?<=[.]){_ABBREVIATION}[”’\"')\]]*\s+(?=[^\sa-z])"   # English full stop, whitespace, no lower case
    r"|\n\s*\n"                                               # paragraph break
)


def han_count(text: str) -> int:
    return len(_NOT_HAN.sub("", text))  # several times faster on Chinese text than len(HAN_RE.findall(text))


# Chinese punctuation as Latin-script text writes it.
_LATIN_PUNCT = {"，": ", ", "。": ". ", "！": "! ", "？": "? ", "：": ": ", "；": "; ", "、": ", ", "（": " (", "）": ") "}
ROMANIZE_MAX = 4  # Han characters: a name or a word; a longer run is a clause left untranslated
_ROMANIZABLE = re.compile(f"[{HAN}]{{1,{ROMANIZE_MAX}}}(?![{HAN}])|[{''.join(_LATIN_PUNCT)}]")


def romanize(text: str) -> str:
    """Latin-script text with the Chinese a translation left in it written in Latin letters: runs of up
    to ROMANIZE_MAX Han characters as pinyin, one capitalized word a run ("from杭州 to Beijing" → "from
    Hangzhou to Beijing": mostly the names a small model cannot translate), and Chinese punctuation as
    Latin. Longer runs are left as they are."""
    if not _ROMANIZABLE.search(text):
        return text
    from pypinyin import lazy_pinyin  # its dictionaries take ~0.2 s to load

    def latin(m: re.Match) -> str:
        run = m.group(0)
        if run in _LATIN_PUNCT:
            return _LATIN_PUNCT[run]
        if m.start() > 0 and HAN_RE.match(text[m.start() - 1]):
            return run  # the tail of a longer run
        before = " " if m.start() > 0 and text[m.start() - 1].isalnum() else ""
        after = " " if m.end() < len(text) and text[m.end()].isalnum() else ""
        return before + "".join(lazy_pinyin(run)).capitalize() + after

    out = re.sub(r"(?<=\S) {2,}", " ", _ROMANIZABLE.sub(latin, text))  # "，last" → ", last", not ",  last"
    out = re.sub(r" +([,.!?:;)])", r"\1", out)
    return out if text.endswith(" ") else out.rstrip(" ")


def language(text: str) -> str:
    """'zh' when Chinese characters make up at least a fifth of the letters, else 'en'."""
    han = han_count(text)
    letters = han + sum(1 for c in text if c.isascii() and c.isalpha())
    return "zh" if letters and han / letters >= 0.2 else "en"


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences in `text`; together they cover all of it."""
    spans, start = [], 0
    for m in _END.finditer(text):
        end = m.end()
        if end > start and text[start:end].strip():
            spans.append((start, end))
            start = end
    if start < len(text) and text[start:].strip():
        spans.append((start, len(text)))
    elif spans and start < len(text):
        spans[-1] = (spans[-1][0], len(text))  # trailing whitespace joins the last sentence
    return spans


def sentences(text: str) -> list[str]:
    """The sentences of `text`, stripped."""
    return [text[a:b].strip() for a, b in sentence_spans(text)]


def pack_spans(text: str, budget: int, count: Callable[[str], int],
               overlap: int = 0) -> list[tuple[int, int]]:
    """Group consecutive sentences of `text` into spans of at most `budget` (by `count`, e.g. tokens).

    A sentence longer than the budget is cut at character boundaries into budget-sized parts.
    Whitespace around a span does not count against the budget. `overlap` > 0 repeats that many
    trailing sentences at the start of the next span (retrieval chunks keep their context). The spans
    cover every character of the text.
    """
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    units: list[tuple[int, int]] = []
    for a, b in sentence_spans(text):
        units.extend(_cut(text, a, b, budget, count))
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(units):
        j = i + 1
        while j < len(units) and count(text[units[i][0]:units[j][1]].strip()) <= budget:
            j += 1
        out.append((units[i][0], units[j - 1][1]))
        i = max(j - overlap, i + 1) if j < len(units) else j
    return out


def pack(text: str, budget: int, count: Callable[[str], int], overlap: int = 0) -> list[str]:
    """`pack_spans` as strings."""
    return [text[a:b] for a, b in pack_spans(text, budget, count, overlap)]


def _cut(text: str, a: int, b: int, budget: int, count: Callable[[str], int]) -> list[tuple[int, int]]:
    """Cut the sentence text[a:b] into parts, each the longest prefix of the rest that fits the budget.

    Iterative and linear in b - a (a sentence of megabytes has thousands of parts): each part's end
    is found by galloping from the previous part's length, up while the window fits and down while
    it does not, with steps that double, then a binary search inside the last step. Parts of a long
    sentence are about equally long, so most ends take two calls of `count` on about one part of
    text. Every part advances at least one character, even when not one character fits.
    """
    def fits(start: int, end: int) -> bool:
        return count(text[start:end].strip()) <= budget

    if fits(a, b):
        return [(a, b)]
    parts: list[tuple[int, int]] = []
    size = budget  # the previous part's length in characters; the first guess is a character a token
    while True:
        # Find lo: text[a:lo] fits (or lo == a + 1, the least advance) and text[a:lo + 1] does not.
        end, step = min(b, a + size), 1
        if fits(a, end):
            lo = end
            while True:
                if lo == b:  # the rest fits: the last part
                    parts.append((a, b))
                    return parts
                hi = min(b, lo + step)
                if not fits(a, hi):
                    break
                lo, step = hi, step * 2
        else:
            lo, hi = a + 1, end
            while hi - step > a + 1:
                if fits(a, hi - step):
                    lo = hi - step
                    break
                hi, step = hi - step, step * 2
        hi -= 1  # text[a:hi + 1] does not fit: search (lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(a, mid):
                lo = mid
            else:
                hi = mid - 1
        parts.append((a, lo))
        size, a = lo - a, lo


# -- search terms (BM25 for the knowledge base and the assistant's memory) -----------------

@functools.cache
def _stop_en() -> frozenset:
    # On first use: importing bm25s brings numpy and scipy, which `muse kb list` and `muse write --help` never need.
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    return frozenset(STOPWORDS_EN_PLUS)


# Chinese function characters: a bigram containing one is a phrase boundary, not a word.
_STOP_ZH = frozenset("的了是在吗呢吧啊么和与及或也就这那我你他她它们什哪谁怎很")
_WORD = re.compile(r"[^\W_]+")
_HAN_RUNS = re.compile(f"({HAN_RE.pattern}+)")


def _normalise(word: str) -> str:
    """A light English plural fold (festivals → festival), applied to documents and queries alike."""
    return word[:-1] if len(word) > 4 and word.endswith("s") and not word.endswith("ss") else word


def _han_terms(run: str) -> tuple[list[str], list[str]]:
    """(index terms, content terms) of a run of Chinese characters: unigrams + bigrams between
    function characters; the bigrams (or a lone character) are the content terms."""
    index, content = [], []
    for seg in re.split(f"[{''.join(_STOP_ZH)}]+", run):
        if len(seg) == 1:
            index.append(seg)
            content.append(seg)
        elif seg:
            bigrams = [seg[i:i + 2] for i in range(len(seg) - 1)]
            index.extend(list(seg) + bigrams)
            content.extend(bigrams)
    return index, content


def terms(text: str) -> tuple[list[str], list[str]]:
    """(index terms, content terms) of `text`; BM25 indexes the first, the relevance gate uses the second."""
    index, content = [], []
    for word in _WORD.findall(text.lower()):
        for part in _HAN_RUNS.split(word):
            if not part:
                continue
            if HAN_RE.match(part):
                i, c = _han_terms(part)
                index += i
                content += c
            elif part not in _stop_en() and (len(part) > 1 or part.isdigit()):
                index.append(_normalise(part))
                content.append(_normalise(part))
    return index, content


# -- numbers, by value across scripts (output gates, the numbers-preserved metric) -----------------

# A list marker at a line's start: bullets, "1." / "2)" / "（3）", "一、", Markdown headings.
LIST_MARKER = re.compile(r"^\s*(?:[-*•·+]|\d{1,2}[.)、]|[（(]?\d{1,2}[)）]|[一二三四五六七八九十]+[、.]|#{1,6})\s+|^\s*\d{1,2}[.、](?!\d)")


def strip_list_marker(line: str) -> str:
    return LIST_MARKER.sub("", line, count=1)


_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_UNITS = {"十": 10, "百": 100, "千": 1000}
_CN_BIG = {"万": 10_000, "亿": 100_000_000}
_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_WORDS.update({w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)})
_WORDS.update({"dozen": 12, "hundred": 100, "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5})
_WORDS.update({m: i for i, m in enumerate("january february march april may june july august september october "
                                          "november december".split(), 1)})
_SCALE = {"thousand": 1e3, "k": 1e3, "million": 1e6, "mn": 1e6, "billion": 1e9, "bn": 1e9,
          "千": 1e3, "万": 1e4, "亿": 1e8, "百万": 1e6, "千万": 1e7, "万亿": 1e12}
_NUM = re.compile(r"(\d+(?:[,，]\d{3})*(?:\.\d+)?)\s*(百万|千万|万亿|thousand|million|billion|bn|mn|k|千|万|亿)?",
                  re.IGNORECASE)
_CN_NUM = re.compile(r"[零〇一二两三四五六七八九十百千万亿]+")
_CN_COUNTED = re.compile(r"[月日号年元块点岁页天周个人位次分秒%]")  # a Chinese numeral before one of these is a number
_TIME = re.compile(r"\b(\d{1,2})(?::\d{2})?\s*(p\.?m\.?|pm)\b", re.IGNORECASE)


def _cn_value(s: str) -> float | None:
    """The value of a Chinese numeral such as 三百, 三十万, 两千五百, 一万二千; None if not one."""
    total, section, digit = 0, 0, None
    for ch in s:
        if ch in _CN_DIGITS:
            digit = _CN_DIGITS[ch]
        elif ch in _CN_UNITS:
            section += (1 if digit is None else digit) * _CN_UNITS[ch]
            digit = None
        elif ch in _CN_BIG:
            total = (total + section + (digit or 0)) * _CN_BIG[ch]
            section, digit = 0, None
    return float(total + section + (digit or 0))


def numbers(text: str, generous: bool = False) -> dict[float, str]:
    """Value → how it is written, for each number, date part and amount in `text`, compared by value
    across scripts: 30万, 300,000, 300000 and 三十万 are all 300000.0; 3.5 million is 350万.

    Strict (the default) reads digits (with 万/亿/千 or thousand/million/billion scales) and Chinese
    numerals that are clearly numbers (三百, or 七 before a counter such as 点/元/日), not the 一 of 一起.
    `generous` also reads the forms a faithful rewrite or translation may use for them: every Chinese
    numeral, number and month words (three, dozen, March), the 24-hour reading of a p.m. time (3:30 pm
    gives 15), 点半 / half past (30) and a discount (八折: 20, as in 20 % off). List markers at a line's
    start ("1.", "-", "一、") are not numbers. Checking that an output keeps (or invents) numbers compares
    `numbers(source)` with `numbers(output, generous=True)`, or the other way round.
    """
    out: dict[float, str] = {}
    body = "\n".join(strip_list_marker(line) for line in text.splitlines())
    for m in _NUM.finditer(body):
        raw, scale = m.group(1), (m.group(2) or "").lower()
        if scale == "k" and re.match(r"[a-z]", body[m.end():m.end() + 1] or " ", re.IGNORECASE):
            scale = ""  # "5 km", "3 min": a unit, not a multiplier
        value = float(re.sub(r"[,，]", "", raw)) * _SCALE.get(scale, 1)
        out.setdefault(value, m.group(0).strip())
        if generous:
            out.setdefault(float(re.sub(r"[,，]", "", raw)), raw)
    for m in _CN_NUM.finditer(body):
        s = m.group(0)
        if s in ("万", "亿", "千", "百", "十"):
            continue
        after = body[m.end():m.end() + 1]
        prev = body[m.start() - 1:m.start()]
        if not generous and not (any(c in s for c in "十百千万亿") and len(s) > 1 or _CN_COUNTED.match(after or " ")):
            continue  # 一起, 统一, 一些: words, not numbers
        if prev.isdigit():
            continue  # the 万 of 30万, read above
        out.setdefault(_cn_value(s), s)
    if generous:
        for w in re.findall(r"[a-z]+", body.lower()):
            if w in _WORDS:
                out.setdefault(float(_WORDS[w]), w)
        for m in _TIME.finditer(body):
            out.setdefault(float(int(m.group(1)) % 12 + 12), m.group(0))
        if "点半" in body or "點半" in body or "half past" in body.lower():
            out.setdefault(30.0, "半")
        for m in re.finditer(r"([一二三四五六七八九\d])折", body):  # 八折 / 8折: 20 % off
            out.setdefault(float(100 - 10 * (_CN_DIGITS.get(m.group(1)) or int(m.group(1)))), m.group(0))
    return out


# An amount written with a Chinese scale: digits with 万/亿 (30万, 1.5亿), or a Chinese numeral holding
# 千/万/亿 before a counter (一万二千元, 三十万人): not 千万 in 千万不要 ("by all means do not").
_SCALED = re.compile(r"(?<![\d.,])(\d+(?:,\d{3})*(?:\.\d+)?)\s*(万亿|亿|万)"
                     r"|([零〇一二两三四五六七八九十百千万亿]*[千万亿][零〇一二两三四五六七八九十百千万亿]*)"
                     r"(?=[元块人位个张台辆次家名户件套间吨斤米])")


def arabic_amounts(text: str) -> str:
    """`text` with its amounts in Chinese scales written in digits: 30万元 → 300,000元, 一万二千元 →
    12,000元, 1.5亿 → 150,000,000. A small model translating into English reads 万 (ten thousand)
    wrongly: 30万元 came out as "30 million" and "$30,000"; digits it copies."""
    def digits(m: re.Match) -> str:
        if m.group(1):
            value = float(m.group(1).replace(",", "")) * _SCALE[m.group(2)]
        elif len(m.group(3)) > 1:
            value = _cn_value(m.group(3))
        else:
            return m.group(0)  # 万 alone (万人空巷): a word
        return f"{value:,.0f}" if value == int(value) else f"{value:,}"
    return _SCALED.sub(digits, text)


def has_number(value: float, values) -> bool:
    """Whether `value` is among `values` (from `numbers`), up to float rounding: 3.5 million = 350万."""
    return any(abs(value - v) <= 1e-6 * max(1.0, abs(value)) for v in values)
