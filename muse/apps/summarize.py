"""Summaries that do more than asking a small model to "summarize".

A small model asked raw to summarize often repeats its input or drifts off it. `summarize()`
works in three steps:

1. **Rank**: score the sentences (TextRank over TF-IDF vectors, CJK-aware: Chinese is compared
   by character bigrams, English by stemmed words) with a prior for sentences near the start;
   headings, greetings and near-duplicates drop out.
2. **Rewrite**: the model rewrites each of the best sentences (about twice the target length of
   them) more concisely, one sentence at a time, which a small model does far more faithfully
   than summarising a whole text. A rewrite is kept only if it is shorter than its sentence,
   made of that sentence's own words, adds no number and no negation the sentence lacks; else
   the sentence stays as it was (empty answers and copies fall back the same way).
3. **Fill**: the (rewritten) sentences are taken best first while they fit the target length,
   and put back in their original order; the result is trimmed at sentence boundaries.

That is the "sentences" method. The "whole" method asks the model for the summary of the whole text
in one prompt, and keeps it only when it is faithful as a whole (no number the text lacks, its words
mostly the text's, no repeated sentence), trimmed at sentence boundaries to the length; otherwise it
falls back to "sentences". "auto" (the default) runs the one measured best on the dev sets for the
model family and language (`DEFAULT_METHODS`): a stronger model summarises better in its own words.

Without step 2 this is `extract()`, the extractive summary. A text too long for one pass is cut
into pieces (`muse.text.pack`); each piece is summarised and the joined piece summaries are
summarised again (map-reduce), so no part of the text is dropped unseen.

Lengths are words for English and characters for Chinese (`measure`). `summarize_raw()` is the
one-prompt baseline that `bench/summarize.py` compares against with ROUGE.

    >>> summarize(model, article, length=40)
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np

from muse.apps.language import check_language, family

from muse.text import HAN_RE, han_count, has_number, language, numbers, pack, sentences
from muse.apps.cleaning import clean_output
from muse.sampling import SamplingParams

PIECE_TOKENS = 1500      # map-reduce above this many tokens: a piece is summarised on its own
DAMPING = 0.85           # TextRank's PageRank damping factor
POSITION_WEIGHT = 0.4    # share of a sentence's score that comes from being near the start
REDUNDANT = 0.6          # skip a sentence this similar (cosine) to one already chosen
POOL = 2.0               # rewrite the best sentences up to this many times the target length
ASK = 0.75               # ask for a sentence this share of the original's length (shorter loses facts)
SHORTER = 0.9            # a rewritten sentence must be at most this share of the original's length
SUPPORTED = 0.6          # … and take at least this share of its terms from the original
NONZERO = 1e-9           # divides in place of a zero norm or row sum (a sentence with no terms, no neighbours)
# Sampling without params: greedy, with a mild repetition penalty (small models loop); each call
# sets max_new_tokens from the length it asks for.
DEFAULT_PARAMS = SamplingParams(temperature=0.0, repetition_penalty=1.1)

METHODS = ("auto", "sentences", "whole")
# (model family, language) → the method measured best on muse/eval/data/heldout/summarize_*_dev.jsonl
# (bench/summarize.py, ROUGE-L, 10 items); anything else runs FALLBACK_METHOD. qwen2.5 en: sentences 36.7 |
# raw 34.6 | extractive 33.4 | whole 31.2; zh: raw 36.3 | sentences 33.3 | extractive 32.4 | whole 31.5 (asking
# "whole" for 0.7 of the length: 27.2). Raw wins zh by writing 1.5× the length asked (7 of 10 over); trimmed
# to the length, the model's whole summary loses to its sentence rewrites, so no entry picks "whole" yet.
# Since a letter's formulas are no candidates (`_FORMULAIC`), zh dev, 20 items: sentences 38.1, extractive 35.0.
DEFAULT_METHODS: dict[tuple[str, str], str] = {}
FALLBACK_METHOD = "sentences"

PROMPTS = {  # rewrite one sentence concisely; {n}: ASK × its length
    "en": ("Shorten this sentence to at most {n} words. Keep the names, numbers and key facts. "
           "Write only the shortened sentence.\n\n{text}"),
    "zh": "把下面这句话缩短到{n}个字以内，保留人名、数字和关键事实，只输出缩短后的句子。\n\n{text}",
}
RAW_PROMPTS = {
    "en": "Summarize the following text in at most {n} words.\n\n{text}",
    "zh": "用不超过{n}个字总结下面的文字。\n\n{text}",
}
_EN_STOP = frozenset("""a an the and or but if then so of to in on at by for with from as is are was were be been being
it its this that these those there here i you he she we they me him her us them my your his our their what which who
whom whose when where why how all any both each few more most other some such no nor not only own same than too very
can will just should would could may might must do does did doing have has had having about above after again against
below between into through during before under over up down out off once also said says""".split())
_ZH_STOP = frozenset("的了是在和也就都而及与着或之于其这那个们我你他她它有为以被把让从到对")
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)*")
_NEGATION_RE = re.compile(r"\b(?:not|no|never|none|nor|nothing|without|against|cannot)\b|n't|[不没未无非别勿否]",
                          re.IGNORECASE)
# The formulas of letters and notices: greetings, thanks, apologies and "questions? call us" lines. They
# sit at the start and the end, where the position prior ranks them high and they fill a summary's
# leftover room; a summary never needs them (summarize_*_dev: 9 of 20 Chinese and 7 of 20 English texts have them).
_FORMULAIC = re.compile(
    r"^(?:hi|hello|dear|good (?:morning|afternoon)|thanks|thank you|many thanks|best regards|kind regards|"
    r"yours)\b|\b(?:i hope (?:you|your)|hope you are|thank you for (?:your|choosing|reading)|"
    r"thanks for (?:your|reading)|(?:if|should) you have any (?:questions|problems)|please (?:do not hesitate|feel free)|"
    r"(?:questions|queries) can be sent|we apologi[sz]e for (?:the|any) inconvenience|sorry for (?:the|any) "
    r"inconvenience|look(?:ing)? forward to)\b|"
    r"^(?:您好|你好|大家好|各位好)|感谢您|谢谢您|感谢大家|感谢您的|非常感谢|再次感谢|如有(?:任何)?(?:疑问|问题)|"
    r"请随时联系|敬请谅解|深表歉意|带来的不便|祝您|祝大家|此致|期待(?:您|与您)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?。！？…；;][\"'”’」』)）]*$")


# -- lengths ------------------------------------------------------------------------

def measure(text: str, lang: str | None = None) -> int:
    """Length as users count it: words for English, non-space characters for Chinese."""
    lang = lang or language(text)
    return len(re.sub(r"\s+", "", text)) if lang == "zh" else len(text.split())


def default_length(text: str, lang: str | None = None) -> int:
    """About a quarter of the input: 15–150 words, or 30–300 Chinese characters."""
    lang = lang or language(text)
    low, high = (30, 300) if lang == "zh" else (15, 150)
    return max(low, min(high, round(measure(text, lang) / 4)))


def trim(text: str, length: int, lang: str | None = None) -> str:
    """At most `length` words/characters, cut at sentence boundaries.

    Only when the first sentence alone is too long is it cut inside, ending with "…".
    """
    lang = lang or language(text)
    joiner = "" if lang == "zh" else " "
    kept: list[str] = []
    for s in sentences(text):
        if measure(joiner.join(kept + [s]), lang) > length:
            break
        kept.append(s)
    if kept:
        return joiner.join(kept)
    first = sentences(text)[0] if text.strip() else ""
    return _cut_inside(first, length, lang)


def _cut_inside(sentence: str, length: int, lang: str) -> str:
    if lang == "zh":
        chars = [c for c in sentence if not c.isspace()]
        return "".join(chars[:max(0, length - 1)]) + "…" if length > 0 else ""
    words = sentence.split()[:length]
    return " ".join(words).rstrip(",;:") + "…" if words else ""


# -- extraction -----------------------------------------------------------------------

@functools.cache
def _stemmer():
    from nltk.stem.porter import PorterStemmer  # installed with rouge-score

    return PorterStemmer()


def terms(sentence: str, lang: str) -> list[str]:
    """Content terms of a sentence: stemmed English words without stop words; for Chinese,
    character bigrams inside runs of Han characters plus single non-stop characters."""
    low = sentence.lower()
    out = [_stemmer().stem(w) for w in _WORD_RE.findall(low) if w not in _EN_STOP]
    if lang == "zh":
        for run in re.findall(f"(?:{HAN_RE.pattern})+", sentence):
            out.extend(c for c in run if c not in _ZH_STOP)
            out.extend(run[i:i + 2] for i in range(len(run) - 1))
    return out


def _tfidf(bags: list[list[str]]) -> np.ndarray:
    """(N, V) L2-normalised TF-IDF rows, one per bag of terms (sentences act as documents)."""
    vocab: dict[str, int] = {}
    for bag in bags:
        for t in bag:
            vocab.setdefault(t, len(vocab))
    x = np.zeros((len(bags), max(1, len(vocab))), dtype=np.float32)
    for i, bag in enumerate(bags):
        for t in bag:
            x[i, vocab[t]] += 1
    df = (x > 0).sum(0)
    x *= np.log((1 + len(bags)) / (1 + df)) + 1
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, NONZERO)


def _textrank(sim: np.ndarray, iters: int = 50) -> np.ndarray:
    """PageRank over the sentence-similarity graph (N, N) → (N,) centrality, summing to 1."""
    n = len(sim)
    w = sim.copy()
    np.fill_diagonal(w, 0)
    rows = w.sum(1, keepdims=True)
    w = np.where(rows > 0, w / np.maximum(rows, NONZERO), 1.0 / n)  # a sentence with no neighbours links to all
    p = np.full(n, 1.0 / n)
    for _ in range(iters):
        p = (1 - DAMPING) / n + DAMPING * (w.T @ p)
    return p


def rank(sents: list[str], lang: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N,), similarity (N, N)) for the sentences of one text.

    score = centrality (TextRank) mixed with a position prior 1/sqrt(1+i); short sentences
    (under 6 content words, or 10 Chinese characters: greetings, asides) are scaled down.
    """
    bags = [terms(s, lang) for s in sents]
    x = _tfidf(bags)
    sim = x @ x.T
    tr = _textrank(sim)
    position = 1 / np.sqrt(1 + np.arange(len(sents)))
    score = (1 - POSITION_WEIGHT) * tr / tr.max() + POSITION_WEIGHT * position
    fullness = np.array([min(1.0, han_count(s) / 10 if lang == "zh" else len(b) / 6) for s, b in zip(sents, bags)])
    return score * fullness, sim


