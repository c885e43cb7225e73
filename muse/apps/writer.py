"""The writing partner: continue, rewrite, polish, expand, shorten, outline, titles, summarize, translate.

    >>> for chunk in stream_write(model, "rewrite", draft, tone="formal"):
    ...     print(chunk.text, end="")
    >>> write(model, "translate", "今天天气很好。", to="en")

How each action treats a long text (never cut silently):
- rewrite, polish, expand, shorten, translate work piece by piece: the text is split at sentence
  boundaries (`muse.text.pack_spans`) into pieces small enough that the instruction, the piece
  and its rewritten form fit the context window and `max_new_tokens`; the results are stitched
  back with the original whitespace (paragraph breaks) between them. A piece the model returns
  nothing for is kept as it was.
- outline and titles need the whole text at once: a text that does not fit is first condensed
  (its pieces summarised, then combined: `muse.apps.summarize.condense`).
- summarize is `muse.apps.summarize.summarize` (extract, rewrite, check; map-reduce when long).
- continue gives the model the end of the text, as much as fits its context, and streams what
  it writes next.

Prompts exist in English and Chinese; the input's language picks one (translate: the target's).
A translation into a language not written in CJK characters searches TRANSLATE_BEAMS beams, is
given Chinese amounts in digits (30万元 as 300,000元: `muse.text.arabic_amounts`), and has the
Chinese names it leaves written in pinyin (`muse.text.romanize`, among the repairs below).
expand and shorten name the length they want, per piece: at least twice its words (Chinese:
characters), at most SHORTEN_TO of them.
The model's output is cleaned of "Sure, here is…" preambles, wrapping quotes or code fences and
"I hope this helps" epilogues, while it streams (`muse.apps.cleaning.OutputCleaner`).

Checks: `stream_checked` / `checked_write` run the output's gates (`muse.apps.gates`: repetition,
leftover preambles, invented numbers and names, length targets, the shape of titles and outlines)
and retry with a repair note up to ATTEMPTS times; the CLI and the server save only an output that
passed (`CheckFailedError` otherwise).

Versions: `write_file` keeps every state of a file in the store's `versions` table (key = the
absolute path): the original before the first change, then each result; `history` lists them,
`restore` brings one back as a new version, so a restore can itself be undone.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from muse.apps import gates
from muse.apps.cleaning import OutputCleaner
from muse.apps.gates import Problem
from muse.apps.language import LanguageError, check_language, supports_chinese, writes_cjk
from muse.text import arabic_amounts, pack_spans
from muse.errors import MuseError
from muse.fileio import replacing
from muse.sampling import GenerationChunk, SamplingParams

PIECE_TOKENS = 1024   # largest piece a small model rewrites well in one go
WHOLE_TOKENS = 3072   # outline/titles: condense texts longer than this first
CONTEXT_TOKENS = 2048 # continue: how much of the end of the text the model sees
MARGIN = 8            # tokens of slack: a piece tokenizes slightly differently inside the prompt
SHORTEN_TO = 0.6      # shorten asks for at most this share of the length (its gate allows gates.SHORTEN_MAX)
# The writer's defaults (`default_params(model)` caps them to the model): greedy, a mild repetition
# penalty (small models loop), and max_new_tokens up to 512 but at most a quarter of the context,
# so a small-context model still has room for the text. The penalty also falls on the input's tokens,
# which a rewrite must copy, yet it measured better than none (qwen2.5-0.5b, writer_*_dev, 20 items; gates
# passed with / without: zh 60 / 55 %, en 80 / 70 %; translate_en_zh_dev chrF 27.6 / 25.6, numbers kept 80 / 100 %).
DEFAULT_PARAMS = SamplingParams(temperature=0.0, repetition_penalty=1.1, max_new_tokens=512)
# Translations into a language not written in CJK characters decode by beam search (`default_params`).
# qwen2.5-0.5b, translate_zh_en_dev (20 items), chrF greedy / 4 beams: 40.7 / 42.8 (raw prompting 39.5);
# into Chinese beams lost (translate_en_zh_dev: 27.5 / 23.2), so en→zh stays greedy. About 1.8× the time.
TRANSLATE_BEAMS = 4


@dataclass(frozen=True)
class Action:
    name: str
    kind: str           # "pieces" | "whole" | "summary" | "continue"
    en: str             # instruction; {tone} and {to} are filled in
    zh: str
    help: str
    ratio: float = 1.5  # expected output tokens per input token (sizes the pieces)
    tone: bool = False  # whether --tone applies
    label: bool = True  # the text follows a "Text:" / "原文:" line (else it follows the instruction directly)


ACTIONS: dict[str, Action] = {a.name: a for a in (
    Action("continue", "continue", "", "", "Continue the text from where it ends."),
    Action("rewrite", "pieces",
           "Rewrite the text below{tone}. Keep its meaning and facts. Reply with the rewritten text only.",
           "{tone}改写下面的文字，保留原意和事实，只输出改写后的文字。",
           "Rewrite the text, optionally in a tone (--tone formal).", tone=True),
    Action("polish", "pieces",
           "Proofread and polish the text below: fix spelling, grammar and punctuation and make it read "
           "smoothly, without changing its meaning. Reply with the corrected text only.",
           "校对并润色下面的文字：改正错别字、语法和标点，让它读起来更通顺，不改变原意。只输出修改后的文字。",
           "Fix spelling, grammar and punctuation; make it read smoothly.", ratio=1.3),
    # qwen2.5-0.5b gave most notes back unchanged (8 dev items per language, greedy) when asked to
    # "Expand the text below with more detail, keeping its meaning. Reply with the expanded text only."
    # after a "Text:" line: 6 of 8 en, 8 of 8 zh; with a word count and no label, 0 of 8 en, 2 of 8 zh
    # (without the label but without the count, or with the count after a label: 2–5 of 8 copied). On the
    # whole writer dev sets (50 items) shape ok went 80 → 88 % (zh) and 92 → 98 % (en), gates passed 70 → 72
    # and 78 → 76 %; an expansion that rewrites keeps fewer of the facts than a copy: 32 of 34 (zh), 33 of 38.
    # Capping its tokens at 4× the text's cut some loops (gates +1 item a language) but ends mid-sentence.
    # Tried and dropped: naming the piece's facts before the instruction ("Keep these as written: 12 May,
    # Elm Park, …"). English dev (8 items, checked_write): gates passed 2 → 4, facts kept 33 → 35 of 38;
    # Chinese dev no better (3 → 3 and 2 of 8 with two wordings); English test: facts 17 → 13 of 19.
    Action("expand", "pieces",
           "Expand the following text{tone} to at least {n} words, adding more detail:",
           "把下面的文字{tone}扩写成至少{n}字，补充更多细节：",
           "Add detail and explanation.", ratio=2.5, tone=True, label=False),
    # As expand's: under a "原文:" line qwen2.5-0.5b's first Chinese shortening was a headline (3–8 % of the
    # text, 9 of 28 facts kept on 8 dev items) and its retries copied the text; with a length and the text
    # right after the instruction: 22 of 28 kept, 3 of 8 passed the gates (was 0). English: 21 vs 20 kept.
    # With retries (checked_write, the same 8 items a language): facts kept 26 and 24 of 28 either way, gates
    # passed 2 → 3 (zh) and 4 → 5 (en), 22 → 18 attempts (zh).
    Action("shorten", "pieces",
           "Shorten the following text to at most {most} words, keeping only its key points:",
           "把下面的文字缩写到{most}字以内，只保留要点：",
           "Make the text shorter, keeping the key points.", ratio=1.0, label=False),
    # Naming the facts to keep in the shorten and outline instructions ("…and every name, number, date and
    # amount", "保留其中的名称、数字、日期和金额") lost more of them on writer_zh_dev (50 items, qwen2.5-0.5b):
    # must_keep kept, outline 15 → 12 of 25, shorten 26 → 25 of 28. The short instructions stay.
    Action("outline", "whole",
           "Write an outline of the text below as a bulleted list of its main points.",
           "为下面的文字写一个提纲，用项目符号列出要点。",
           "A bulleted outline of the main points."),
    Action("titles", "whole",
           "Suggest five short titles for the text below, one per line.",
           "为下面的文字拟五个简短的标题，每行一个。",
           "Five title suggestions."),
    Action("summarize", "summary", "", "",
           "A summary of about --length words (English) or characters (Chinese)."),
    # Per direction: `en` serves every non-Chinese target (zh→en), `zh` the Chinese ones (en→zh). Measured
    # with qwen2.5-0.5b on translate_*_dev (bench/translate_prompts.py; chrF / numbers kept %): zh→en this
    # prompt 40.7 / 69, raw 39.5 / 56, a longer keep-the-numbers prompt 41.1 / 56 (so zh→en stays as it was);
    # en→zh: longer instructions lost to the raw prompt's few words (10 dev items, chrF per character / numbers
    # kept %: "Translate this into {to}:" 22.8 / 100, the keep-the-numbers prompt 20.0 / 83, raw 18.8 / 100;
    # earlier, 20 items: keep-the-numbers 23.2 / 85, 把下面的文字翻译成… 25.0 / 77). Naming currencies in an
    # en→zh prompt primed them (300,000 yuan → 300,000美元).
    Action("translate", "pieces",
           "Translate the text below into {to}. Reply with the translation only.",
           "Translate this into {to}:",
           "Translate into another language (--to zh, en, ja, fr, ...).", ratio=2.0),
)}
ALIASES = {"proofread": "polish", "summarise": "summarize", "translation": "translate"}

# tone → (English phrase, Chinese phrase)
TONES: dict[str, tuple[str, str]] = {
    "formal": ("formal", "正式"), "casual": ("casual", "轻松随意"), "concise": ("concise", "简洁"),
    "friendly": ("friendly", "友好亲切"), "professional": ("professional", "专业"), "academic": ("academic", "学术"),
    "persuasive": ("persuasive", "有说服力"), "simple": ("simple, plain", "通俗易懂"),
    "confident": ("confident", "自信"), "polite": ("polite", "礼貌"), "humorous": ("humorous", "幽默"),
    "enthusiastic": ("enthusiastic", "热情"),
}
# language code → (English name, Chinese name)
LANGUAGES: dict[str, tuple[str, str]] = {
    "zh": ("Simplified Chinese", "简体中文"), "zh-tw": ("Traditional Chinese", "繁体中文"),
    "en": ("English", "英文"), "ja": ("Japanese", "日文"), "ko": ("Korean", "韩文"), "fr": ("French", "法文"),
    "de": ("German", "德文"), "es": ("Spanish", "西班牙文"), "it": ("Italian", "意大利文"),
    "pt": ("Portuguese", "葡萄牙文"), "ru": ("Russian", "俄文"), "ar": ("Arabic", "阿拉伯文"),
    "nl": ("Dutch", "荷兰文"), "vi": ("Vietnamese", "越南文"), "th": ("Thai", "泰文"),
    "id": ("Indonesian", "印尼文"), "tr": ("Turkish", "土耳其文"), "pl": ("Polish", "波兰文"),
}
_CHINESE_TARGETS = ("zh", "zh-tw")


# -- options ----------------------------------------------------------------------------

def get_action(name: str) -> Action:
    """The action called `name` (or an alias such as "proofread"); ValueError listing them if unknown."""
    key = ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in ACTIONS:
        raise ValueError(f"unknown writing action {name!r}; choose one of {', '.join(ACTIONS)}")
    return ACTIONS[key]


def language_code(to: str) -> str:
    """A target language as its code: accepts codes (fr), English names (French) and Chinese names (法文)."""
    key = str(to).strip().lower().replace("_", "-")
    for code, (en, zh) in LANGUAGES.items():
        if key in (code, en.lower(), zh) or (key == "chinese" and code == "zh") or key in ("中文", "汉语") and code == "zh":
            return code
    raise ValueError(f"unknown target language {to!r}; use a code such as {', '.join(LANGUAGES)}")


def into_chinese(to: str | None) -> bool:
    """Whether a translation's target `to` is Chinese, so the work needs a model that writes it (an
    unknown target is False here: the writer refuses it with its own error)."""
    try:
        return bool(to) and language_code(to).startswith("zh")
    except ValueError:
        return False


@dataclass(frozen=True)
class _Options:
    tone: str | None = None   # a key of TONES
    to: str | None = None     # a key of LANGUAGES
    length: int | None = None
    note: str = ""            # a repair instruction added after a failed check (`stream_checked`)


def _check_options(act: Action, tone, to, length) -> _Options:
    """Options an action does not use are an error, not silently ignored."""
    if tone is not None:
        if not act.tone:
            raise ValueError(f"--tone applies to rewrite and expand, not to {act.name}")
        if str(tone).lower() not in TONES:
            raise ValueError(f"unknown tone {tone!r}; choose one of {', '.join(TONES)}")
        tone = str(tone).lower()
    if act.name == "translate":
        if not to:
            raise ValueError("translate needs a target language: to='zh' (CLI: --to zh)")
        to = language_code(to)
    elif to is not None:
        raise ValueError(f"--to applies only to translate, not to {act.name}")
    if length is not None:
        if act.name != "summarize":
            raise ValueError(f"--length applies only to summarize, not to {act.name}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a whole number ≥ 1 (words for English, characters for Chinese), "
                             f"got {length!r}")
    return _Options(tone, to, length)


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("the text is empty: give the text to work on as an argument, on stdin (-) or with -i FILE")
    return text


def _check_target(model, to: str) -> None:
    if to in _CHINESE_TARGETS and not supports_chinese(model):
        raise LanguageError(f"{model.name} is an English-only model and cannot write Chinese. Use the bilingual "
                            "model: `muse models install qwen2.5-0.5b`, then pass `--model qwen2.5-0.5b`.")


# -- prompts ------------------------------------------------------------------------------

def _lengths(text: str) -> dict[str, int]:
    """The lengths the expand (n: at least twice the text's) and shorten (most: at most SHORTEN_TO
    of it) instructions and their repair notes ask for, in words (Chinese: characters)."""
    size = gates.size(text)
    return dict(n=max(1, 2 * size), most=max(1, int(SHORTEN_TO * size)))


def instruction(act: Action, lang: str, opts: _Options, text: str = "") -> str:
    """The instruction for `act` in `lang` ("en" | "zh") on `text` (`_lengths`)."""
    lengths = _lengths(text)
    if lang == "zh":
        tone = f"用{TONES[opts.tone][1]}的语气" if opts.tone else ""
        return act.zh.format(tone=tone, to=LANGUAGES[opts.to][1] if opts.to else "", **lengths)
    tone = f" in a {TONES[opts.tone][0]} tone" if opts.tone else ""
    return act.en.format(tone=tone, to=LANGUAGES[opts.to][0] if opts.to else "", **lengths)


def messages(act: Action, lang: str, opts: _Options, text: str) -> list[dict]:
    label = ("原文" if lang == "zh" else "Text") + ":\n" if act.label else ""
    note = f" {opts.note}" if opts.note else ""
    return [{"role": "user", "content": f"{instruction(act, lang, opts, text)}{note}\n\n{label}{text}"}]


def _prompt_lang(act: Action, text_lang: str, opts: _Options) -> str:
    if act.name == "translate":
        return "zh" if opts.to in _CHINESE_TARGETS else "en"
    return text_lang


def default_params(model, action: str | None = None, to: str | None = None) -> SamplingParams:
    """The sampling `stream_write` uses without params: DEFAULT_PARAMS, max_new_tokens capped to the
    model, and for a translation into a language not written in CJK characters TRANSLATE_BEAMS beams."""
    p = DEFAULT_PARAMS.replace(max_new_tokens=min(DEFAULT_PARAMS.max_new_tokens, model.config.block_size // 4))
    try:
        beams = action is not None and get_action(action).name == "translate" and bool(to) \
            and not writes_cjk(language_code(to))
    except ValueError:  # an unknown action or language: stream_write says so
        beams = False
    return p.replace(num_beams=TRANSLATE_BEAMS) if beams else p


def _translation_params(params: SamplingParams) -> SamplingParams:
    """Beams do not sample: a temperature above 0 (given, or a retry's) turns them off."""
    from muse.generation import is_greedy

    return params.replace(num_beams=1) if params.num_beams > 1 and not is_greedy(params) else params


def _counter(model):
    tok = model.tokenizer
    return lambda s: len(tok.encode(s, add_special_tokens=False))


# -- the actions ----------------------------------------------------------------------------

def stream_write(model, action: str, text: str, *, tone: str | None = None, to: str | None = None,
                 length: int | None = None, params: SamplingParams | None = None,
                 note: str = "") -> Iterator[GenerationChunk]:
    """Stream the result of a writing `action` on `text` as `GenerationChunk`s (cleaned text deltas).

    tone: rewrite/expand only (see TONES); to: translate only (a code such as "zh", "en", "fr");
    length: summarize only (words for English, characters for Chinese). The last chunk's
    finish_reason is "length" if any piece stopped at max_new_tokens (raise it), else "stop".
    Bad options raise ValueError here, before anything is generated. `note` is added to the
    instruction (`stream_checked` uses it to ask for a repair). The output is not checked: see
    `stream_checked` / `checked_write`.
    """
    act = get_action(action)
    opts = dataclasses.replace(_check_options(act, tone, to, length), note=note)
    text = _check_text(text)
    text_lang = check_language(model, text)
    params = params or default_params(model, act.name, opts.to)
    if act.name == "translate":
        _check_target(model, opts.to)
        params = _translation_params(params)
        if text_lang == "zh" and not writes_cjk(opts.to):
            text = arabic_amounts(text)  # 30万元 → 300,000元: small models misread 万
    lang = _prompt_lang(act, text_lang, opts)
    if act.kind == "summary":
        return _stream_summary(model, text, opts, params)
    if act.kind == "continue":
        special = model.tokenizer.encode("", add_special_tokens=True)  # e.g. [BOS], or nothing
        keep = min(CONTEXT_TOKENS - len(special), _room(model, len(special), params))
        return _stream_continue(model, text, special, keep, params)
    if act.kind == "whole":
        budget = min(WHOLE_TOKENS, _room(model, _overhead(model, act, lang, opts) + MARGIN, params))
        return _stream_whole(model, act, lang, opts, text, budget, params)
    spans = _pieces(text, _piece_budget(model, act, lang, opts, params), _counter(model))
    return _stream_pieces(model, act, lang, opts, text, spans, params)


def write(model, action: str, text: str, **options) -> str:
    """The whole result of `stream_write` as one string (options: tone, to, length, params)."""
    return "".join(c.text for c in stream_write(model, action, text, **options))


def translate(model, text: str, to: str, params: SamplingParams | None = None) -> str:
    """`text` translated into the language `to` ("zh", "en", "ja", "fr", ... or its name)."""
    return write(model, "translate", text, to=to, params=params)


# -- checked output ----------------------------------------------------------------------------

ATTEMPTS = 3  # tries before an output that fails its checks is refused: as asked, then two repairs


@dataclass(frozen=True)
class Retry:
    """`stream_checked` is about to try again: attempt `attempt` (2, 3, …) after these problems."""
    attempt: int
    problems: list[Problem]


@dataclass(frozen=True)
class Checked:
    """What `stream_checked` settled on: the output (repaired where it could be, see
    `gates.repair`), its problems (empty: it passed), how many attempts it took, and the problems
    of the first attempt as generated (what an unchecked writer would have returned)."""
    output: str
    problems: list[Problem]
    attempts: int
    first_problems: list[Problem]
    last: GenerationChunk | None = None  # the last chunk of the output's generation (stats, finish_reason)

    @property
    def ok(self) -> bool:
        return not self.problems


class CheckFailedError(MuseError):
    """An output failed its checks (`muse.apps.gates`) on every attempt, so nothing was saved."""

    def __init__(self, checked: Checked, target: str | None = "the text", hint: str = ""):
        self.checked = checked
        tries = f"{checked.attempts} attempt{'s' if checked.attempts != 1 else ''}"
        what = (f"Not saved: {target} was not changed. The output failed its checks after {tries}" if target
                else f"The output failed its checks after {tries}")
        super().__init__(f"{what}: {gates.summary(checked.problems)}.{' ' + hint if hint else ''}")


def stream_checked(model, action: str, text: str, *, tone: str | None = None, to: str | None = None,
                   length: int | None = None, params: SamplingParams | None = None,
                   attempts: int = ATTEMPTS) -> Iterator["GenerationChunk | Retry | Checked"]:
    """`stream_write`, then the output's checks (`muse.apps.gates.check`), retried until it passes.

    Yields the first attempt's `GenerationChunk`s as they are generated (show them as a draft),
    then for each further attempt a `Retry` naming what was wrong; retries are not streamed. The
    last item is always a `Checked`: its `output` is what to show and save — only if `ok`.
    Attempt k > 1 samples at temperature 0.4·(k−1) (at least the one given) with seed + k − 1,
    and the instruction gets a repair note naming the problems ("do not add: $30,000", "at most
    40 words", "exactly five different titles"). Before checking, what needs no model is fixed
    (`gates.repair`: repeated lines kept once, leftover labels dropped, titles deduplicated);
    titles also pool the distinct titles of all attempts. Bad options raise here, as in
    `stream_write`, before anything is generated.
    """
    act = get_action(action)
    params = params or default_params(model, action, to)
    first = stream_write(model, action, text, tone=tone, to=to, length=length, params=params)
    lang = _prompt_lang(act, check_language(model, text), _check_options(act, tone, to, length))
    return _checked(model, act, text, dict(tone=tone, to=to, length=length), params, attempts, first, lang)


def checked_write(model, action: str, text: str, **options) -> Checked:
    """The `Checked` result of `stream_checked` (options: tone, to, length, params, attempts)."""
    for item in stream_checked(model, action, text, **options):
        pass
    return item


def _checked(model, act, text, options, params, attempts, first, lang) -> Iterator:
    problems, first_problems, pool, best = [], [], [], None
    to = options["to"] and language_code(options["to"])
    for k in range(1, max(1, attempts) + 1):
        if k == 1:
            chunks = first
        else:
            yield Retry(k, problems)
            retry = params.replace(temperature=max(params.temperature, 0.4 * (k - 1)), seed=(params.seed or 0) + k - 1)
            chunks = stream_write(model, act.name, text, params=retry, note=_repair_note(act, lang, text, problems),
                                  **options)
        parts, last = [], None
        for chunk in chunks:
            if k == 1:
                yield chunk
            parts.append(chunk.text)
            last = chunk
        raw = "".join(parts)
        if k == 1:
            first_problems = gates.check(act.name, text, raw, length=options["length"], to=to)
        output = gates.repair(act.name, text, raw, to=to)
        problems = gates.check(act.name, text, output, length=options["length"], to=to)
        if problems and act.name == "titles":
            pool += [t for t in gates.title_lines(output) if not gates.titles_shape(text, t, 1)]
            pooled = gates.repair("titles", text, "\n".join(pool))
            if not gates.check("titles", text, pooled):
                output, problems = pooled, []
        if best is None or _severity(problems) < _severity(best.problems):
            best = Checked(output, problems, k, first_problems, last)
        if not problems:
            break
    yield dataclasses.replace(best, attempts=k)


def _severity(problems: list[Problem]) -> tuple[int, int]:
    """How bad an attempt is, for keeping the best of several: the facts it lost or invented come
    before any other problem (qwen2.5-0.5b's Chinese shortenings were a headline that lost every
    number, or the text copied: the copy, too long but true to the facts, is the one to keep), each
    fact counted (an attempt that lost one date beats one that lost four numbers), then the problems."""
    return sum(len(p.items) or 1 for p in problems if p.gate in ("dropped", "invented")), len(problems)


_NOTES = {  # gate → (English, Chinese) repair instruction; {x} is filled in
    "repetition": ("Do not repeat any sentence.", "不要重复任何句子。"),
    "preamble": ("Start directly with the text itself: no introduction, label or comment.",
                 "直接输出正文，不要开场白、标签或说明。"),
    "commentary": ("Reply with the rewritten text only, not with remarks about it.", "只输出改写后的正文，不要评论或说明。"),
    "unchanged": ("Do not copy the text: write it anew as asked.", "不要照抄原文，请按要求重新写。"),
    "language": ("Write the whole translation in the language asked for.", "整篇译文都用要求的语言写。"),
    "invented": ("Use only the numbers, dates, amounts and names that are in the text; do not add {x}.",
                 "只使用原文中的数字、日期、金额和名称，不要添加{x}。"),
    "dropped": ("Keep every name, number, date and amount of the text, including {x}.",
                "保留原文中的所有名称、数字、日期和金额，包括{x}。"),
    "shorten": ("Use at most {x} words.", "不超过{x}个字。"),
    "shorten-more": ("Keep every key point and fact, in at least {x} words.", "保留所有要点和事实，至少写{x}个字。"),
    "expand": ("Write at least {x} words.", "至少写{x}个字。"),
    "titles": ("Reply with exactly five different short titles, one per line, and nothing else.",
               "只输出五个不同的简短标题，每行一个，不要其他内容。"),
    "outline": ("Reply only with a bulleted list: every line starts with \"- \".",
                "只输出项目列表，每行以“- ”开头。"),
}


def _repair_note(act: Action, lang: str, text: str, problems: list[Problem]) -> str:
    """One repair instruction per kind of problem, in the prompt's language; an invented or dropped
    problem's items (numbers, names) are named, all in that one instruction."""
    zh = lang == "zh"
    items: dict[str, list[str]] = {}  # key → what the instruction names
    for p in problems:
        key = p.gate
        if p.gate == "length":
            key = act.name if act.name in ("shorten", "expand") else None
            if key == "shorten" and p.message.startswith(gates.TOO_SHORT):
                key = "shorten-more"
        elif p.gate == "shape":
            key = act.name if act.name in ("titles", "outline") else None
        if key is None or key not in _NOTES:
            continue
        named = items.setdefault(key, [])
        if key in ("invented", "dropped"):
            named += p.items[:6]
        elif key == "shorten":
            named.append(str(_lengths(text)["most"]))
        elif key == "shorten-more":
            named.append(str(max(1, int(0.4 * gates.size(text)))))
        elif key == "expand":
            named.append(str(_lengths(text)["n"]))
    notes = [_NOTES[key][zh].format(x=("、" if zh else ", ").join(named)) for key, named in items.items()]
    return "".join(notes) if zh else " ".join(notes)


def new_text(action: str, text: str, output: str) -> str:
    """The document after an action: continue appends its output, every other action replaces the text."""
    return text + output if get_action(action).name == "continue" else output


def piece_spans(model, action: str, text: str, *, tone: str | None = None, to: str | None = None,
                params: SamplingParams | None = None) -> list[tuple[int, int]]:
    """The (start, end) character spans `stream_write` sends to the model one at a time; they
    cover the whole text. A single span for actions that see the text whole."""
    act = get_action(action)
    opts = _check_options(act, tone, to, None)
    text = _check_text(text)
    if act.kind != "pieces":
        return [(0, len(text))]
    lang = _prompt_lang(act, check_language(model, text), opts)
    return _pieces(text, _piece_budget(model, act, lang, opts, params or default_params(model)), _counter(model))


def _pieces(text: str, budget: int, count) -> list[tuple[int, int]]:
    """Sentence-aligned spans of at most `budget` tokens that never straddle a paragraph break, so
    the paragraphs of the result are those of the input. Together they cover every character."""
    spans = []
    for a, b in _paragraphs(text):
        spans.extend((a + x, a + y) for x, y in pack_spans(text[a:b], budget, count))
    return spans


def _paragraphs(text: str) -> list[tuple[int, int]]:
    """(start, end) of each paragraph with the blank lines after it; none is whitespace only."""
    spans, start = [], 0
    for m in re.finditer(r"\n[ \t]*\n\s*", text):
        if text[start:m.start()].strip():
            spans.append((start, m.end()))
            start = m.end()
    if start < len(text):
        if text[start:].strip() or not spans:
            spans.append((start, len(text)))
        else:
            spans[-1] = (spans[-1][0], len(text))
    return spans


def _overhead(model, act: Action, lang: str, opts: _Options) -> int:
    """Prompt tokens of the chat-wrapped instruction without the text."""
    return len(model.tokenizer.encode(model.chat_prompt(messages(act, lang, opts, "")), add_special_tokens=False))


def _room(model, used: int, params: SamplingParams) -> int:
    """Context tokens left for the text after `used` prompt tokens and max_new_tokens of output."""
    room = model.config.block_size - used - params.max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={params.max_new_tokens} leaves no room for the text in {model.name}'s "
                         f"{model.config.block_size}-token context; lower max_new_tokens (--max-tokens)")
    return room


