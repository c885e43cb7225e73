"""Plain text out of the files people keep: .txt, .md, .html, .pdf and .docx — bounded, whatever the file.

    from muse.apps.extract import extract, Extractor, ExtractError, Limits
    doc = extract("notes/manual.pdf")          # Extracted(title=..., text=..., kind="pdf")
    with Extractor(Limits(seconds=10)) as ex:  # many files: one warm worker process, reused
        docs = [ex.extract(p) for p in paths]

Every way a file can fail to give text raises `ExtractError`, whose message is the reason to show
the user (the knowledge base reports it as "skipped: why" and goes on with the next file): missing,
empty, binary, an unknown encoding, an encrypted or damaged PDF, a FIFO or device instead of a file,
and every limit below.

Files are hostile until read. The limits are the fields of `Limits` (defaults in `LIMITS`):

    file_bytes        the largest file read at all (checked with stat before reading, and while reading)
    text_chars        characters of text one file may give
    seconds           wall time to read one file; the worker is killed past it
    memory_bytes      address space of the worker process (RLIMIT_AS): a MemoryError there, not here
    pdf_pages         pages of one PDF (counted before any page is read)
    pdf_stream_bytes  one PDF stream, inflated (pypdf's own decompression limits, set to this)
    xml_bytes         the XML a .docx inflates to, from the ZIP directory's sizes before inflating
                      and counted while inflating (directories lie)
    zip_ratio         inflated : compressed of a .docx part over 1 MB (Word's XML inflates about 10-fold,
                      a zip bomb hundreds- to 1000-fold)
    zip_entries       entries in a .docx (read from the ZIP's end record before the directory is parsed)

Plain text and Markdown are read in this process: decoding and tidying are linear in the file, which
`file_bytes` bounds. HTML, PDF and Word documents are read in a worker process (`Extractor`) with the
time and memory limits, so a parser that hangs or balloons is killed without harming the caller;
`Extractor.cancel()` kills it from another thread (a server whose client left). Workers are reused
between files and calls, so only the first such file pays the start (a fraction of a second: the
worker imports this module and pypdf, never torch).

Each reader is linear in its input: HTML is scanned once, without building a tree, so nesting depth
costs nothing; .docx XML is streamed through expat (no DOM, no DTDs or entities); PDFs go through
pypdf with its decompression limits set to ours.

Plain text is read as UTF-8 (with or without a byte-order mark), then GB18030 (the superset of GBK
and GB2312 most Chinese files that are not UTF-8 use); anything else is refused rather than guessed.
The kind of a file comes from its content where the content says it (PDFs start with `%PDF-`,
Word files are ZIP archives holding `word/document.xml`), otherwise from its extension.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import html
import io
import json
import os
import re
import stat
import struct
import subprocess
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from muse.errors import MuseError

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
                 ".html": "html", ".htm": "html", ".xhtml": "html"}
SUFFIXES = {**TEXT_SUFFIXES, ".pdf": "pdf", ".docx": "docx"}
KINDS = ("text", "markdown", "html", "pdf", "docx")

MB = 1_000_000


@dataclass(frozen=True)
class Limits:
    """What one file may cost to read (see the module docs). Every field must be positive."""

    file_bytes: int = 64 * MB
    text_chars: int = 4_000_000       # about 2,000 book pages
    seconds: float = 60.0
    memory_bytes: int = 1_000 * MB
    pdf_pages: int = 2_000
    pdf_stream_bytes: int = 64 * MB
    xml_bytes: int = 64 * MB
    zip_ratio: float = 200.0
    zip_entries: int = 10_000

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{f.name} must be a positive number, got {value!r}")
        if self.zip_ratio < 1:
            raise ValueError(f"zip_ratio must be at least 1, got {self.zip_ratio!r}")


LIMITS = Limits()


class ExtractError(MuseError):
    """A file that gives no usable text; the message says why and what to do."""


CANCELLED = "stopped: the extraction was cancelled"  # the reason once Extractor.cancel() ran


@dataclass
class Extracted:
    title: str
    text: str
    kind: str  # text | markdown | html | pdf | docx


def supported(path: "str | Path") -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def kind_of(path: "str | Path") -> str:
    """The reader for `path` by its extension; ExtractError for a type Muse does not read."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ExtractError(f"unsupported file type '{path.suffix or path.name}' "
                           f"(supported: {', '.join(sorted(SUFFIXES))})")
    return kind


def _size(n: float) -> str:
    return f"{n / MB:,.0f} MB" if n >= 10 * MB else f"{n / MB:,.1f} MB" if n >= MB / 10 else f"{n:,.0f} bytes"


# -- reading files: regular files only, never blocking ------------------------------------