def ranked(text: str, lang: str) -> tuple[list[str], list[int]]:
    """(the sentences of `text` on one line each, indices of the candidates best first).

    Lines that do not end like a sentence (headings, greetings, sign-offs: "Subject: …",
    "Hi all,", "Thanks, Anna") and a letter's formulas (`_FORMULAIC`: "Thank you for your order…",
    "如有疑问，请拨打…") are no candidates whenever the text has other sentences, nor is a sentence
    too similar to a better one.
    """
    sents = [_one_line(s) for s in sentences(text)]
    if not sents:
        return [], []
    scores, sim = rank(sents, lang)
    prose = [i for i, s in enumerate(sents) if _SENTENCE_END.search(s)]
    prose = [i for i in prose if not _FORMULAIC.search(sents[i])] or prose
    order: list[int] = []
    for i in sorted(prose or range(len(sents)), key=lambda i: -scores[i]):
        if all(sim[i, j] <= REDUNDANT for j in order):
            order.append(i)
    return sents, order


def fill(sents: list[str], order: list[int], length: int, lang: str) -> str:
    """Take sentences in `order` (best first) while they fit `length`; join them in text order."""
    joiner = "" if lang == "zh" else " "
    chosen: list[int] = []
    for i in order:
        if measure(joiner.join(sents[j] for j in sorted(chosen + [i])), lang) <= length:
            chosen.append(i)
    if not chosen:
        return _cut_inside(sents[order[0]], length, lang) if order else ""
    return joiner.join(sents[j] for j in sorted(chosen))


