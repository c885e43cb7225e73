"""The summarizer: sentence ranking, extraction, the checks on the model's rewrite, map-reduce, lengths."""

from __future__ import annotations

import numpy as np
import pytest

import muse
from muse.api import Model
from muse.apps import summarize as S
from muse.apps.summarize import default_length, extract, measure, summarize, summarize_raw, terms, trim
from muse.apps.language import LanguageError
from muse.text import sentences
from tests.helpers import RecordingLM

ARTICLE = (
    "The city council voted on Tuesday to build a new public library in the north district. "
    "The library will cost 12 million dollars and is expected to open in 2027. "
    "Supporters said the north district has no library within five kilometres. "
    "Critics worried that the running costs of the library would raise property taxes. "
    "The mayor said the money for the library comes from a state grant, so no new taxes are needed. "
    "Construction of the library will begin in January."
)
ZH_ARTICLE = (
    "市政府昨天宣布，今年将在城区新建和改造公园绿地三十处，总面积约一百二十公顷。"
    "新建的公园主要分布在人口密集的老城区和东部新区。"
    "滨河公园将沿江建设一条长约八公里的健身步道，并配套建设儿童游乐区。"
    "项目总投资约九亿元，资金主要来自市级财政和专项债券。"
    "市民对新建公园普遍表示欢迎，希望公园早日建成。"
)


@pytest.fixture(scope="module")
def tok(default_gguf):
    import gguf

    from muse.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf.GGUFReader(str(default_gguf)))


def scripted(tok, reply: str, block_size: int = 2048) -> Model:
    ids = tok.encode(reply, add_special_tokens=False) + [min(tok.eos_ids)]
    return Model(RecordingLM(ids, tok.vocab_size, block_size=block_size), tok, {"name": "scripted"})


# -- lengths -------------------------------------------------------------------------------

def test_measure_counts_words_or_characters():
    assert measure("The cat  sat.\nOn the mat.") == 6
    assert measure("今天 天气很好。") == 7
    assert default_length("word " * 400) == 100
    assert default_length("word " * 20) == 15 and default_length("字" * 2000) == 300


def test_trim_cuts_at_sentence_boundaries():
    text = "One two three. Four five six seven. Eight."
    assert trim(text, 7) == "One two three. Four five six seven."
    assert trim(text, 6) == "One two three."
    assert trim(text, 2) == "One two…"  # only an over-long first sentence is cut inside
    assert trim("第一句话。第二句话很长很长。", 9) == "第一句话。"
    assert measure(trim("第一句话很长很长很长。", 5)) <= 5


# -- extraction ------------------------------------------------------------------------------

def test_terms_are_cjk_aware():
    assert terms("The libraries were opened", "en") == ["librari", "open"]
    zh = terms("新建公园", "zh")
    assert {"新建", "建公", "公园", "新", "园"} <= set(zh)


def test_textrank_matches_networkx_pagerank():
    nx = pytest.importorskip("networkx")  # installed with torch; its pure-Python PageRank needs no scipy
    from networkx.algorithms.link_analysis.pagerank_alg import _pagerank_python

    rng = np.random.default_rng(0)
    sim = rng.random((7, 7))
    sim = (sim + sim.T) / 2 * (rng.random((7, 7)) > 0.3)
    sim = np.maximum(sim, sim.T)
    sim[6, :] = sim[:, 6] = 0  # an isolated sentence (dangling node)
    graph = nx.Graph()
    graph.add_nodes_from(range(7))
    graph.add_weighted_edges_from((i, j, sim[i, j]) for i in range(7) for j in range(i + 1, 7) if sim[i, j] > 0)
    expected = _pagerank_python(graph, alpha=S.DAMPING, weight="weight", tol=1e-12, max_iter=1000)
    np.testing.assert_allclose(S._textrank(sim, iters=200), [expected[i] for i in range(7)], atol=1e-6)


