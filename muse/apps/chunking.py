"""Cutting a document into knowledge-base chunks: sections first, then sentence-aligned pieces.

A section starts at a Markdown heading (`#`, `##`, …) and at a switch between an English and a
Chinese part (a bilingual notice: the English text, then the same in Chinese). Every chunk carries
its heading path ("Staff handbook › Leave"), which retrieval indexes and the prompt shows. A short
line without end punctuation opening a language section ("湖畔青年旅舍住宿须知") counts as that
section's title. Inside a section, `muse.text.pack_spans` packs sentences into chunks of at most
`budget` estimated tokens with `overlap` sentences repeated; no chunk crosses a section boundary.

    for c in chunk_text(text):
        print(c.start, c.end, " › ".join(c.path), c.text[:40])
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from muse.text import han_count, language, pack_spans

CHUNK_TOKENS = 200   # chunk budget, in estimated embedding-model tokens (e5 reads at most 512)
CHUNK_OVERLAP = 1    # sentences repeated at the start of the next chunk, so a fact keeps its context
TITLE_CHARS = 60     # a language section's first line this short, without end punctuation, is its title

_HEADING = re.compile(r"^[ \t]{0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_ENDS = tuple(".。!！?？;；:：…")
SEP = " › "


@dataclass
class Chunk:
    start: int  # character offsets into the extracted text: text == source[start:end]
    end: int
    text: str
    path: tuple[str, ...] = ()  # heading path, outermost first


@dataclass
class Section:
    start: int
    end: int
    path: tuple[str, ...]


def estimate_tokens(text: str) -> int:
    """Embedding-model tokens, estimated: about one per Chinese character, one per 4 other characters."""
    han = han_count(text)
    return han + -(-(len(text) - han) // 4)


def _line_language(line: str) -> str | None:
    """'en' or 'zh' for a line with letters, None for one without (numbers, punctuation, blank)."""
    if han_count(line) == 0 and not any(c.isascii() and c.isalpha() for c in line):
        return None
    return language(line)


def _is_title(line: str) -> bool:
    s = line.strip()
    return 0 < len(s) <= TITLE_CHARS and not s.endswith(_ENDS)


def sections(text: str) -> list[Section]:
    """The sections of `text` (see the module docstring); together they cover every visible character."""
    out: list[Section] = []
    stack: list[tuple[int, str]] = []      # (level, heading) of the open Markdown headings
    start, lang, extra = 0, None, ()       # current section: start offset, language, its own title
    first = True                           # no line with letters in the current section yet
    body = False                           # the current section has a line that is not a heading

    def close(end: int) -> bool:
        """End the current section at `end`; False when it holds only headings (it runs on)."""
        if not body:
            return False
        out.append(Section(start, end, tuple(h for _, h in stack) + extra))
        return True

    pos = 0
    for line in text.splitlines(keepends=True):
        here, pos = pos, pos + len(line)
        m = _HEADING.match(line.rstrip("\r\n"))
        if m:
            if close(here):
                start = here
            level = len(m.group(1))
            stack = [s for s in stack if s[0] < level] + [(level, m.group(2).strip())]
            lang, extra, first, body = None, (), True, False
            continue
        this = _line_language(line)
        if this is None:
            continue
        if lang is not None and this != lang and close(here):
            start, extra, first = here, (), True
        if first:
            nxt = text[pos:].lstrip()
            if _is_title(line) and nxt and not _HEADING.match(nxt.splitlines()[0]):
                extra = (line.strip(),)
            first = False
        lang, body = this, True
    if not close(len(text)) and text.strip():
        out.append(Section(start, len(text), tuple(h for _, h in stack)))  # headings only
    return out


def chunk_text(text: str, budget: int = CHUNK_TOKENS, overlap: int = CHUNK_OVERLAP) -> list[Chunk]:
    """Sentence-aligned chunks of at most `budget` estimated tokens inside each section, whitespace
    trimmed, with offsets and heading paths."""
    out = []
    for sec in sections(text):
        part = text[sec.start:sec.end]
        for a, b in pack_spans(part, budget, estimate_tokens, overlap):
            a, b = a + sec.start, b + sec.start
            piece = text[a:b]
            s, e = a + len(piece) - len(piece.lstrip()), b - (len(piece) - len(piece.rstrip()))
            if e > s:
                out.append(Chunk(s, e, text[s:e], sec.path))
    return out
