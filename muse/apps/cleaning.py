"""Cleaning a model's answer: the "Sure! Here is…" preambles, wrapping quotes or code fences and
"I hope this helps" epilogues that small chat models add around what was asked for.

`OutputCleaner` cleans while the answer streams (the writer, summaries, translations);
`clean_output` cleans a whole answer at once.
"""

from __future__ import annotations

import re

PREAMBLES = [re.compile(p, re.IGNORECASE) for p in (
    r"^(?:sure|certainly|of course|absolutely|okay|ok|great)\s*[,.!]\s*(?=here|below|i |i'|the following|\n|$)",
    r"^(?:here(?:'s| is| are)|below is)\b[^\n]{0,120}?:[ \t]*(?:\n|$)",
    r"^(?:[\w-]+[ \t]+){0,3}(?:text|version|translation|summary|outline|titles?|rewrite|draft)"
    r"(?:[ \t]*\([^)\n]*\))?[ \t]*:[ \t]*",
    r"^(?:好的|当然|没问题)[！!。，,]\s*",
    r"^(?:以下是|下面是|这是)[^\n：:]{0,40}[：:][ \t]*",
    r"^[^\n：:]{0,8}(?:译文|翻译|改写|润色|摘要|大纲|提纲|标题|版本|结果)[^\n：:]{0,4}[：:][ \t]*",
)]
# A line that comments on the answer instead of being part of it; everything from it on is dropped.
_EPILOGUE = re.compile(
    r"\n[ \t]*(?=(?:\(?(?:notes?|explanation|changes made)\s*:"
    r"|(?:i )?hope (?:this|that|it) helps"
    r"|let me know if you (?:need|want|would like) (?:any )?(?:further |more |other )?"
    r"(?:changes|adjustments|modifications|revisions|edits|help|assistance)"
    r"|feel free to (?:ask|let me know|reach out|request)"
    r"|(?:in )?this (?:rewritten|revised|polished|edited|corrected|improved|expanded|shortened|translated) "
    r"(?:version|text)"
    r"|i(?: have|'ve)? (?:made|changed|corrected|revised|rewrote|fixed|adjusted) (?:the |a |some |a few |several )?"
    r"(?:following |minor |small )?(?:changes|edits|corrections|adjustments|improvements|modifications)"
    r"|(?:注|说明|备注)[：:]|希望(?:这|以上)[^\n]{0,12}(?:帮助|有用|满意)|如(?:果|需)(?:你|您)?还?(?:需要|有)(?:任何|其他|进一步)?"
    r"(?:修改|调整|帮助)))", re.IGNORECASE)
_QUOTES = {'"': '"', "“": "”", "「": "」", "『": "』"}


class OutputCleaner:
    """Cleans a model's answer while it streams: `push(delta) -> text safe to show`, then `finish()`.

    Strips a leading "Sure! Here is the rewritten text:" (held back until the first line is
    complete), a code fence or quotes wrapping the whole answer, and trailing lines that comment
    on it ("I hope this helps", "Note: I changed…"; a line waits until it is complete or long
    enough to tell). With `source` (the text the model was asked to work on), anything that is
    also in the source counts as content and is kept, e.g. a "Note:" paragraph of the user's own.
    """

    HEAD = 160  # decide about a preamble once the first line is complete or this long
    LINE = 100  # show a line once it is complete or this long: an epilogue is recognised by then

    def __init__(self, source: str | None = None):
        self.source = _flat(source) if source else ""
        self.raw = ""
        self.start: int | None = None     # where the answer proper begins in `raw`
        self.quote: tuple[str, str] | None = None  # an opening quote that may wrap the whole answer
        self.fenced = False
        self.sent = 0                     # characters of the answer already returned

    def push(self, text: str) -> str:
        self.raw += text
        if self.start is None:
            rest = self._strip_preambles(self.raw.lstrip())
            if len(rest) < self.HEAD and "\n" not in rest.lstrip():
                return ""
            self._decide_head()
        return self._emit(final=False)

    def finish(self) -> str:
        if self.start is None:
            self._decide_head()
        return self._emit(final=True)

    def _in_source(self, text: str) -> bool:
        return bool(self.source) and _flat(text)[:24] in self.source

    def _strip_preambles(self, s: str) -> str:
        changed = True
        while changed:
            changed = False
            for p in PREAMBLES:
                m = p.match(s)
                # a short one ("Sure! ") always goes; a longer one the source itself has stays
                if m and m.end() > 0 and (m.end() < 8 or not self._in_source(s[:m.end()])):
                    s, changed = s[m.end():].lstrip(), True
        return s

    def _decide_head(self) -> None:
        s = self.raw
        rest = self._strip_preambles(s.lstrip()).lstrip()
        i = len(s) - len(rest)
        if rest.startswith("```"):
            self.fenced = True
            nl = rest.find("\n")
            i += nl + 1 if nl >= 0 else len(rest)
        elif rest[:1] in _QUOTES and not self._in_source(rest[:40]):
            self.quote = (rest[0], _QUOTES[rest[0]])
        self.start = i

    def _emit(self, final: bool) -> str:
        body = self._cut_epilogue(self.raw[self.start:])
        if self.fenced and final:
            body = re.sub(r"\n?[ \t]*```[ \t]*$", "", body.rstrip())
        if self.quote:
            body = self._unquote(body, final)
            if body is None:
                return ""  # still unknown whether the quote wraps everything
        if final:
            body = body.rstrip()
            end = len(body)
        else:
            end = len(body.rstrip()) - 4  # a closing fence or quote may be arriving
            line = body.rfind("\n")
            if line >= 0 and len(body) - line < self.LINE:
                end = min(end, line)       # the last line could still turn out to be an epilogue
            end = len(body[:max(end, 0)].rstrip())  # whitespace waits for what follows it
        out = body[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _cut_epilogue(self, body: str) -> str:
        for m in _EPILOGUE.finditer(body):
            line = body[m.end():].split("\n", 1)[0]
            if body[:m.start()].strip() and not self._in_source(line):
                return body[:m.start()]
        return body

    def _unquote(self, body: str, final: bool) -> str | None:
        """The body without a quote pair that wraps all of it; None while that is undecided."""
        opening, closing = self.quote
        inner = body[1:]
        k = inner.find(closing)
        if k >= 0 and inner[k + 1:].strip():
            self.quote = None  # the quote closes with more text after it: part of the answer
            return body
        if not final:
            return None
        self.quote = None
        return inner[:k] if k >= 0 else body


def _flat(text: str) -> str:
    return " ".join(text.lower().split())


def clean_output(text: str, source: str | None = None) -> str:
    """A model's whole answer, cleaned as `OutputCleaner` cleans it while streaming."""
    c = OutputCleaner(source)
    return c.push(text) + c.finish()