def test_extract_picks_whole_sentences_in_order_within_the_length():
    out = extract(ARTICLE, 30)
    picked = sentences(out)
    source = sentences(ARTICLE)
    assert measure(out) <= 30 and len(picked) >= 2
    assert all(s in source for s in picked)
    assert [source.index(s) for s in picked] == sorted(source.index(s) for s in picked)
    assert picked[0] == source[0]  # the lead sentence of a news story is central and first


def test_extract_skips_greetings_and_duplicates():
    email = ("Subject: Office move\n\nHi everyone,\n\nWe move to the new office at 210 King Street on Friday. "
             "We move to the new office at 210 King Street on Friday. Please pack your desk into the labelled "
             "crates by Thursday evening.\n\nThanks,\nMartin")
    out = extract(email, 40)
    assert out == ("We move to the new office at 210 King Street on Friday. Please pack your desk into the "
                   "labelled crates by Thursday evening.")


@pytest.mark.parametrize("letter, lang, facts", [
    ("您好！感谢您预订海景民宿，期待与您见面。7月12日民宿门前道路翻修，车辆无法开到门口。请将车停在海滨路公共停车场，"
     "凭此邮件可免费停车。如有疑问，请拨打5550162联系我们。", "zh", ["道路翻修", "海滨路公共停车场"]),
    ("Thank you for your order of 12 March, we really appreciate your business. The oak table you ordered "
     "is delayed by two weeks because the supplier ran out of oak. We will deliver it on 2 April at no extra "
     "cost. If you have any questions, please call us on 555-0143.", "en", ["delayed by two weeks", "2 April"]),
])
def test_extract_passes_over_a_letters_formulas(letter, lang, facts):
    # The greeting and the "questions? call us" line sit where the position prior and their numbers rank
    # them high; without the formula weight the summary opens with "您好！感谢您…" / "Thank you for…".
    out = extract(letter, 50 if lang == "zh" else 30, lang)
    assert all(f in out for f in facts), out
    assert "感谢" not in out and "Thank you" not in out and "questions" not in out

def test_extract_chinese():
    out = extract(ZH_ARTICLE, 60, "zh")
    assert measure(out, "zh") <= 60 and out.startswith("市政府昨天宣布")
    assert all(s in ZH_ARTICLE for s in sentences(out))


# -- the model's rewrite and its checks --------------------------------------------------------

LEAD = "The city council voted on Tuesday to build a new public library in the north district."


@pytest.mark.parametrize("short, ok", [
    ("The council voted to build a library in the north district.", True),
    (LEAD, False),                                                     # a copy: no shorter
    ("", False),
    ("The council voted to build 3 libraries.", False),                # a number the sentence lacks
    ("The council voted not to build a library.", False),              # meaning turned around
    ("Penguins swim in cold oceans near Antarctica.", False),          # made up
])
def test_a_rewritten_sentence_must_be_faithful(short, ok):
    assert S._faithful(short, LEAD, "en") is ok


def test_a_good_rewrite_replaces_its_sentence(tok):
    short = "The council voted to build a library in the north district."
    model = scripted(tok, short)
    out = summarize(model, ARTICLE, 30)
    assert out.startswith(short) and LEAD not in out and measure(out) <= 30
    rest = sentences(out)[1:]
    assert rest and all(s in sentences(ARTICLE) for s in rest)  # other sentences: not faithful, kept as they were
    prompts = [tok.decode(p) for p in model.model.prompts]
    assert len(prompts) > 1 and LEAD in prompts[0] and "at most 12 words" in prompts[0]


@pytest.mark.parametrize("reply", [
    ARTICLE,                                                          # copies the input
    "",                                                               # says nothing
    "Sure! Here you go: Penguins enjoy swimming in cold oceans near Antarctica every winter.",  # made up
    "The city council voted on Tuesday not to build a new library.",  # turns the meaning around
])
def test_bad_rewrites_leave_the_extractive_summary(tok, reply):
    model = scripted(tok, reply)
    assert summarize(model, ARTICLE, 30) == extract(ARTICLE, 30)
    assert model.model.prompts  # the model was asked