def _piece_budget(model, act: Action, lang: str, opts: _Options, params: SamplingParams) -> int:
    """Tokens per piece: the instruction, the piece and max_new_tokens of output must fit the
    context, and the piece's rewritten form (≈ ratio × piece) must fit max_new_tokens."""
    room = _room(model, _overhead(model, act, lang, opts) + MARGIN, params)
    return max(1, min(PIECE_TOKENS, room, int(params.max_new_tokens / act.ratio)))


def _stream_pieces(model, act, lang, opts, text, spans, params) -> Iterator[GenerationChunk]:
    generated, cut = 0, False
    for i, (a, b) in enumerate(spans):
        piece = text[a:b]
        core = piece.strip()
        lead, trail = piece[:len(piece) - len(piece.lstrip())], piece[len(piece.rstrip()):]
        if lead:
            yield GenerationChunk(lead, None)
        wrote, last = False, GenerationChunk("", None)
        for chunk in _stream_cleaned(model, messages(act, lang, opts, core), params, core):
            wrote, last = wrote or bool(chunk.text.strip()), chunk
            if chunk.text:
                yield dataclasses.replace(chunk, finish_reason=None, generation_tokens=generated + chunk.generation_tokens)
        generated += last.generation_tokens
        cut = cut or last.finish_reason == "length"
        end = i == len(spans) - 1
        yield dataclasses.replace(last, text=("" if wrote else core) + trail, generation_tokens=generated,
                                  finish_reason=("length" if cut else "stop") if end else None)