def extract(text: str, length: int | None = None, lang: str | None = None) -> str:
    """The extractive summary: the best-ranked sentences that fit `length`, in their original order."""
    lang = lang or language(text)
    sents, order = ranked(text, lang)
    return fill(sents, order, length or default_length(text, lang), lang)


def _one_line(sentence: str) -> str:
    """A sentence without its line breaks (a summary is one paragraph)."""
    return re.sub(r"\s*\n\s*", " ", sentence).strip()


# -- the model's part ------------------------------------------------------------------

def summarize(model, text: str, length: int | None = None, params: SamplingParams | None = None,
              method: str = "auto") -> str:
    """A summary of `text` of at most `length` words (English) or characters (Chinese).

    Default length: about a quarter of the input. `params` sets sampling (default: DEFAULT_PARAMS);
    max_new_tokens follows from the target length. `method`: see the module docstring.
    """
    text = _check_text(text)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    lang = check_language(model, text)
    length = _check_length(length) or default_length(text, lang)
    if measure(text, lang) <= length:
        return text.strip()  # already short enough: nothing to drop
    if method == "auto":
        method = default_method(model, lang)
    count = _counter(model)
    if count(text) > PIECE_TOKENS:
        return _map_reduce(model, text, length, lang, params, count, method)
    if method == "whole":
        return _whole(model, text, length, lang, params, count)
    return _summarize_piece(model, text, length, lang, params, count)


