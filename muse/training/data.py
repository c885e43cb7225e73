"""Data preparation: a text corpus -> `train.bin` / `val.bin` token files for training.

    manifest = prepare(["books/", "notes/*.md", "chat.jsonl"], "data/mine", tokenizer="smollm2-135m")
    for w in manifest.warnings: print(w)          # skipped binary files, replaced bytes, bad JSONL lines
    data = load_prepared("data/mine")             # .train / .val: read-only np.memmap of token ids

What a prepared directory holds (written atomically: a crash leaves the previous one intact):
  train.bin, val.bin   raw token ids, uint16 when the vocabulary has < 65536 tokens, else uint32
                       (the nanoGPT layout: `np.memmap(path, dtype, mode="r")`)
  tokenizer.json, tokenizer_config.json   the tokenizer that made them
  manifest.json        sources (path, bytes, documents, tokens, skipped / replaced bytes), totals,
                       dtype, vocab size, the tokenizer's sha256, split sizes, time, Muse version

Documents. A plain text file (.txt, .md, anything that is not binary) is one document. A JSONL
file (`.jsonl`, `.ndjson`) holds one JSON object per line and each object's `text_field` is a
document; a `.json` file holds an array of such objects (or one object). Documents are joined
with the tokenizer's EOS token after each one (no BOS is added); a character-level tokenizer has
no EOS, so its documents are simply concatenated (as nanoGPT's shakespeare_char does).

The split: the last `val_fraction` of the token stream is validation, the rest training — as
nanoGPT does (`train = data[:int(n * 0.9)]`), so the numbers are comparable with its examples.

Bad input is reported, not silently dropped: binary files (NUL bytes or many control characters)
are skipped; bytes that are not UTF-8 are replaced with U+FFFD (`encoding_errors="replace"`) or
the whole file is skipped (`"skip"`); JSONL lines that are not JSON objects with a string
`text_field` are skipped. Each case is counted per file in the manifest and listed in
`Manifest.warnings` with its file (and line). Nothing is truncated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from muse.errors import MuseError
from muse.fileio import atomic_dir
from muse.tokenizer import Tokenizer

MANIFEST_FORMAT = "muse-data"
MANIFEST_VERSION = 1
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
JSON_SUFFIXES = {".json"}
ENCODING_ERRORS = ("replace", "skip")

_READ_BYTES = 256 << 10  # text files are read and encoded in ~256 KB pieces (bounded memory, parallel encode)
_BATCH_CHARS = 1 << 20  # encode_batch() about this many characters at a time
_SNIFF_BYTES = 8192  # binary detection looks at the start of a file
_MAX_LISTED = 20  # per-file malformed JSONL line numbers kept in the manifest


class DataError(MuseError):
    """A corpus that cannot be prepared, or a prepared directory that cannot be used."""


# ------------------------------------------------------------------------------------- results


@dataclass
class SourceReport:
    """What happened to one input file."""

    path: str
    bytes: int
    status: str = "ok"  # "ok" | "skipped"
    reason: str | None = None  # why it was skipped
    documents: int = 0
    tokens: int = 0
    characters: int = 0
    invalid_bytes: int = 0  # bytes that were not UTF-8 (replaced with U+FFFD, or the file skipped)
    malformed_lines: int = 0  # JSONL lines skipped
    malformed_at: list[int] = field(default_factory=list)  # their line numbers (the first few)

    def warnings(self) -> list[str]:
        out = []
        if self.status == "skipped":
            out.append(f"{self.path}: skipped ({self.reason})")
        elif self.invalid_bytes:
            out.append(f"{self.path}: {self.invalid_bytes:,} bytes were not valid UTF-8 and were replaced with U+FFFD")
        if self.malformed_lines:
            lines = ", ".join(f"{self.path}:{n}" for n in self.malformed_at)
            unlisted = self.malformed_lines - len(self.malformed_at)
            more = f" (+{unlisted} more)" if unlisted else ""
            out.append(f"{self.malformed_lines:,} malformed JSON line(s) skipped: {lines}{more}")
        return out


@dataclass
class Manifest:
    """The result of `prepare`: where it went and what `manifest.json` says (`data`)."""

    out_dir: Path
    data: dict[str, Any]

    @property
    def train_tokens(self) -> int:
        return self.data["split"]["train_tokens"]

    @property
    def val_tokens(self) -> int:
        return self.data["split"]["val_tokens"]

    @property
    def vocab_size(self) -> int:
        return self.data["vocab_size"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def sources(self) -> list[dict]:
        return self.data["sources"]

    @property
    def warnings(self) -> list[str]:
        """One line per skipped file, file with replaced bytes, or group of malformed JSONL lines."""
        return self.data["warnings"]


@dataclass
class PreparedData:
    """A prepared directory, opened: token ids as read-only memory maps, plus the tokenizer."""

    path: Path
    train: np.ndarray  # np.memmap (read-only), shape (train_tokens,)
    val: np.ndarray  # np.memmap (read-only), shape (val_tokens,); empty if val_fraction was 0
    tokenizer: Tokenizer
    manifest: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]


# ------------------------------------------------------------------------------------- prepare


def prepare(
    sources,
    out_dir,
    *,
    tokenizer: Tokenizer | str | Path | None = None,
    char_level: bool = False,
    val_fraction: float = 0.1,
    text_field: str = "text",
    encoding_errors: str = "replace",
    block_size: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Manifest:
    """Tokenize a corpus into `out_dir` (train.bin, val.bin, manifest.json, the tokenizer).

    `sources`: one or a list of files, folders (read recursively, hidden files skipped) and glob
    patterns (`"notes/**/*.md"`). `tokenizer`: a `Tokenizer`, a tokenizer directory or
    `tokenizer.json`, or a model name / path (`muse.load` accepts the same; only its tokenizer is
    read); None means the default model's tokenizer. `char_level=True` instead builds a
    character vocabulary from the corpus (sorted set of its characters, like nanoGPT's
    shakespeare_char). `val_fraction`: the last fraction of the token stream kept for validation.
    `text_field`: the key holding the text in JSONL/JSON objects. `encoding_errors`: "replace"
    invalid UTF-8 bytes with U+FFFD, or "skip" such files; either way they are reported.
    `block_size`: if given, fail unless train and val each have more than `block_size` tokens.
    `meta`: JSON-able facts to record under "meta" in the manifest (e.g. the recipe that made it).

    Raises `DataError` for no matching sources, an empty corpus or one too small for
    `block_size`; `ValueError` for out-of-range arguments. See the module docstring for the
    format and the warnings in `Manifest.warnings`.
    """
    _check_prepare_args(tokenizer, char_level, val_fraction, text_field, encoding_errors, block_size)
    out_dir = _writable_out_dir(out_dir)
    files = resolve_sources(sources, exclude=out_dir)
    reports = {f: SourceReport(path=str(f), bytes=f.stat().st_size) for f in files}
    corpus = _Corpus(files, reports, text_field, encoding_errors)

    if char_level:
        chars = corpus.characters()
        if not chars:
            _check_size(0, val_fraction, block_size, reports)  # raises: the corpus is empty
        tok, tok_source = char_tokenizer(chars), "char-level"
    else:
        tok, tok_source = load_tokenizer(tokenizer)
    eos = tok.token_to_id(tok.eos_tokens[0]) if tok.eos_tokens else None
    vocab_size = tok.vocab_size
    dtype = np.uint16 if vocab_size < 65536 else np.uint32

    data: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        # A character-level tokenizer can always encode a document in pieces; others are probed.
        split = char_level or _can_split(tok)
        total = _write_tokens(corpus, tok, eos, dtype, tmp / "train.bin", split)
        _check_size(total, val_fraction, block_size, reports)
        n_train = int(total * (1 - val_fraction))  # nanoGPT: data[:int(n * 0.9)]
        _split_tail(tmp / "train.bin", tmp / "val.bin", n_train * np.dtype(dtype).itemsize)
        tok.save(tmp)
        data.update(_manifest(
            reports, tok, tok_source, char_level, np.dtype(dtype).name, n_train, total - n_train, val_fraction,
            text_field, encoding_errors, _sha256(tmp / "tokenizer.json"), meta or {},
        ))
        (tmp / "manifest.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    atomic_dir(out_dir, write)  # a full disk: DiskFullError, the previous out_dir untouched
    return Manifest(out_dir, data)


def _check_prepare_args(tokenizer, char_level, val_fraction, text_field, encoding_errors, block_size) -> None:
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    if char_level and tokenizer is not None:
        raise ValueError("Pass either tokenizer=... or char_level=True, not both.")


def _writable_out_dir(out_dir) -> Path:
    """`out_dir`, unless it holds something other than a previous `prepare` (never overwritten)."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file()):
        raise DataError(
            f"{out_dir} exists and is not a prepared data directory; refusing to overwrite it. "
            f"Choose another out_dir or remove it."
        )
    return out_dir