def _stream_whole(model, act, lang, opts, text, budget, params) -> Iterator[GenerationChunk]:
    from muse.apps.summarize import condense

    body = condense(model, text.strip(), budget)  # a summary of the text if it is over budget
    yield from _stream_cleaned(model, messages(act, lang, opts, body), params, body)


def _stream_summary(model, text, opts, params) -> Iterator[GenerationChunk]:
    from muse.apps.summarize import summarize

    # The summary is checked and trimmed as a whole (see summarize.py), so it arrives in one chunk.
    yield GenerationChunk(summarize(model, text, opts.length, params), None, finish_reason="stop")


def _stream_continue(model, text, special, keep, params) -> Iterator[GenerationChunk]:
    """The model sees the last `keep` tokens of the text (after any BOS) and writes on."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    yield from model.stream(special + ids[-keep:], params)


def _stream_cleaned(model, msgs: list[dict], params, source: str) -> Iterator[GenerationChunk]:
    """One chat generation with its text cleaned as it streams; the last chunk flushes the cleaner."""
    cleaner = OutputCleaner(source)
    last = None
    for chunk in model.stream_chat(msgs, params):
        last = chunk
        if chunk.finish_reason is None:
            yield dataclasses.replace(chunk, text=cleaner.push(chunk.text))
        else:
            yield dataclasses.replace(chunk, text=cleaner.push(chunk.text) + cleaner.finish())
    if last is None:
        yield GenerationChunk(cleaner.finish(), None, finish_reason="stop")


# -- files and versions ---------------------------------------------------------------------

def read_text(path: "str | Path") -> str:
    """A UTF-8 text file's content exactly (line endings kept); MuseError saying what is wrong if not."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MuseError(f"No such file: {p}. Check the path, or pass the text itself as an argument.")
    if p.is_dir():
        raise MuseError(f"{p} is a directory; give a text file.")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise MuseError(f"Cannot read {p}: {e.strerror}.") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MuseError(f"{p} is not UTF-8 text (bad byte at offset {e.start}); convert it first, "
                        f"e.g. `iconv -f GBK -t UTF-8 {p.name} > {p.stem}.utf8{p.suffix}`.") from None