def not_regular(mode: int) -> str:
    """The skip reason for something that is not a regular file (it is never opened)."""
    what = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a folder" if stat.S_ISDIR(mode) else "a special file")
    return f"{what}, not a regular file: not read"


def os_problem(e: OSError) -> str:
    """The skip reason for an OSError met while looking at or reading a path."""
    if e.errno == errno.ENOENT:
        return "no such file or directory"
    if e.errno == errno.ELOOP:
        return "a symbolic link loop (the link leads back to itself)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"cannot read it: {e.strerror or e}"


def read_file(path: "str | Path", max_bytes: int = LIMITS.file_bytes) -> tuple[bytes, float]:
    """The bytes and mtime of a regular file of at most `max_bytes`; ExtractError otherwise.

    FIFOs, devices and sockets are refused from `stat` and never opened (opening a FIFO blocks until
    a writer comes). The file is then opened non-blocking and checked again, in case it was swapped.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ExtractError(not_regular(st.st_mode))
        if st.st_size > max_bytes:
            raise ExtractError(_too_big(st.st_size, max_bytes))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ExtractError(not_regular(st.st_mode))
            chunks, total = [], 0
            while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:  # it grew since stat
                    raise ExtractError(_too_big(total, max_bytes))
        finally:
            os.close(fd)
    except OSError as e:
        raise ExtractError(os_problem(e)) from None
    return b"".join(chunks), st.st_mtime


def _too_big(size: int, limit: int) -> str:
    return f"the file is {_size(size)} (limit {_size(limit)} per file)"


# -- the public entry points -----------------------------------------------------------------


def extract(path: "str | Path", limits: Limits = LIMITS) -> Extracted:
    """The title and text of one file. Raises ExtractError with the reason when it has none."""
    with Extractor(limits) as ex:
        return ex.extract(path)


def extract_bytes(data: bytes, kind: str, default_title: str = "", limits: Limits = LIMITS) -> Extracted:
    """Like `extract`, for bytes already read (uploads); `kind` as in `SUFFIXES`' values."""
    with Extractor(limits) as ex:
        return ex.extract_bytes(data, kind, default_title)


def sniff(data: bytes) -> str | None:
    """The kind the content declares: "pdf", "zip" (a .docx, or some other archive), or None."""
    if data[:1024].lstrip().startswith(b"%PDF-"):
        return "pdf"
    if data[:4] == b"PK\x03\x04":
        return "zip"
    return None