def default_method(model, lang: str) -> str:
    """The summary method measured best for `model`'s family in `lang` (DEFAULT_METHODS)."""
    return DEFAULT_METHODS.get((family(model), lang), FALLBACK_METHOD)


def _map_reduce(model, text, length, lang, params, count, method) -> str:
    pieces = pack(text, PIECE_TOKENS, count)
    total = measure(text, lang)
    joiner = "\n" if lang == "zh" else "\n\n"
    parts = []
    for piece in pieces:
        size = measure(piece, lang)
        share = max(length // 2, math.ceil(2 * length * size / total))
        parts.append(summarize(model, piece, min(share, max(1, size // 2)), params, method))
    return summarize(model, joiner.join(p for p in parts if p), length, params, method)


def _summarize_piece(model, text, length, lang, params, count) -> str:
    sents, order = ranked(text, lang)
    pool, size = [], 0
    for i in order:  # the best sentences, about POOL × length of them
        if pool and size + measure(sents[i], lang) > POOL * length:
            break
        pool.append(i)
        size += measure(sents[i], lang)
    short = list(sents)
    for i in pool:
        short[i] = _rewrite(model, sents[i], lang, params, count) or sents[i]
    return trim(fill(short, order, length, lang), length, lang)


def _whole(model, text, length, lang, params, count) -> str:
    """The model's summary of the whole text in one prompt, one paragraph trimmed to `length`; the
    sentence method's when that summary is not faithful to the text."""
    out = _one_line(_one_prompt(model, text, length, lang, params, count))
    if not _faithful_summary(out, text, lang):
        return _summarize_piece(model, text, length, lang, params, count)
    return trim(out, length, lang)


def _faithful_summary(summary: str, text: str, lang: str) -> bool:
    """Whether a whole-text summary can be trusted: not empty, no number (by value) the text lacks,
    no sentence said twice (a loop), and at least SUPPORTED of its terms from the text."""
    said = sentences(summary)
    if not said or len({s.strip() for s in said}) < len(said):
        return False
    known = numbers(text, generous=True)
    if any(not has_number(v, known) for v in numbers(summary)):
        return False
    words, source = terms(summary, lang), set(terms(text, lang))
    return bool(words) and sum(w in source for w in words) / len(words) >= SUPPORTED


def _rewrite(model, sentence: str, lang: str, params, count) -> str | None:
    """The model's shorter version of one sentence, or None when it is not a faithful one."""
    n = max(1, round(measure(sentence, lang) * ASK))
    prompt = model.chat_prompt([{"role": "user", "content": PROMPTS[lang].format(n=n, text=sentence)}])
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    want = min(int(count(sentence) * SHORTER) + 8, model.config.block_size - len(ids))
    if want < 1:
        return None
    out = _one_line(clean_output(model.generate(ids, _params(params, want)), sentence))
    return out if _faithful(out, sentence, lang) else None


def _faithful(short: str, sentence: str, lang: str) -> bool:
    """Whether `short` is a trustworthy shorter version of `sentence`: not empty, clearly shorter
    (a copy is no gain), made of the sentence's own words, and with no number or negation the
    sentence does not have (a small model sometimes turns "voted for" into "voted against")."""
    size = measure(short, lang)
    if size == 0 or size > SHORTER * measure(sentence, lang):
        return False
    if not set(_NUMBER_RE.findall(short)) <= set(_NUMBER_RE.findall(sentence)):
        return False
    if _NEGATION_RE.search(short) and not _NEGATION_RE.search(sentence):
        return False
    words, known = terms(short, lang), set(terms(sentence, lang))
    return bool(words) and sum(w in known for w in words) / len(words) >= SUPPORTED


def summarize_raw(model, text: str, length: int | None = None, params: SamplingParams | None = None) -> str:
    """The baseline: one plain prompt asking the model to summarize (cleaned of "Here is…")."""
    text = _check_text(text)
    lang = check_language(model, text)
    length = _check_length(length) or default_length(text, lang)
    return _one_prompt(model, text, length, lang, params, _counter(model))


def _one_prompt(model, text, length, lang, params, count) -> str:
    """The model's answer to the plain summarize prompt (RAW_PROMPTS), cleaned of "Here is…"; room for
    1.3 × the length asked, since small models overshoot it."""
    prompt = RAW_PROMPTS[lang].format(n=length, text=text)
    want = int(count(text) * length / max(1, measure(text, lang)) * 1.3) + 16
    return clean_output(model.chat([{"role": "user", "content": prompt}], _params(params, want)))


def condense(model, text: str, budget: int, params: SamplingParams | None = None) -> str:
    """`text` itself if it fits `budget` tokens, else a summary that does (for actions such as
    outline and titles that need the whole text at once)."""
    count = _counter(model)
    tokens = count(text)
    if tokens <= budget:
        return text
    lang = language(text)
    length = max(1, int(measure(text, lang) * budget / tokens * 0.8))
    return summarize(model, text, length, params)


# -- helpers --------------------------------------------------------------------------

def _params(params: SamplingParams | None, max_new_tokens: int) -> SamplingParams:
    base = params or DEFAULT_PARAMS
    return base.replace(max_new_tokens=max(1, max_new_tokens))


def _counter(model):
    tok = model.tokenizer
    return lambda s: len(tok.encode(s, add_special_tokens=False))


def _check_text(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text to summarize must be a non-empty string")
    return text


def _check_length(length) -> int | None:
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise ValueError(f"length must be a whole number of words (English) or characters (Chinese) ≥ 1, "
                         f"got {length!r}")
    return length
