"""Plain text out of the files people keep: .txt, .md, .html, .pdf and .docx.

    from muse.apps.extract import extract, ExtractError
    doc = extract("notes/manual.pdf")      # Extracted(title=..., text=..., kind="pdf")

Every way a file can fail to give text (missing, empty, binary, an unknown encoding, an encrypted or
corrupt PDF, python-docx not installed) raises `ExtractError` whose message is the reason to show
the user; the knowledge base reports it and skips the file.

Plain text is read as UTF-8 (with or without a byte-order mark), then GB18030 (the superset of GBK
and GB2312 most Chinese files that are not UTF-8 use); anything else is refused rather than guessed.
The kind of a file comes from its content where the content says it (PDFs start with `%PDF-`,
Word files are ZIP archives holding `word/document.xml`), otherwise from its extension.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from muse.apps.text import han_count
from muse.errors import MuseError

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
                 ".html": "html", ".htm": "html", ".xhtml": "html"}
SUFFIXES = {**TEXT_SUFFIXES, ".pdf": "pdf", ".docx": "docx"}


class ExtractError(MuseError):
    """A file that gives no usable text; the message says why and what to do."""


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


def read_bytes(path: "str | Path") -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ExtractError("no such file") from None
    except OSError as e:
        raise ExtractError(f"cannot read the file: {e.strerror or e}") from None


def extract(path: "str | Path") -> Extracted:
    """The title and text of one file. Raises ExtractError with the reason when it has none."""
    kind = kind_of(path)
    return extract_bytes(read_bytes(path), kind, default_title=Path(path).stem)


def extract_bytes(data: bytes, kind: str, default_title: str = "") -> Extracted:
    """Like `extract`, for bytes already read (uploads); `kind` as in `SUFFIXES`' values."""
    if not data.strip():
        raise ExtractError("the file is empty")
    kind = _sniff(data) or kind
    readers = {"text": _plain, "markdown": _markdown, "html": _html, "pdf": _pdf, "docx": _docx}
    if kind not in readers:
        raise ValueError(f"kind must be one of {sorted(readers)}, got {kind!r}")
    title, text = readers[kind](data)
    text = _tidy(text)
    if not text:
        raise ExtractError("no text found in the file" + (
            " (a scanned PDF holds images only: run OCR on it first, e.g. `ocrmypdf in.pdf out.pdf`)"
            if kind == "pdf" else ""))
    return Extracted(title=(title or default_title).strip() or "untitled", text=text, kind=kind)


def _sniff(data: bytes) -> str | None:
    if data[:1024].lstrip().startswith(b"%PDF-"):
        return "pdf"
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                if "word/document.xml" in z.namelist():
                    return "docx"
        except zipfile.BadZipFile:
            raise ExtractError("a damaged ZIP archive (a .docx file is a ZIP archive); re-save it") from None
        raise ExtractError("a ZIP archive, not a Word document; unpack it and add the files inside")
    return None


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
    non_ascii = sum(1 for c in text if ord(c) > 127) if text else 0
    if text is not None and non_ascii and han_count(text) >= 0.8 * non_ascii:
        return text
    raise ExtractError(f"not UTF-8 or GB18030 text (undecodable byte at offset {utf8_error.start}); "
                       "convert it to UTF-8 first, e.g. `iconv -f LATIN1 -t UTF-8 in.txt > out.txt`")


def _tidy(text: str) -> str:
    """Normalise line ends, drop trailing spaces and runs of blank lines; keep paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x0c", "\n")
    text = re.sub(r"[ \t\u00a0]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _control_share(text: str) -> float:
    bad = sum(1 for c in text if ord(c) < 32 and c not in "\n\r\t\x0c")
    return bad / max(len(text), 1)


def _plain(data: bytes) -> tuple[str, str]:
    text = decode_text(data)
    if _control_share(text) > 0.01:
        raise ExtractError("a binary file, not text")
    return "", text


def _markdown(data: bytes) -> tuple[str, str]:
    _, text = _plain(data)
    heading = re.search(r"^#\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
    return (heading.group(1) if heading else ""), text


_BLOCKS = ["p", "div", "section", "article", "header", "footer", "main", "aside", "nav", "li", "ul", "ol",
           "table", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "dt", "dd",
           "figcaption", "hr"]


def _html(data: bytes) -> tuple[str, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(decode_text(data), "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    if soup.title:
        soup.title.decompose()
    # Inline tags (<b>, <a>) stay inside their sentence; block tags end a paragraph, <br> a line.
    for tag in soup.find_all(_BLOCKS):
        tag.insert_after("\n\n")
    for br in soup.find_all("br"):
        br.replace_with("\n")
    lines = (re.sub(r"[ \t\r\n]+", " ", para).strip() for para in soup.get_text().split("\n\n"))
    return title, "\n\n".join(line for line in lines if line)


def _pdf(data: bytes) -> tuple[str, str]:
    import pypdf
    from pypdf.errors import DependencyError, PdfReadError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not _open_without_password(reader):
            raise ExtractError("an encrypted (password-protected) PDF; save an unprotected copy first, "
                               "e.g. `qpdf --decrypt --password=PASSWORD in.pdf out.pdf`")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title or "") if reader.metadata else ""
    except ExtractError:
        raise
    except DependencyError:
        raise ExtractError("an encrypted PDF whose cipher needs the `cryptography` package; "
                           "decrypt it first with `qpdf --decrypt`") from None
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        # pypdf raises many exception types on damaged files; all mean the same to the user.
        raise ExtractError(f"a damaged PDF that cannot be read ({type(e).__name__}: {e}); "
                           "re-save or re-export it") from None
    return str(title), "\n\n".join(pages)


def _open_without_password(reader) -> bool:
    """Many PDFs are 'encrypted' with an empty user password (only printing/copying is restricted)."""
    from pypdf import PasswordType

    return reader.decrypt("") != PasswordType.NOT_DECRYPTED


def _docx(data: bytes) -> tuple[str, str]:
    try:
        import docx
    except ImportError:
        raise ExtractError("reading .docx files needs python-docx: `pip install python-docx`") from None
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as e:  # python-docx raises KeyError, BadZipFile, lxml errors … on damaged files
        raise ExtractError(f"a damaged Word document ({type(e).__name__}); re-save it as .docx") from None
    parts = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            parts.append("\t".join(cell.text for cell in row.cells))
    return document.core_properties.title or "", "\n\n".join(parts)