def version_key(path: "str | Path") -> str:
    """Versions of a file are kept under its absolute path."""
    return str(Path(path).expanduser().resolve())


def save_version(store, key: str, content: str, action: str) -> int:
    """Record `content` as the next version of `key`; returns its number (1, 2, 3, …)."""
    with store.transaction():
        row = store.one("SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM versions WHERE key = ?", (key,))
        store.execute("INSERT INTO versions (key, seq, content, action) VALUES (?, ?, ?, ?)",
                      (key, row["seq"], content, action))
    return row["seq"]


def history(store, key: str) -> list[dict]:
    """The versions of `key`, oldest first: seq, action, created_at (Unix seconds), size (characters),
    first_line."""
    rows = store.all("SELECT seq, action, created_at, content FROM versions WHERE key = ? ORDER BY seq", (key,))
    for r in rows:
        content = r.pop("content")
        r["size"] = len(content)
        r["first_line"] = next((line.strip() for line in content.splitlines() if line.strip()), "")
    return rows


def get_version(store, key: str, seq: int) -> str:
    """The content of version `seq` of `key`."""
    row = store.one("SELECT content FROM versions WHERE key = ? AND seq = ?", (key, seq))
    if row is None:
        known = [r["seq"] for r in store.all("SELECT seq FROM versions WHERE key = ? ORDER BY seq", (key,))]
        have = f"versions {known[0]}–{known[-1]} exist" if known else "no versions are kept for it"
        raise MuseError(f"There is no version {seq} of {key}: {have}. See `muse write history {key}`.")
    return row["content"]