def test_long_input_is_summarized_piece_by_piece_then_combined(tok, monkeypatch):
    monkeypatch.setattr(S, "PIECE_TOKENS", 120)
    text = "\n\n".join(ARTICLE.replace("library", f"library number {i}") for i in range(4))
    model = scripted(tok, "The council will build a library.", block_size=512)
    out = summarize(model, text, 20)
    assert 0 < measure(out) <= 20
    prompts = [tok.decode(p) for p in model.model.prompts]
    assert all(len(p) < 512 for p in model.model.prompts)
    for i in range(4):  # every piece reached the model
        assert any(f"library number {i}" in p for p in prompts)


def test_short_text_is_returned_as_is(tok):
    model = scripted(tok, "unused")
    assert summarize(model, "  The bus is late.  ", 10) == "The bus is late."
    assert model.model.prompts == []


def test_summarize_raw_is_one_plain_prompt(tok):
    model = scripted(tok, "Here is a summary:\nA library will be built.")
    assert summarize_raw(model, ARTICLE, 20) == "A library will be built."
    assert len(model.model.prompts) == 1 and ARTICLE in tok.decode(model.model.prompts[0])


def test_the_whole_method_keeps_a_faithful_summary_trimmed_to_the_length(tok):
    reply = ("Here is a summary: The council will build a library in the north district for 12 million dollars. "
             "It opens in 2027. Building begins in January.")
    model = scripted(tok, reply)
    out = summarize(model, ARTICLE, 20, method="whole")
    assert out == "The council will build a library in the north district for 12 million dollars. It opens in 2027."
    assert len(model.model.prompts) == 1 and ARTICLE in tok.decode(model.model.prompts[0])


@pytest.mark.parametrize("reply", [
    "The council will build a library for 15 million dollars.",  # a number the text lacks
    "The library opens in 2027. The library opens in 2027.",     # a loop
    "Football fans cheered the striker's two goals at the stadium.",  # not about the text
])
def test_an_unfaithful_whole_summary_falls_back_to_the_sentence_method(tok, reply):
    out = summarize(scripted(tok, reply), ARTICLE, 30, method="whole")
    assert out == extract(ARTICLE, 30)  # the rewrites (the same bad reply) fail their checks too: extractive


def test_auto_runs_the_method_measured_for_the_family(tok, monkeypatch):
    model = scripted(tok, "The council will build a library in the north district.")
    assert S.default_method(model, "en") == S.FALLBACK_METHOD == "sentences"  # a family the table lacks
    monkeypatch.setattr(S, "family", lambda m: "qwen2.5")
    monkeypatch.setitem(S.DEFAULT_METHODS, ("qwen2.5", "en"), "whole")
    assert summarize(model, ARTICLE, 20) == summarize(model, ARTICLE, 20, method="whole")
    with pytest.raises(ValueError, match="method must be one of auto, sentences, whole"):
        summarize(model, ARTICLE, 20, method="best")


def test_bad_input(tok):
    model = scripted(tok, "x")
    with pytest.raises(ValueError, match="non-empty string"):
        summarize(model, "   ")
    with pytest.raises(ValueError, match="length must be a whole number"):
        summarize(model, ARTICLE, 0)
    with pytest.raises(LanguageError, match="qwen2.5-0.5b"):
        summarize(model, ZH_ARTICLE)


def test_writer_summarize_action_uses_the_summarizer(tok):
    from muse.apps.writer import write

    short = "The council voted to build a library in the north district."
    assert write(scripted(tok, short), "summarize", ARTICLE, length=30) == summarize(scripted(tok, short), ARTICLE, 30)


# -- real models ---------------------------------------------------------------------------

@pytest.mark.slow
def test_summarize_on_the_default_model(default_model):
    out = summarize(default_model, ARTICLE, 15)
    assert 0 < measure(out) <= 15 < measure(ARTICLE)


@pytest.mark.slow
def test_chinese_summary_on_the_bilingual_model(qwen):
    out = summarize(qwen, ZH_ARTICLE, 50)
    assert 0 < measure(out, "zh") <= 50 < measure(ZH_ARTICLE, "zh")
    assert S.language(out) == "zh"