def resolve_sources(sources, exclude: Path | None = None) -> list[Path]:
    """The files that `sources` (paths, folders, globs; one or a list) name, sorted, without duplicates.

    Folders are walked recursively, skipping hidden files and folders (names starting with ".")
    and anything under `exclude` (the output directory, when it sits inside a source folder).
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise DataError("No sources given: pass files, folders or glob patterns to prepare.")
    excluded = exclude.resolve() if exclude is not None else None
    found: dict[Path, None] = {}
    unmatched = []
    for src in sources:
        text = str(src)
        path = Path(text).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        elif any(c in text for c in "*?["):
            root, pattern = _split_glob(path)
            matches = sorted(p for p in root.glob(pattern) if p.is_file())
        else:
            raise DataError(f"Source {text!r} does not exist: pass an existing file, folder or glob pattern.")
        matches = [p for p in matches if excluded is None or not p.resolve().is_relative_to(excluded)]
        if not matches:
            unmatched.append(text)
        for p in matches:
            found.setdefault(p.resolve(), None)
    if not found:
        raise DataError(
            f"No files matched {', '.join(map(repr, unmatched))}. Check the paths and glob patterns "
            f"(quote globs so your shell does not expand them; '**' matches subfolders)."
        )
    return list(found)


def load_tokenizer(spec: Tokenizer | str | Path | None) -> tuple[Tokenizer, str]:
    """(tokenizer, description) from a Tokenizer, a tokenizer dir / tokenizer.json, or a model name or path.

    For a model only the tokenizer is read (a GGUF's metadata, a model directory's
    tokenizer.json), never the weights. None means the default model.
    """
    if isinstance(spec, Tokenizer):
        return spec, "given"
    from muse.checkpoints import resolve
    from muse.errors import CheckpointError

    if spec is not None:
        path = Path(spec).expanduser()
        if path.is_file() and path.name == "tokenizer.json":
            return Tokenizer.from_dir(path.parent), str(path.resolve())
        if path.is_dir() and (path / "tokenizer.json").is_file():
            return Tokenizer.from_dir(path), str(path.resolve())
    src = resolve(spec)
    if src.kind == "gguf":
        from muse.checkpoints.gguf_file import open_reader

        reader = open_reader(src.path)
        if "tokenizer.ggml.tokens" not in reader.fields:
            raise CheckpointError(f"{src.path} has no tokenizer; pass a tokenizer directory instead.")
        return Tokenizer.from_gguf(reader), src.name
    if not (src.path / "tokenizer.json").is_file():
        raise CheckpointError(f"The model at {src.path} has no tokenizer.json; pass a tokenizer explicitly.")
    return Tokenizer.from_dir(src.path), src.name


def char_tokenizer(chars: Iterable[str]) -> Tokenizer:
    """A character-level tokenizer: id i is the i-th of the sorted distinct `chars`.

    Built as a `tokenizers` WordLevel model over single characters (no special tokens, no
    normalization), so it saves as a plain tokenizer.json and decodes text back exactly.
    A character that was not in `chars` cannot be encoded.
    """
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(set(chars)))}
    if not vocab:
        raise DataError("The corpus has no characters, so there is no vocabulary to build.")
    if any(len(c) != 1 for c in vocab):
        raise ValueError("char_tokenizer needs single characters")
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per code point
    backend.decoder = decoders.Fuse()  # join the pieces as they are (WordLevel alone would add spaces)
    return Tokenizer(backend, bos_token=None, eos_tokens=[], pad_token=None, add_bos=False, chat_template=None)


# ------------------------------------------------------------------------------------- load


def load_prepared(data_dir) -> PreparedData:
    """Open a directory written by `prepare`, checking that it is complete and consistent.

    Checks: manifest.json readable; train.bin / val.bin present with the sizes the manifest
    records (a whole number of tokens); the tokenizer's sha256 matches; every token id is below
    the vocabulary size. Raises `DataError` saying what is wrong and to re-run prepare.
    """
    path = Path(data_dir).expanduser()
    redo = "Re-run `muse data prepare` (muse.training.data.prepare) to rebuild it."
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise DataError(f"{path} is not a prepared data directory (no manifest.json). {redo}")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        assert manifest.get("format") == MANIFEST_FORMAT
        dtype = np.dtype(manifest["dtype"])
        vocab_size = int(manifest["vocab_size"])
        counts = {"train": int(manifest["split"]["train_tokens"]), "val": int(manifest["split"]["val_tokens"])}
        expected_sha = manifest["tokenizer"]["sha256"]
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as e:
        raise DataError(f"{manifest_file} is corrupt or not a Muse data manifest ({e!r}). {redo}") from e

    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise DataError(f"{path} has no tokenizer.json. {redo}")
    if _sha256(tok_file) != expected_sha:
        raise DataError(
            f"{tok_file} is not the tokenizer these tokens were made with (sha256 differs from the "
            f"manifest's {expected_sha[:12]}…): the ids would decode to the wrong text. {redo}"
        )
    tokenizer = Tokenizer.from_dir(path)

    arrays = {}
    for split, count in counts.items():
        file = path / f"{split}.bin"
        if not file.is_file():
            raise DataError(f"{file} is missing. {redo}")
        size = file.stat().st_size
        if size % dtype.itemsize or size // dtype.itemsize != count:
            raise DataError(
                f"{file} is {size:,} bytes, but the manifest records {count:,} {dtype.name} tokens "
                f"({count * dtype.itemsize:,} bytes): the file is truncated or corrupt. {redo}"
            )
        arr = np.memmap(file, dtype=dtype, mode="r") if count else np.zeros(0, dtype=dtype)
        for start in range(0, count, 1 << 24):  # chunked so a huge file is never read at once
            top = int(arr[start:start + (1 << 24)].max())
            if top >= vocab_size:
                raise DataError(f"{file} holds token id {top}, but the vocabulary has {vocab_size} tokens. {redo}")
        arrays[split] = arr
    return PreparedData(path, arrays["train"], arrays["val"], tokenizer, manifest)


# ------------------------------------------------------------------------------------- reading


class _Corpus:
    """The documents of the resolved files, read lazily (possibly twice: chars, then tokens)."""

    def __init__(self, files: list[Path], reports: dict[Path, SourceReport], text_field: str, errors: str):
        self.files, self.reports, self.text_field, self.errors = files, reports, text_field, errors
        self._checked: set[Path] = set()

    def characters(self) -> set[str]:
        chars: set[str] = set()
        for _, _, piece in self.pieces(count=False):
            chars.update(piece)
        return chars

    def pieces(self, count: bool = True, split: bool = True) -> Iterator[tuple[Path, bool, str]]:
        """(file, ends_document, text) for every piece of every document, in order.

        A document is one piece unless it is bigger than `_READ_BYTES`; then it comes in pieces
        cut at line breaks that are pre-token boundaries for byte-level BPE (see `_text_pieces`),
        so encoding the pieces gives the same ids as encoding the whole (`split=False`: never cut,
        for tokenizers where that does not hold — see `_can_split`).
        With `count`, the reports are filled in (documents, characters, invalid bytes, ...).
        """
        for file in self.files:
            report = self.reports[file]
            if file not in self._checked:
                self._check_file(file, report)
                self._checked.add(file)
            if report.status != "ok":
                continue
            suffix = file.suffix.lower()
            if suffix in JSONL_SUFFIXES or suffix in JSON_SUFFIXES:
                docs = self._json_documents(file, report, count, suffix in JSONL_SUFFIXES)
                for doc in docs:
                    yield file, True, doc
                continue
            pieces = _text_pieces(file) if split else [_whole(file)]
            if count:
                report.documents += 1
            last = None
            for raw in pieces:
                if last is not None:
                    yield file, False, last
                text, bad = _decode(raw, self.errors)
                if count:
                    report.invalid_bytes += bad
                    report.characters += len(text)
                last = text
            if last is not None:
                yield file, True, last

    def _check_file(self, file: Path, report: SourceReport) -> None:
        """Skip binary files, and non-UTF-8 files when errors="skip", before any of them is read."""
        with open(file, "rb") as f:
            head = f.read(_SNIFF_BYTES)
        if not head:
            report.status, report.reason = "skipped", "empty file"
            return
        if _looks_binary(head):
            report.status, report.reason = "skipped", "binary file (NUL bytes or many control characters)"
            return
        if self.errors == "skip":
            bad = sum(_decode(raw, "replace")[1] for raw in _text_pieces(file))
            if bad:
                report.invalid_bytes = bad
                report.status, report.reason = "skipped", f"not valid UTF-8 ({bad:,} invalid bytes)"

    def _json_documents(self, file: Path, report: SourceReport, count: bool, jsonl: bool) -> Iterator[str]:
        def bad(line_no: int) -> None:
            if count:
                report.malformed_lines += 1
                if len(report.malformed_at) < _MAX_LISTED:
                    report.malformed_at.append(line_no)

        def text_of(obj) -> str | None:
            value = obj.get(self.text_field) if isinstance(obj, dict) else None
            return value if isinstance(value, str) else None

        if jsonl:
            with open(file, "rb") as f:
                for line_no, raw in enumerate(f, 1):
                    line, invalid = _decode(raw, self.errors)
                    if count:
                        report.invalid_bytes += invalid
                    if not line.strip():
                        continue
                    try:
                        text = text_of(json.loads(line))
                    except json.JSONDecodeError:
                        text = None
                    if text is None:
                        bad(line_no)
                    elif text:
                        if count:
                            report.documents += 1
                            report.characters += len(text)
                        yield text
            return
        raw_all = file.read_bytes()
        content, invalid = _decode(raw_all, self.errors)
        if count:
            report.invalid_bytes += invalid
        try:
            data = json.loads(content)
        except json.JSONDecodeError as e:
            if count:
                report.status, report.reason = "skipped", f"not valid JSON (line {e.lineno}: {e.msg})"
            return
        items = data if isinstance(data, list) else [data]
        for i, obj in enumerate(items):
            text = text_of(obj)
            if text is None:
                bad(i + 1)  # for a JSON array: the item's position, 1-based
            elif text:
                if count:
                    report.documents += 1
                    report.characters += len(text)
                yield text


def _whole(file: Path) -> bytes:
    return file.read_bytes().removeprefix(b"\xef\xbb\xbf")


def _can_split(tok: Tokenizer) -> bool:
    """Whether encoding a text in pieces cut at `_text_pieces`' line breaks gives the ids of the whole.

    True for GPT-2 / Llama 3 / Qwen2-style byte-level BPE; False e.g. for sentencepiece-style
    tokenizers that prepend "▁" to every input. Probed on a few such cuts.
    """
    probes = [("Hello,", "World"), ("end.", "Next"), ("你好", "世界"), ("1", "2"), ("(a)", "#b")]
    enc = functools.partial(tok.backend.encode, add_special_tokens=False)
    return all(enc(f"{a}\n{b}").ids == enc(f"{a}\n").ids + enc(b).ids for a, b in probes)


def _text_pieces(file: Path) -> Iterator[bytes]:
    """The bytes of `file`: all at once if it has at most `_READ_BYTES`, else in pieces of about
    that size, each cut after a line break that sits between two non-space characters ("x\\ny").

    No GPT-2 / Llama 3 / Qwen2-style split rule lets a pre-token run across such a line break,
    so encoding the pieces one by one gives the ids of the whole. A newline byte never occurs
    inside a UTF-8 (or GBK) multi-byte character, so every piece decodes on its own. A file
    without such a cut point comes as one piece.
    """
    buf = b""
    first = True
    with open(file, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            if first:
                chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not text
                first = False
            buf += chunk
            if len(buf) > _READ_BYTES and (cut := _cut_point(buf)):
                yield buf[:cut]
                buf = buf[cut:]
    if buf:
        yield buf


_SPACE = b" \t\r\n\x0b\x0c"


def _cut_point(buf: bytes) -> int:
    """The last index i with buf[i-1] == b"\\n" and buf[i-2], buf[i] not whitespace, or 0."""
    i = len(buf) - 1
    while True:
        i = buf.rfind(b"\n", 0, i)
        if i < 1 or i + 1 >= len(buf):
            return 0
        if buf[i + 1] not in _SPACE and buf[i - 1] not in _SPACE:
            return i + 1


def _decode(raw: bytes, errors: str) -> tuple[str, int]:
    """(text, number of invalid bytes). Invalid bytes become U+FFFD (also when errors="skip":
    such files were skipped before reading, so this only counts)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    parts, bad, pos = [], 0, 0
    while pos < len(raw):
        try:
            parts.append(raw[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            parts.append(raw[pos:pos + e.start].decode("utf-8"))
            bad += e.end - e.start
            parts.append("\ufffd")
            pos += e.end
    return "".join(parts), bad


def _looks_binary(head: bytes) -> bool:
    """NUL bytes, or more than 10% control characters other than whitespace/backspace/escape."""
    if b"\x00" in head:
        return True
    allowed = {8, 9, 10, 11, 12, 13, 27}
    control = sum(1 for b in head if b < 32 and b not in allowed)
    return control > 0.1 * len(head)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _split_glob(path: Path) -> tuple[Path, str]:
    """("/a/b", "c*/**/*.txt") for "/a/b/c*/**/*.txt": the longest prefix without wildcards."""
    parts = path.parts
    i = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
    root = Path(*parts[:i]) if i else Path(".")
    return root, str(Path(*parts[i:]))


# ------------------------------------------------------------------------------------- writing


def _write_tokens(corpus: _Corpus, tok: Tokenizer, eos: int | None, dtype, out: Path, split: bool) -> int:
    """Encode every piece (in batches) and append the ids to `out`; returns the token count."""
    total = 0
    batch: list[tuple[Path, bool, str]] = []
    size = 0
    with open(out, "wb") as f:

        def flush() -> None:
            nonlocal total, size
            encodings = tok.backend.encode_batch([text for _, _, text in batch], add_special_tokens=False)
            for (file, ends_doc, _), enc in zip(batch, encodings):
                ids = enc.ids + ([eos] if ends_doc and eos is not None else [])
                np.asarray(ids, dtype=dtype).tofile(f)
                corpus.reports[file].tokens += len(ids)
                total += len(ids)
            batch.clear()
            size = 0

        for piece in corpus.pieces(split=split):
            batch.append(piece)
            size += len(piece[2])
            if size >= _BATCH_CHARS:
                flush()
        if batch:
            flush()
        f.flush()
        os.fsync(f.fileno())
    return total


def _check_size(total: int, val_fraction: float, block_size: int | None, reports: dict[Path, SourceReport]) -> None:
    if total == 0:
        skipped = [r for r in reports.values() if r.status != "ok"]
        why = "; ".join(w for r in skipped[:5] for w in r.warnings()) or "the files hold no text"
        raise DataError(f"The corpus is empty: no tokens came from {len(reports)} file(s) ({why}).")
    if block_size is None:
        return
    n_train = int(total * (1 - val_fraction))
    n_val = total - n_train
    if n_train <= block_size or (val_fraction > 0 and n_val <= block_size):
        raise DataError(
            f"The corpus is too small for block_size={block_size}: it gives {n_train:,} training and "
            f"{n_val:,} validation tokens, and each needs more than {block_size}. Add text, use a "
            f"smaller block size, or change val_fraction (now {val_fraction})."
        )


def _split_tail(train: Path, val: Path, offset: int) -> None:
    """Move the bytes of `train` from `offset` on into `val` (copy the tail, then truncate)."""
    with open(train, "r+b") as src, open(val, "wb") as dst:
        src.seek(offset)
        shutil.copyfileobj(src, dst, 16 << 20)
        dst.flush()
        os.fsync(dst.fileno())
        src.truncate(offset)
        src.flush()
        os.fsync(src.fileno())


def _manifest(reports, tok, tok_source, char_level, dtype, n_train, n_val, val_fraction, text_field,
              encoding_errors, tok_sha, meta) -> dict[str, Any]:
    from muse import __version__

    rs = list(reports.values())
    warns = [w for r in rs for w in r.warnings()]
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "muse_version": __version__,
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "tokenizer": {
            "sha256": tok_sha,
            "source": tok_source,
            "char_level": char_level,
            "eos_token": tok.eos_tokens[0] if tok.eos_tokens else None,
        },
        "split": {
            "rule": "the last val_fraction of the token stream is validation",
            "val_fraction": val_fraction,
            "train_tokens": n_train,
            "val_tokens": n_val,
        },
        "totals": {
            "files": len(rs),
            "skipped_files": sum(r.status != "ok" for r in rs),
            "documents": sum(r.documents for r in rs),
            "bytes": sum(r.bytes for r in rs),
            "characters": sum(r.characters for r in rs),
            "tokens": n_train + n_val,
            "invalid_bytes": sum(r.invalid_bytes for r in rs),
            "malformed_lines": sum(r.malformed_lines for r in rs),
        },
        "options": {"text_field": text_field, "encoding_errors": encoding_errors},
        "sources": [
            {k: v for k, v in vars(r).items() if v is not None and not (k == "malformed_at" and not v)} for r in rs
        ],
        "warnings": warns,
        "meta": meta,
        "files": {"train": "train.bin", "val": "val.bin", "tokenizer": "tokenizer.json"},
    }


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


__all__ = [
    "DataError", "Manifest", "PreparedData", "SourceReport", "char_tokenizer", "load_prepared", "load_tokenizer",
    "prepare", "resolve_sources",
]