def restore(store, key: str, seq: int) -> str:
    """Bring back version `seq` of `key` as the newest version ("restore SEQ") and return its content.
    For files use `restore_file`, which also writes it."""
    content = get_version(store, key, seq)
    save_version(store, key, content, f"restore {seq}")
    return content


class EmptyOutputError(MuseError):
    """The model returned nothing for a writing action, so nothing was changed or saved."""


def result_text(action: str, text: str, output: str, target: str = "the text") -> str:
    """The document after `action` turned `text` into `output` (see `new_text`). An output that is
    empty or only white space is refused (EmptyOutputError naming `target`): it would replace the
    text with nothing, or record a "continue" that changed nothing."""
    if not output.strip():
        raise EmptyOutputError(f"The model returned nothing, so {target} was not changed. Try again, "
                               "e.g. with another seed or temperature.")
    return new_text(action, text, output)


def keep_version(store, key: str, text: str) -> None:
    """Save `text` as the next version of `key` unless it is the latest version already: "original"
    when `key` has none yet, "edited" when it was changed since (outside Muse)."""
    versions = history(store, key)
    if not versions or get_version(store, key, versions[-1]["seq"]) != text:
        save_version(store, key, text, "original" if not versions else "edited")


def save_result(store, key: str, action: str, text: str, output: str, name: str | None = None) -> tuple[int, str]:
    """Save what `action` made of `text` (the model's `output`) as the next version of `key`, with
    `text` kept before it (`keep_version`). Returns (the new version's number, the new text).

    An empty output is refused with EmptyOutputError (naming `name`, default `key`); only `text`
    is kept then. For files use `write_file`, which also writes the file.
    """
    keep_version(store, key, text)
    new = result_text(action, text, output, name or key)
    return save_version(store, key, new, action), new