def parse(data: bytes, kind: str, default_title: str = "", limits: Limits = LIMITS) -> Extracted:
    """Read `data` in this process, bounded by every limit but time and memory.

    This is the worker's body; call it directly only for plain text or trusted files (`Extractor`
    runs the others in a worker process with the time and memory limits)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if len(data) > limits.file_bytes:
        raise ExtractError(_too_big(len(data), limits.file_bytes))
    if not data or data.isspace():
        raise ExtractError("the file is empty")
    sniffed = sniff(data)
    kind = "docx" if sniffed == "zip" else sniffed or kind
    title, text = _READERS[kind](data, limits)
    text = _tidy(text)
    if len(text) > limits.text_chars:
        raise ExtractError(_too_much_text(len(text), limits))
    if not text:
        raise ExtractError("no text found in the file" + (
            " (a scanned PDF holds images only: run OCR on it first, e.g. `ocrmypdf in.pdf out.pdf`)"
            if kind == "pdf" else ""))
    title = _SURROGATE.sub("\ufffd", re.sub(r"\s+", " ", title or "")).strip()[:300]
    return Extracted(title=title or default_title.strip() or "untitled", text=text, kind=kind)


def _too_much_text(chars: int, limits: Limits, at_least: bool = False) -> str:
    return (f"it holds {'more than ' if at_least else ''}{chars:,} characters of text "
            f"(limit {limits.text_chars:,}); split it into smaller files")


# -- plain text and Markdown --------------------------------------------------------------------


# muse.text.HAN_RE's ranges, not imported: that module loads bm25s and numpy, which the worker,
# importing only this module and pypdf, does without (20 MB and 0.1 s a start).
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f]")  # control characters but \t \n \x0c \r
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _count(pattern: re.Pattern, text: str) -> int:
    """Matches of a one-character pattern, without a list of them (4 M characters → 4 M strings)."""
    return len(text) - len(pattern.sub("", text))


def decode_text(data: bytes) -> str:
    """Bytes of a text file → str: UTF-8 (BOM or not), else GB18030 when it reads as Chinese."""
    if b"\x00" in data[:8192]:
        raise ExtractError("a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf8_error = e
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError:
        text = None
    # GB18030 decodes many byte strings; accept it only when most non-ASCII characters come out Chinese.
    non_ascii = len(text) - len(text.encode("ascii", "ignore")) if text else 0
    if text is not None and non_ascii and _count(_HAN, text) >= 0.8 * non_ascii:
        return text
    raise ExtractError(f"not UTF-8 or GB18030 text (undecodable byte at offset {utf8_error.start}); "
                       "convert it to UTF-8 first, e.g. `iconv -f LATIN1 -t UTF-8 in.txt > out.txt`")


def _tidy(text: str) -> str:
    """Normalise line ends, drop trailing spaces and runs of blank lines; keep paragraphs. Linear:
    no regex here may backtrack over a long run (`[ \\t]+\\n` does, on a megabyte of spaces)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x0c", "\n").replace("\x00", "")
    text = _SURROGATE.sub("\ufffd", text)  # lone surrogates (from PDF font maps) cannot be stored
    text = "\n".join(line.rstrip(" \t\u00a0") for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _plain(data: bytes, limits: Limits) -> tuple[str, str]:
    if len(data) > 4 * limits.text_chars:  # UTF-8 and GB18030 spend at most 4 bytes a character
        raise ExtractError(_too_much_text(len(data) // 4, limits, at_least=True))
    text = decode_text(data)
    if len(text) > limits.text_chars:
        raise ExtractError(_too_much_text(len(text), limits))
    if _count(_CONTROL, text) > 0.01 * len(text):
        raise ExtractError("a binary file, not text")
    return "", text


def _markdown(data: bytes, limits: Limits) -> tuple[str, str]:
    _, text = _plain(data, limits)
    heading = re.search(r"^#[ \t]+(\S[^\n]*)", text, re.MULTILINE)  # no trailing pattern: no backtracking
    return (heading.group(1).rstrip().rstrip("#").rstrip() if heading else ""), text


# -- HTML: one linear scan, no tree -------------------------------------------------------------


_BLOCKS = frozenset(["p", "div", "section", "article", "header", "footer", "main", "aside", "nav", "li", "ul",
                     "ol", "table", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote",
                     "dt", "dd", "dl", "figure", "figcaption", "hr", "address", "details", "summary", "body"])
_RAW = frozenset(["script", "style", "title", "textarea", "xmp", "iframe", "noembed", "noframes"])
_HIDDEN = frozenset(["noscript", "template"])  # markup whose text is not shown
# One token at a time: text, a tag (quoted values after '=' may hold '>'), a comment, a declaration or
# other '<!' '<?' '</' construct, or a lone '<'. The tag's attribute loop is possessive, so when a tag
# has no '>' the failed match costs one pass over the rest of the file, and the scan stops there.
_TOKEN = re.compile(r"""
    (?P<text>[^<]+)
  | <(?P<close>/?)(?P<name>[A-Za-z][^\t\n\f\r\x20/>]*)
     (?P<attrs>(?:[^>=]++|=[\t\n\f\r\x20]*+(?:"[^"]*+"|'[^']*+')?+)*+)>
  | (?P<comment><!--)
  | (?P<other><[!?/])
  | (?P<lt><)""", re.VERBOSE)
_RAW_END = {name: re.compile(rf"</{name}[\t\n\f\r />]", re.IGNORECASE) for name in _RAW}
_SPACE = re.compile(r"[ \t\n\r\f]+")
_BREAK, _PARAGRAPH = "\x00", "\x00\x00"  # marks in the scanned text (NUL is dropped from the text itself)


def _html(data: bytes, limits: Limits) -> tuple[str, str]:
    """Title and text of an HTML page, in one left-to-right pass.

    Every match and search starts where the last ended and either moves past what it scanned or ends
    the scan (an unclosed comment or tag runs to the end of the file, as in a browser), so the time is
    linear in the file whatever the nesting or the malformation. (The standard library's html.parser,
    under BeautifulSoup before, is quadratic on unclosed tags: 24 kB of "<a " takes 4 s.)
    Script, style and template content is dropped; block tags end a paragraph, <br> a line.
    """
    s = decode_text(data)
    out, title, hidden, pos, n = _Pieces(limits), "", 0, 0, len(s)
    while pos < n:
        m = _TOKEN.match(s, pos)
        pos, what = m.end(), m.lastgroup
        if what == "text":
            if not hidden:
                out.text(m.group())
        elif what == "comment":
            end = s.find("-->", pos)
            pos = n if end < 0 else end + 3
        elif what == "other":  # doctype, CDATA, processing instruction, bogus comment: up to '>'
            end = s.find(">", pos)
            pos = n if end < 0 else end + 1
        elif what == "lt":
            if s[pos:pos + 1].isascii() and s[pos:pos + 1].isalpha():
                break  # a tag without '>' before the end of the file: dropped with what follows it
            if not hidden:
                out.text("<")
        else:
            name, closing = m.group("name").lower(), m.group("close") == "/"
            if not closing and name in _RAW:
                end = _RAW_END[name].search(s, pos)
                content, pos = (s[pos:], n) if end is None else (s[pos:end.start()], s.find(">", end.start()) + 1 or n)
                if name == "title" and not title:
                    title = _SPACE.sub(" ", _unescape(content))
                elif name in ("textarea", "xmp") and not hidden:
                    out.text(content)
            elif name in _HIDDEN and not m.group("attrs").endswith("/"):
                hidden = max(hidden - 1, 0) if closing else hidden + 1
            elif name in _BLOCKS:
                out.mark(_PARAGRAPH)
            elif name == "br":
                out.mark(_BREAK)
    return title, out.result()


def _unescape(text: str) -> str:
    try:
        return html.unescape(text)
    except ValueError:  # a numeric reference of thousands of digits (int() refuses them): left as written
        return text


class _Pieces:
    """Scanned text, joined every few thousand pieces (not millions of small strings); whitespace
    is collapsed and the break marks turned into newlines at the end, in a few linear passes."""

    def __init__(self, limits: Limits):
        self.limits, self.parts, self.buf, self.chars = limits, [], [], 0

    def text(self, piece: str) -> None:
        if "&" in piece:
            piece = _unescape(piece)
        if _BREAK in piece:
            piece = piece.replace(_BREAK, "")
        self.chars += len(piece)
        self._add(piece)

    def mark(self, mark: str) -> None:
        self._add(mark)

    def _add(self, piece: str) -> None:
        self.buf.append(piece)
        if len(self.buf) >= 4096:
            self.parts.append("".join(self.buf))
            self.buf.clear()
            if self.chars > 2 * self.limits.text_chars:  # collapsing whitespace at most halves it
                raise ExtractError(_too_much_text(self.limits.text_chars, self.limits, at_least=True))

    def result(self) -> str:
        text = _SPACE.sub(" ", "".join(self.parts) + "".join(self.buf))
        text = re.sub(r" ?(\x00+) ?", r"\1", text)  # no spaces around a break (after the collapse: linear)
        return re.sub("\x00\x00+", "\n\n", text).replace("\x00", "\n")


# -- PDF ----------------------------------------------------------------------------------------


def _pdf(data: bytes, limits: Limits) -> tuple[str, str]:
    import pypdf
    from pypdf.errors import DependencyError, LimitReachedError

    cap = limits.pdf_stream_bytes
    config = dict(zlib_maximum_output_length=cap, lzw_maximum_output_length=cap,
                  run_length_maximum_output_length=cap, brotli_maximum_output_length=cap,
                  jbig2_maximum_output_length=cap, maximum_declared_stream_length=cap,
                  array_based_stream_maximum_output_length=cap, image_maximum_buffer_size=cap,
                  # a page tree past the page limit (whatever its /Count says) stops while it is walked
                  page_tree_maximum_entries=4 * limits.pdf_pages + 100,
                  jbig2dec_binary=None)  # never run an external decoder on a hostile file
    try:
        with pypdf.apply_configuration(**config):
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not _open_without_password(reader):
                raise ExtractError("an encrypted (password-protected) PDF; save an unprotected copy first, "
                                   "e.g. `qpdf --decrypt --password=PASSWORD in.pdf out.pdf`")
            count = _declared_pages(reader)  # the tree's own count: walking 60,000 pages takes seconds
            if count > limits.pdf_pages:
                raise ExtractError(f"a PDF of {count:,} pages (limit {limits.pdf_pages:,}); split it first, "
                                   f"e.g. `qpdf --split-pages={limits.pdf_pages} in.pdf out.pdf`")
            pages, chars = [], 0
            for i, page in enumerate(reader.pages):
                if i >= limits.pdf_pages:  # the page tree held more than its /Count said
                    raise ExtractError(f"a PDF of more than {limits.pdf_pages:,} pages (limit)")
                pages.append(page.extract_text() or "")
                chars += len(pages[-1])
                if chars > limits.text_chars:
                    raise ExtractError(_too_much_text(chars, limits, at_least=True))
            title = (reader.metadata.title or "") if reader.metadata else ""
    except (ExtractError, MemoryError):
        raise
    except LimitReachedError as e:
        if "decompress" in str(e).lower():
            raise ExtractError(f"a PDF whose content inflates past {_size(cap)} in one stream (the limit); "
                               "this looks like a decompression bomb") from None
        raise ExtractError(f"a PDF past one of the reader's safety limits ({str(e)[:200]}); it may be crafted "
                           "to exhaust the reader") from None
    except DependencyError:
        raise ExtractError("an encrypted PDF whose cipher needs the `cryptography` package; "
                           "decrypt it first with `qpdf --decrypt`") from None
    except Exception as e:  # noqa: BLE001 — pypdf raises many types on damaged files; all mean the same here
        raise ExtractError(f"a damaged PDF that cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                           "re-save or re-export it") from None
    return str(title), "\n\n".join(pages)


def _declared_pages(reader) -> int:
    """/Count of the root page tree (0 when missing or not a number; the walk is bounded anyway)."""
    count = reader.trailer["/Root"].get_object()["/Pages"].get_object().get("/Count", 0)
    count = count.get_object() if hasattr(count, "get_object") else count
    return int(count) if isinstance(count, (int, float)) and count >= 0 else 0


def _open_without_password(reader) -> bool:
    """Many PDFs are 'encrypted' with an empty user password (only printing/copying is restricted)."""
    from pypdf import PasswordType

    return reader.decrypt("") != PasswordType.NOT_DECRYPTED


# -- Word (.docx): sizes checked before inflating, XML streamed through expat --------------------


def _docx(data: bytes, limits: Limits) -> tuple[str, str]:
    archive = _open_zip(data, limits)
    try:
        info = archive.getinfo("word/document.xml")
    except KeyError:
        raise ExtractError("a ZIP archive, not a Word document; unpack it and add the files inside") from None
    try:
        title = _docx_title(archive, limits)
        _check_part(info, limits)
        paragraphs = _WordText(limits)
        _stream_xml(archive, info, limits, paragraphs)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError,
            ValueError, RuntimeError) as e:  # a bad CRC, a truncated entry, an unknown compression
        raise ExtractError(f"a damaged Word document ({type(e).__name__}: {str(e)[:200]}); re-save it as .docx") \
            from None
    return title, "\n\n".join(paragraphs.out)


def _open_zip(data: bytes, limits: Limits) -> zipfile.ZipFile:
    """The archive, once its end record says it has few enough entries (the directory is then parsed)."""
    damaged = "a damaged ZIP archive (a .docx file is a ZIP archive); re-save it"
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_536 - 22))
    if end < 0 or len(data) < end + 22:
        raise ExtractError(damaged)
    entries = struct.unpack("<H", data[end + 10:end + 12])[0]
    if entries > limits.zip_entries:  # 0xFFFF: a ZIP64 directory, never a Word document's size
        raise ExtractError(f"a ZIP archive of {entries:,} entries (limit {limits.zip_entries:,}); "
                           "not a Word document")
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError):
        raise ExtractError(damaged) from None