def version_diff(store, key: str, seq: int) -> dict:
    """What changed from version seq - 1 of `key` to version `seq` (from nothing for the first):
    {"previous": its number or None, "ops", "unified"} (see `muse.apps.diff.word_diff`)."""
    from muse.apps.diff import word_diff

    new = get_version(store, key, seq)
    previous = seq - 1 if seq > 1 else None
    old = get_version(store, key, previous) if previous else ""
    return {"previous": previous, **word_diff(old, new)}


def restore_file(store, path: "str | Path", seq: int) -> int:
    """Write version `seq` back to the file (atomically), itself saved as a new version; returns that
    version's number, so the restore can be undone like any change."""
    return write_file(store, path, get_version(store, version_key(path), seq), f"restore {seq}")


def write_file(store, path: "str | Path", content: str, action: str) -> int:
    """Replace the file's content, keeping what it held before as a version.

    The file's current content is saved first if the store does not have it yet (as "original"
    before the first change, "edited" when changed outside Muse since); `content` is recorded as the
    new version, whose number is returned. File and versions change together: the new text goes to a
    temporary file, the versions are committed, and only then is the file renamed into place, so a
    full disk on either side leaves both as they were (a failed rename removes the new rows again).
    """
    p = Path(path).expanduser()
    key = version_key(p)
    try:
        current = read_text(p) if p.exists() else None
    except MuseError as e:
        raise MuseError(f"Refusing to replace {p}: its content cannot be kept as a version ({e}). "
                        "Write the result to another file.") from None
    if not p.parent.is_dir():
        raise MuseError(f"Cannot write {p}: the folder {p.parent} does not exist.")
    recorded = None  # the first version this call committed
    try:
        with replacing(p, content.encode("utf-8")):
            with store.transaction():
                latest = store.one("SELECT content FROM versions WHERE key = ? ORDER BY seq DESC LIMIT 1", (key,))
                first = None
                if current is not None and (latest is None or latest["content"] != current):
                    first = save_version(store, key, current, "original" if latest is None else "edited")
                seq = save_version(store, key, content, action)
            recorded = first or seq
    except BaseException:
        if recorded is not None:  # committed, but the file could not be replaced
            store.execute("DELETE FROM versions WHERE key = ? AND seq >= ?", (key, recorded))
        raise
    return seq