def _check_part(info: zipfile.ZipInfo, limits: Limits) -> None:
    """Refuse a part whose declared size or compression ratio is a zip bomb's, before inflating it."""
    ratio = info.file_size / max(info.compress_size, 1)
    bomb = "; this looks like a zip bomb" if ratio > limits.zip_ratio else ""
    if info.file_size > limits.xml_bytes:
        raise ExtractError(f"it inflates to {_size(info.file_size)} of XML (limit {_size(limits.xml_bytes)})"
                           + (bomb or "; split the document"))
    if bomb and info.file_size > MB:
        raise ExtractError(f"its XML ({info.filename}) inflates {ratio:,.0f}-fold, {_size(info.compress_size)} to "
                           f"{_size(info.file_size)} (limit {limits.zip_ratio:,.0f}-fold){bomb}")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ExtractError(f"{info.filename} uses ZIP compression method {info.compress_type}, "
                           "which Word never writes; re-save it as .docx")


def _stream_xml(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: Limits, target) -> None:
    """Inflate a part in 64 kB pieces into an expat parser, counting: the directory may lie."""
    from xml.parsers import expat

    parser = expat.ParserCreate(namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def refuse(*_):
        raise ExtractError(f"{info.filename} declares a DTD (which can hide entity bombs); Word never writes one")

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler, parser.EndElementHandler = target.start, target.end
    parser.CharacterDataHandler = target.data
    parser.buffer_text = True
    total = 0
    try:
        with archive.open(info) as f:
            while chunk := f.read(1 << 16):
                total += len(chunk)
                if total > limits.xml_bytes:
                    raise ExtractError(f"it inflates to more than {_size(limits.xml_bytes)} of XML (the limit), "
                                       f"though its ZIP directory says {_size(info.file_size)}; this looks like "
                                       "a zip bomb")
                parser.Parse(chunk, False)
            parser.Parse(b"", True)
    except expat.ExpatError as e:
        raise ExtractError(f"a damaged Word document ({info.filename}: {e}); re-save it as .docx") from None


class _WordText:
    """Paragraph text from word/document.xml events, in document order: w:t runs, tabs and breaks;
    a table row becomes one paragraph of tab-separated cells. Content in mc:Fallback (the copy of a
    text box for old readers) is skipped, so nothing is read twice."""

    def __init__(self, limits: Limits):
        self.limits, self.out, self.chars = limits, [], 0
        self.para: list[str] = []
        self.cells: list[list[str]] = []  # paragraphs of each open table cell (nested tables nest)
        self.rows: list[list[str]] = []   # cells of each open table row
        self.in_text = self.in_run = self.fallback = 0

    @staticmethod
    def _local(name: str) -> str:
        return name.rpartition(" ")[2]

    def start(self, name: str, attrs) -> None:
        if self.fallback or name.endswith(" Fallback"):
            self.fallback += 1
            return
        tag = self._local(name)
        if tag == "t":
            self.in_text += 1
        elif tag == "r":
            self.in_run += 1
        elif tag == "tc":
            self.cells.append([])
        elif tag == "tr":
            self.rows.append([])
        elif self.in_run and tag in ("tab", "br", "cr", "noBreakHyphen"):
            self._text({"tab": "\t", "noBreakHyphen": "-"}.get(tag, "\n"))

    def end(self, name: str) -> None:
        if self.fallback:
            self.fallback -= 1
            return
        tag = self._local(name)
        if tag == "t":
            self.in_text = max(self.in_text - 1, 0)
        elif tag == "r":
            self.in_run = max(self.in_run - 1, 0)
        elif tag == "p":
            self._paragraph("".join(self.para))
            self.para.clear()
        elif tag == "tc" and self.cells:
            cell = "\n".join(self.cells.pop())
            if self.rows:
                self.rows[-1].append(cell)
        elif tag == "tr" and self.rows:
            self._paragraph("\t".join(self.rows.pop()))

    def data(self, text: str) -> None:
        if self.in_text and not self.fallback:
            self._text(text)

    def _text(self, text: str) -> None:
        self.para.append(text)
        self.chars += len(text)
        if self.chars > self.limits.text_chars:
            raise ExtractError(_too_much_text(self.chars, self.limits, at_least=True))

    def _paragraph(self, text: str) -> None:
        if text:
            (self.cells[-1] if self.cells else self.out).append(text)


def _docx_title(archive: zipfile.ZipFile, limits: Limits) -> str:
    """dc:title from docProps/core.xml; "" when missing, too large or unreadable (the text still counts)."""
    try:
        info = archive.getinfo("docProps/core.xml")
    except KeyError:
        return ""
    if info.file_size > MB or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return ""

    class Title:
        def __init__(self):
            self.depth, self.parts = 0, []

        def start(self, name, attrs):
            self.depth += name == "http://purl.org/dc/elements/1.1/ title"

        def end(self, name):
            self.depth -= name == "http://purl.org/dc/elements/1.1/ title"

        def data(self, text):
            if self.depth:
                self.parts.append(text)

    title = Title()
    try:
        _stream_xml(archive, info, dataclasses.replace(limits, xml_bytes=MB), title)
    except (ExtractError, zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError):
        return ""
    return "".join(title.parts)


_READERS = {"text": _plain, "markdown": _markdown, "html": _html, "pdf": _pdf, "docx": _docx}


# -- the worker process -------------------------------------------------------------------------

_IN_PROCESS = ("text", "markdown")
_START_SECONDS = 60.0  # for a worker to start and say it is ready (a loaded machine can be slow)
MAX_WORKERS = 4        # worker processes at once in this process (each may use Limits.memory_bytes)
_IDLE_MAX = 2          # warm workers kept for the next file or request
# The worker imports `muse.apps.extract` without running `muse/__init__.py` (which imports torch:
# seconds of start and gigabytes of address space) by registering the package's folder bare.
_BOOT = """\
import sys, types
sys.path[:] = {path!r}
package = types.ModuleType("muse")
package.__path__ = [{package!r}]
sys.modules["muse"] = package
from muse.apps.extract import _worker_main
_worker_main(sys.argv[1])
"""


def _send(f, payload: bytes) -> None:
    f.write(struct.pack("!Q", len(payload)))
    f.write(payload)


def _recv(f, limit: int) -> bytes | None:
    """One length-prefixed frame; None at end of stream (the other side is gone) or over `limit`."""
    head = f.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("!Q", head)
    if size > limit:
        return None
    payload = f.read(size)
    return payload if len(payload) == size else None


def _worker_main(limits_json: str) -> None:
    """The worker: read requests from stdin, parse each under the limits, answer on stdout."""
    import logging
    import signal
    import warnings

    limits = Limits(**json.loads(limits_json))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes where stderr goes, not into the answers
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)  # pypdf logs every oddity of a damaged file
    import pypdf  # noqa: F401 — imported before the limit, and once
    from xml.parsers import expat  # noqa: F401

    _limit("RLIMIT_AS", limits.memory_bytes)
    requests = sys.stdin.buffer
    _send(answers, b'{"ready": true}')
    answers.flush()
    while (head := _recv(requests, MB)) is not None and (data := _recv(requests, limits.file_bytes)) is not None:
        request = json.loads(head)
        _limit_cpu(limits.seconds)
        try:
            doc = parse(data, request["kind"], request["title"], limits)
            answer = {"ok": True, "title": doc.title, "text": doc.text, "kind": doc.kind}
        except ExtractError as e:
            answer = {"ok": False, "error": str(e)}
        except MemoryError:
            answer = {"ok": False, "fatal": True,
                      "error": f"reading it needs more than {_size(limits.memory_bytes)} of memory (the limit); "
                               "it may be crafted to exhaust memory"}
        except RecursionError:
            answer = {"ok": False, "fatal": True, "error": "it is nested too deeply to read"}
        except Exception as e:  # noqa: BLE001 — a reader's bug on a strange file is that file's problem
            answer = {"ok": False, "error": f"it could not be read ({type(e).__name__}: {str(e)[:200]})"}
        del data
        answer["peak_rss"] = _peak_rss()
        _send(answers, json.dumps(answer, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        answers.flush()
        if answer.get("fatal"):
            return  # after a MemoryError the heap may be in pieces: start afresh


def _limit(name: str, value: int) -> None:
    """Lower a resource limit's soft value (never above the hard one); a no-op where unsupported."""
    try:
        import resource

        which = getattr(resource, name)
        soft, hard = resource.getrlimit(which)
        value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        resource.setrlimit(which, (value, hard))
    except (ImportError, AttributeError, ValueError, OSError):
        pass  # e.g. macOS refuses RLIMIT_AS: the wall-time limit still holds


def _limit_cpu(seconds: float) -> None:
    """A CPU-time backstop for this request (SIGXCPU), should the parent be gone and its timer with it."""
    try:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        _limit("RLIMIT_CPU", usage.ru_utime + usage.ru_stime + 2 * seconds + 5)
    except ImportError:
        pass


def _peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux: VmHWM (getrusage's ru_maxrss would count
    the parent's memory at fork), else ru_maxrss."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except ImportError:
        return 0


class _Worker:
    """One worker process and its pipes; `call` is one request, killed past its deadline."""

    def __init__(self, limits: Limits):
        """Start a worker; the caller holds one of the `_slots`, which `kill` gives back."""
        self.limits = limits
        package = str(Path(__file__).resolve().parents[1])
        boot = _BOOT.format(path=list(sys.path), package=package)
        self.expired = False
        self._killed = threading.Lock()
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", boot,
                                          json.dumps(dataclasses.asdict(limits))],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError as e:
            _slots.release()
            raise ExtractError(f"cannot start the extraction worker: {e.strerror or e}") from None
        if self._exchange(None, _START_SECONDS) is None:
            why = f"not ready within {_START_SECONDS:g} s" if self.expired else self.why()
            self.kill()
            raise ExtractError(f"the extraction worker did not start ({why}); "
                               f"check that `{sys.executable} -c 'import pypdf'` works")

    def call(self, request: dict, data: bytes) -> dict | None:
        """The worker's answer, or None when it died or was killed (see `why`)."""
        return self._exchange((json.dumps(request).encode(), data), self.limits.seconds)

    def _exchange(self, frames, seconds: float) -> dict | None:
        timer = threading.Timer(seconds, self._expire)
        timer.daemon = True
        timer.start()
        try:
            if frames:
                for frame in frames:
                    _send(self.proc.stdin, frame)
                self.proc.stdin.flush()
            answer = _recv(self.proc.stdout, 1 << 40)
        except (OSError, ValueError):  # a broken pipe: it died (or was killed) while we wrote
            answer = None
        finally:
            timer.cancel()
        return None if answer is None else json.loads(answer.decode("utf-8", "surrogatepass"))

    def _expire(self) -> None:
        self.expired = True
        self.kill()

    def kill(self) -> None:
        """Kill it (from any thread; again is a no-op) and give its slot back."""
        if not self._killed.acquire(blocking=False):
            return
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):  # after the exit: a reader blocked on them has its EOF
            try:
                f.close()
            except (OSError, ValueError):
                pass
        _slots.release()

    def alive(self) -> bool:
        return self.proc.poll() is None and not self.expired and not self._killed.locked()

    def why(self) -> str:
        """Why the last call got no answer."""
        if self.expired:
            return (f"reading it took longer than {self.limits.seconds:g} s (the limit) and was stopped; "
                    "it may be crafted to hang the reader")
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            return "the reader process stopped answering and was stopped"
        if code < 0:
            import signal

            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
            return (f"the reader process died ({name}) while reading it; the file may be damaged or crafted to "
                    f"exhaust memory (limit {_size(self.limits.memory_bytes)}) or time")
        return f"the reader process exited with status {code} while reading it"


_idle: list[_Worker] = []
_idle_lock = threading.Lock()
_slots = threading.BoundedSemaphore(MAX_WORKERS)


def _checkout(limits: Limits, cancelled) -> _Worker:
    """A warm worker for `limits`, or a new one once fewer than MAX_WORKERS run (waiting while
    `cancelled()` is false; other workers finish within their time limit)."""
    while True:
        with _idle_lock:
            while _idle:
                worker = _idle.pop()
                if worker.limits == limits and worker.alive():
                    return worker
                worker.kill()
        if _slots.acquire(timeout=0.1):
            return _Worker(limits)
        if cancelled():
            raise ExtractError(CANCELLED)


def _checkin(worker: _Worker) -> None:
    with _idle_lock:
        if worker.alive() and len(_idle) < _IDLE_MAX:
            _idle.append(worker)
            return
    worker.kill()


def _close_idle() -> None:
    with _idle_lock:
        workers, _idle[:] = list(_idle), []
    for w in workers:
        w.kill()


atexit.register(_close_idle)

class Extractor:
    """Extracts files one after another: plain text here, the rest in a worker process under the
    time and memory limits. Use as a context manager (the worker goes back to a small pool).

    `cancel()`, from any thread, kills the work in progress; every later call raises ExtractError.
    `peak_rss` is the largest resident memory the worker reported (bytes; for measurements).
    """

    def __init__(self, limits: Limits = LIMITS):
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a muse.apps.extract.Limits, got {type(limits).__name__}")
        self.limits = limits
        self.cancelled = False
        self.peak_rss = 0
        self._worker: _Worker | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> "Extractor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def extract(self, path: "str | Path") -> Extracted:
        """The title and text of the file at `path` (a regular file; FIFOs and devices are refused)."""
        kind = kind_of(path)
        data, _ = read_file(path, self.limits.file_bytes)
        return self.extract_bytes(data, kind, default_title=Path(path).stem)

    def extract_bytes(self, data: bytes, kind: str, default_title: str = "") -> Extracted:
        """The title and text in `data`, a file's bytes; `kind` as in `SUFFIXES`' values."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        if self.cancelled:
            raise ExtractError(CANCELLED)
        if (sniff(data) or kind) in _IN_PROCESS or len(data) > self.limits.file_bytes or data.isspace():
            return parse(data, kind, default_title, self.limits)
        return self._in_worker(data, kind, default_title)

    def _in_worker(self, data: bytes, kind: str, title: str) -> Extracted:
        with self._lock:
            worker, self._worker = self._worker, None
        worker = worker or _checkout(self.limits, lambda: self.cancelled)
        with self._lock:
            self._worker = worker
        if self.cancelled:  # cancel() ran while the worker started
            worker.kill()
            raise ExtractError(CANCELLED)
        try:
            answer = worker.call({"kind": kind, "title": title}, data)
        except BaseException:  # KeyboardInterrupt while waiting: the worker's state is unknown
            with self._lock:
                self._worker = None
            worker.kill()
            raise
        if answer is None or answer.get("fatal"):
            with self._lock:
                self._worker = None
            reason = CANCELLED if self.cancelled else answer["error"] if answer else worker.why()
            worker.kill()
            raise ExtractError(reason)
        self.peak_rss = max(self.peak_rss, answer.get("peak_rss", 0))
        if not answer["ok"]:
            raise ExtractError(answer["error"])
        return Extracted(title=answer["title"], text=answer["text"], kind=answer["kind"])

    def cancel(self) -> None:
        """Kill the work in progress (from any thread); later calls raise ExtractError."""
        with self._lock:
            self.cancelled = True
            worker = self._worker
        if worker is not None:
            worker.kill()

    def close(self) -> None:
        """Give the worker back to the pool (killed when the pool is full or this was cancelled)."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            if self.cancelled:
                worker.kill()
            else:
                _checkin(worker)
