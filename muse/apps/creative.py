"""Creative writing with form checks: poems (绝句, 律诗, haiku, free verse), stories, slogans, ad copy.

Small models cannot count characters or syllables, so a poem in a fixed form goes through three steps:
- guided decoding: Chinese lines are generated under a grammar constraint (lines of exactly N Chinese
  characters, each ending in its punctuation), so 五言 lines have five characters by construction; a
  haiku is written line by line, each line resampled until it scans;
- repair: titles, numbering, markdown and commentary are stripped, a one-line 绝句 is split at its
  punctuation, and a haiku whose words add up to 5-7-5 syllables is reflowed at word boundaries;
- check and retry: `check_form` lists what is still wrong, and another attempt (a new seed) follows,
  up to `attempts`; a text that never conforms is returned with ok=False and its problems.

>>> c = create(model, "poem", "春天", form="wujue")
>>> c.ok, c.text
(True, '春风吹柳绿，\\n细雨润花红。\\n...')
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field

from muse.apps.language import LanguageError, check_language, supports_chinese

from muse.text import HAN_RE
from muse.sampling import Constraint, SamplingParams

KINDS = ("poem", "story", "slogan", "product")


@dataclass(frozen=True)
class Form:
    """A poem form: how many lines, and how long each must be (in `unit`s)."""

    name: str
    title: str
    lines: tuple[int, ...] = ()  # required length of each line; () = free form
    unit: str = "characters"  # characters (Chinese) | syllables (English; a Chinese character is one)
    chinese: bool = False  # written in Chinese whatever the topic's language


FORMS = {
    "wujue": Form("wujue", "五言绝句", (5,) * 4, chinese=True),
    "qijue": Form("qijue", "七言绝句", (7,) * 4, chinese=True),
    "wulv": Form("wulv", "五言律诗", (5,) * 8, chinese=True),
    "qilv": Form("qilv", "七言律诗", (7,) * 8, chinese=True),
    "haiku": Form("haiku", "haiku", (5, 7, 5), unit="syllables"),
    "free": Form("free", "free verse"),
}
# Other names for each form: (the Chinese names error messages show, more accepted silently: traditional
# characters, pinyin with ü typed as u or ü).
_FORM_ALIASES = {
    "wujue": (("五言绝句", "五绝"), ("五言絕句", "五絕")),
    "qijue": (("七言绝句", "七绝"), ("七言絕句", "七絕")),
    "wulv": (("五言律诗", "五律"), ("五言律詩", "wulu", "wulü")),
    "qilv": (("七言律诗", "七律"), ("七言律詩", "qilu", "qilü")),
    "haiku": (("俳句",), ()),
    "free": (("自由诗",), ("自由詩", "free verse")),
}
FORM_NAMES = {name: name for name in FORMS} | {
    alias: name for name, (shown, more) in _FORM_ALIASES.items() for alias in shown + more}

# Tokens enough for each kind at the lengths the prompts ask for (a Chinese character is ~1 token).
DEFAULT_TOKENS = {"poem": 160, "story": 450, "slogan": 48, "product": 260}
PRESENCE_PENALTY = 1.0  # without it the small models repeat characters and whole lines (春雨绵绵绵)
TEMPERATURE = 0.8  # varied enough that a retry differs; greedy would write the same piece every time
TOP_P = 0.95  # but not from the long tail, where a small model drifts off the topic
SLOGAN_MAX = {"en": 15, "zh": 25}  # words / characters; longer is not a slogan


@dataclass
class Creation:
    """What `create` made: the text, its form, whether it conforms, what is wrong if not, attempts used."""

    text: str
    form: str | None
    ok: bool
    problems: list[str] = field(default_factory=list)
    tries: int = 1


# -- syllables --------------------------------------------------------------------

# Words the rules below get wrong that poems use often.
_SYLLABLE_EXCEPTIONS = {
    "people": 2, "poem": 2, "poems": 2, "poet": 2, "poets": 2, "poetry": 3, "quiet": 2, "quietly": 3,
    "diet": 2, "science": 2, "client": 2, "being": 2, "rhythm": 2, "rhythms": 2, "fire": 1, "fires": 1,
    "hour": 1, "hours": 1, "flour": 1, "our": 1, "prism": 2, "chasm": 2, "museum": 3, "cruel": 2,
    "fuel": 2, "duel": 2, "jewel": 2, "jewels": 2, "create": 2, "created": 3, "creation": 3, "every": 2,
    "everything": 3, "everyone": 3, "evening": 2, "different": 3, "heaven": 2, "heavens": 2, "forest": 2,
    "recipe": 3, "karate": 3, "sometimes": 2, "something": 2, "someone": 2, "somewhere": 2, "whereas": 2,
    "fireflies": 3, "firefly": 3, "lion": 2, "lions": 2, "naive": 2, "cafe": 2, "anemone": 4, "whisper": 2,
    "wednesday": 2, "business": 2, "chocolate": 2, "family": 3, "area": 3, "idea": 3, "ideas": 3,
    "going": 2, "doing": 2, "element": 3, "elements": 3, "lie": 1, "lies": 1, "die": 1, "dies": 1, "tie": 1, "pie": 1, "movie": 2,
}
_VOWELS = "aeiouy"
_SPLIT_PAIRS = re.compile(r"(?<![tscgx])i[aou]|(?<![g])ua|eo(?!us)|iu")  # two vowels heard as two syllables
_SILENT_E_SUFFIX = re.compile(r"[^aeiouy]e(ly|ment|ful|fully|less|lessly|ness)$")  # lone-ly, move-ment, care-ful


def _word_syllables(word: str) -> int:
    """Syllables in one English word: vowel groups with the common corrections (silent e, -ed, -es,
    -le, vowel pairs that split like li-on and ra-di-o), plus a list of frequent exceptions."""
    # café → cafe: accents do not change the count
    w = unicodedata.normalize("NFKD", word.lower()).encode("ascii", "ignore").decode().strip("'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.replace("'", "")
    if not w:
        return 0
    if w in _SYLLABLE_EXCEPTIONS:
        return _SYLLABLE_EXCEPTIONS[w]
    if w.endswith("s") and w[:-1] in _SYLLABLE_EXCEPTIONS:
        return _SYLLABLE_EXCEPTIONS[w[:-1]]
    w = w.replace("qu", "q")  # the u of qu is a consonant
    n = len(re.findall(r"[aeiouy]+", w))
    n += len(_SPLIT_PAIRS.findall(w.replace("llio", "llo").replace("nio", "no")))  # mil-lion, on-ion
    if w.endswith("e") and len(w) > 2 and w[-2] not in _VOWELS and not _consonant_le(w):
        n -= 1  # silent e: make, stone (but ta-ble)
    elif w.endswith("ed") and len(w) > 3 and w[-3] not in _VOWELS + "td":
        n -= 1  # jumped, rained (but want-ed)
    elif w.endswith("es") and len(w) > 3 and w[-3] not in _VOWELS + "sxzcg" and not w.endswith(("ches", "shes")) \
            and not _consonant_le(w[:-1]):
        n -= 1  # makes, leaves (but fa-ces, hor-ses, ta-bles)
    elif (m := _SILENT_E_SUFFIX.search(w)) and not _consonant_le(w[:m.start(1)]):
        n -= 1  # lone-ly, move-ment
    if re.search(r"[aeiouy]ing$", w) and not w.endswith("uing"):
        n += 1  # be-ing, fly-ing (vowel group + ing reads as two)
    if re.search(r"[aeiouy][^aeiouy]*ea$", w):
        n += 1  # ar-e-a, Ko-re-a (but sea, tea)
    return max(n, 1)


def _consonant_le(w: str) -> bool:
    return w.endswith("le") and len(w) > 2 and w[-3] not in _VOWELS


_WORD_RE = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿ]+(?:'[A-Za-zÀ-ÖØ-öø-ÿ]+)*|\d+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_DIGITS = {"0": 2, "1": 1, "2": 1, "3": 1, "4": 1, "5": 1, "6": 1, "7": 2, "8": 1, "9": 1}


def syllables(text: str) -> int:
    """Syllables in `text`: English words by `_word_syllables`, one per Chinese character, digits
    as spoken one by one."""
    total = 0
    for w in _WORD_RE.findall(text):
        if w.isdigit():
            total += sum(_DIGITS[d] for d in w)
        elif HAN_RE.match(w):
            total += 1
        else:
            total += _word_syllables(w)
    return total


# -- checking ---------------------------------------------------------------------

# Punctuation that ends a line of Chinese verse (full- and half-width), and what never counts as a character.
_VERSE_BREAK = re.compile(r"[，。！？；、,.!?;：:]+")
_NOT_COUNTED = re.compile(r"[\s\W_]+")


def get_form(form: str | None) -> Form:
    """The form named `form`: its ASCII name (any case) or one of its Chinese names (`FORM_NAMES`)."""
    if form is None:
        return FORMS["free"]
    name = form.strip()
    name = FORM_NAMES.get(name) or FORM_NAMES.get(name.lower(), name.lower())
    if name not in FORMS:
        accepted = ", ".join(f"{n} ({', '.join(_FORM_ALIASES[n][0])})" for n in FORMS)
        raise ValueError(f"form must be one of {accepted}; got {form!r}")
    return FORMS[name]


def _verses(text: str) -> list[str]:
    """Chinese verse lines: non-blank lines, each split again at punctuation (couplets on one line)."""
    out = []
    for line in text.splitlines():
        out.extend(v.strip() for v in _VERSE_BREAK.split(line) if _NOT_COUNTED.sub("", v))
    return out


def check_form(text: str, form: str | None) -> list[str]:
    """What keeps `text` from being a poem in `form`; an empty list means it conforms.

    Chinese forms count Chinese characters per line, punctuation and spaces not counted; a line may
    hold a couplet ("白日依山尽，黄河入海流。") since lines also split at punctuation. A haiku counts
    syllables per non-blank line. Blank lines are ignored; a title line counts as a line (repair
    strips titles).
    """
    f = get_form(form)
    if not text.strip():
        return ["the poem is empty"]
    if not f.lines:
        return []
    if f.chinese:
        lines, unit, measure = _verses(text), "characters", _han_only
    else:
        lines, unit, measure = [ln.strip() for ln in text.splitlines() if ln.strip()], "syllables", syllables
    problems = []
    if len(lines) != len(f.lines):
        problems.append(f"{len(lines)} lines; a {f.title} has {len(f.lines)}")
    for i, (line, want) in enumerate(zip(lines, f.lines), 1):
        have = measure(line)
        if have is None:
            problems.append(f"line {i} '{line}' has characters that are not Chinese")
        elif have != want:
            problems.append(f"line {i} '{line}' has {have} {unit}; it needs {want}")
    return problems


def _han_only(verse: str) -> int | None:
    """Chinese characters in a verse; None when it holds anything else (letters, digits)."""
    rest = _NOT_COUNTED.sub("", HAN_RE.sub("", verse))
    return None if rest else len(HAN_RE.findall(verse))


# -- repair -----------------------------------------------------------------------

_FENCE = re.compile(r"^\s*```.*$", re.M)
_MARKUP = re.compile(r"\*\*|__|^#+\s*|^>\s*", re.M)
_NUMBERING = re.compile(r"^\s*(?:\d+[.)、:：]|[（(]\d+[)）]|[一二三四五六七八]、|[-*•]\s)\s*")
_TITLE = re.compile(r"^\s*(?:《[^》]*》|[“\"「『]?(?:title|标题|题目|诗名)\s*[:：].*)\s*$", re.I)
_PREAMBLE = re.compile(r"[:：]\s*$")  # "Here is a haiku about rain:" / "以下是一首诗："
_QUOTES = "\"'“”‘’「」『』"


def clean(text: str) -> list[str]:
    """Lines of `text` without markdown, numbering, titles, quotes or a leading "Here is...:" line."""
    text = _MARKUP.sub("", _FENCE.sub("", text))
    lines = [_NUMBERING.sub("", ln).strip().strip(_QUOTES).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not _TITLE.match(ln)]
    while lines and _PREAMBLE.search(lines[0]):
        lines.pop(0)
    return lines


def repair(text: str, form: str | None) -> str:
    """The poem inside a model's reply, laid out for `form`.

    Strips what is not the poem (see `clean`); for a Chinese form picks the first run of verses of the
    right length (a one-line 绝句 splits at its punctuation; an unpunctuated line of 10 or 20 characters
    splits every 5) and puts one verse per line; for a haiku picks three 5-7-5 lines, or reflows 1-4
    consecutive lines whose words add up to 17 syllables. Text it cannot fix comes back cleaned.
    """
    f = get_form(form)
    lines = clean(text)
    if f.chinese:
        return _repair_chinese(lines, f) or "\n".join(lines)
    if f.name == "haiku":
        return _repair_haiku(lines, f.lines) or "\n".join(lines)
    return "\n".join(lines)


def _repair_chinese(lines: list[str], f: Form) -> str | None:
    n, count = f.lines[0], len(f.lines)
    pieces: list[tuple[str, str]] = []  # (verse, its punctuation)
    for line in lines:
        parts = re.split(f"({_VERSE_BREAK.pattern})", line)
        for verse, punct in zip(parts[0::2], parts[1::2] + [""]):
            verse = _NOT_COUNTED.sub("", verse)
            k = _han_only(verse) if verse else None
            if k and k > n and k % n == 0 and len(parts) == 1:
                pieces.extend((verse[i:i + n], "") for i in range(0, k, n))  # unpunctuated run of verses
            elif verse:
                pieces.append((verse, punct[:1]))
    for start in range(len(pieces) - count + 1):
        window = pieces[start:start + count]
        if all(_han_only(v) == n for v, _ in window):
            ends = [p if p in "，。！？；" and p else ("，" if i % 2 == 0 else "。") for i, (_, p) in enumerate(window)]
            return "\n".join(v + e for (v, _), e in zip(window, ends))
    return None


def _repair_haiku(lines: list[str], target: tuple[int, ...]) -> str | None:
    counts = [syllables(ln) for ln in lines]
    for i in range(len(lines) - 2):
        if tuple(counts[i:i + 3]) == target:
            return "\n".join(lines[i:i + 3])
    for width in (1, 2, 3, 4):
        for i in range(len(lines) - width + 1):
            if sum(counts[i:i + width]) == sum(target):
                flowed = _reflow(" ".join(lines[i:i + width]).split(), target)
                if flowed:
                    return flowed
    return None


def _reflow(words: list[str], target: tuple[int, ...]) -> str | None:
    """Break `words` into lines of exactly `target` syllables at word boundaries, if possible."""
    out, line, have, goals = [], [], 0, list(target)
    for w in words:
        line.append(w)
        have += syllables(w)
        if have == goals[0]:
            out.append(" ".join(line))
            line, have = [], 0
            goals.pop(0)
            if not goals:
                break
        elif have > goals[0]:
            return None
    return "\n".join(out) if not goals and len(out) == len(target) else None


def _check_prose(kind: str, text: str, lang: str, finish: str | None, max_tokens: int) -> list[str]:
    problems = []
    if not text.strip():
        problems.append("the model wrote nothing")
    if finish == "length" and kind != "slogan":
        problems.append(f"the text was cut off at {max_tokens} tokens; allow more with max_new_tokens")
    if kind == "slogan" and text.strip():  # the first line of the reply, quotes stripped
        size = len(text.split()) if lang == "en" else len(HAN_RE.findall(text))
        if size > SLOGAN_MAX[lang]:
            unit = "words" if lang == "en" else "characters"
            problems.append(f"{size} {unit} is long for a slogan (at most {SLOGAN_MAX[lang]})")
    return problems


# -- prompts ----------------------------------------------------------------------

_POEM_EN = {
    "haiku": "Write a haiku about {topic}: three lines of 5, 7 and 5 syllables. Reply with the haiku only, "
             "no title.",
    "free": "Write a short poem (8 to 12 lines) about {topic}. Reply with the poem only, no title.",
}
_POEM_ZH = {
    "haiku": "以「{topic}」为题，写一首汉俳：三句，分别为五个字、七个字、五个字。只写诗句，不要标题和解释。",
    "free": "以「{topic}」为题，写一首八到十二行的现代诗。只写诗，不要标题和解释。",
}
_CHINESE_FORM = "以「{topic}」为题，写一首{title}：共{count}句，每句{n}个字。只写诗句，不要标题和解释。"
_PROSE = {
    ("story", "en"): "Write a short story (about 250 words) about {topic}, with a beginning, a turn and an ending.",
    ("story", "zh"): "写一个关于「{topic}」的短篇故事，约三百字，要有开头、转折和结尾。",
    ("slogan", "en"): "Write one catchy slogan for {topic}, at most 10 words. Reply with the slogan only.",
    ("slogan", "zh"): "为「{topic}」写一句朗朗上口的宣传口号，不超过十五个字。只输出口号。",
    ("product", "en"): "Write persuasive ad copy (about 100 words) for this product: {topic}\n"
                       "Say what makes it useful and end with a call to action. Reply with the ad copy only.",
    ("product", "zh"): "为下面的产品写一段约一百五十字的广告文案，突出卖点，结尾号召购买。只输出文案。\n产品：{topic}",
}


def instruction(kind: str, form: Form, topic: str, lang: str) -> str:
    """The request the model gets, in the language the piece is written in."""
    if kind != "poem":
        return _PROSE[(kind, lang)].format(topic=topic)
    if form.chinese:
        return _CHINESE_FORM.format(topic=topic, title=form.title, count=len(form.lines), n=form.lines[0])
    return (_POEM_ZH if lang == "zh" else _POEM_EN)[form.name].format(topic=topic)


# -- guided decoding --------------------------------------------------------------

def verse_grammar(lengths: tuple[int, ...], ends: list[str]) -> str:
    """A Lark grammar for lines of exactly `lengths` Chinese characters, each followed by its `ends`
    text (punctuation + newline; the last line's newline dropped, so the poem ends where it is full):
    `start: /[<Han>]{5}/ "，\\n" /[<Han>]{5}/ "。"` for two lines of 五言."""
    ends = [*ends[:-1], ends[-1].rstrip("\n")]
    parts = [f"/{HAN_RE.pattern}{{{n}}}/" + (" " + json.dumps(end, ensure_ascii=False) if end else "")
             for n, end in zip(lengths, ends)]  # an empty end (a 汉俳's last line) is no literal at all
    return "start: " + " ".join(parts)


def guided_lines(model, prompt_ids: list[int], lengths: tuple[int, ...], ends: list[str],
                 params: SamplingParams) -> str:
    """Sample lines of exactly `lengths` Chinese characters after `prompt_ids`, each followed by its
    `ends` text: one generation under `Constraint.grammar(verse_grammar(...))`, so the engine masks
    every token that would break the form (a token may hold several characters, or a character and
    its punctuation) and ends the poem when it is full. The usual sampler runs on what is left
    (temperature, top-p, penalties, seed); through a server it batches like any other request.
    """
    grammar = Constraint.grammar(verse_grammar(lengths, ends))
    # Every token spells at least one byte (a Chinese character is 3), and EOS ends it: this bound
    # always fits the poem; the loop guard is off because the grammar already bounds the output.
    budget = 3 * sum(lengths) + sum(len(e.encode("utf-8")) for e in ends) + 1
    p = params.replace(constraint=grammar, max_new_tokens=budget, stop=[], loop_guard=False)
    return model.generate(list(prompt_ids), p)


def guided_syllables(model, prompt_ids: list[int], lengths: tuple[int, ...], params: SamplingParams,
                     samples: int = 4) -> str:
    """Write lines of exactly `lengths` syllables after `prompt_ids`, one line at a time.

    Syllables span several tokens, so instead of masking tokens each line is sampled up to its newline,
    and sampled again (a new seed) while its count is wrong, up to `samples` times; then the closest
    line is kept and `check_form` reports it.

    Not a grammar constraint like `guided_lines`: a syllable is not a property of characters. A grammar
    would have to list every word with its count (a vocabulary of word → syllables, open-ended, with
    `syllables()`'s rules compiled into alternatives), and a line of 5 would be a sum over any split
    into words — a huge grammar per form that still could not spell a word outside its list.
    """
    lines: list[str] = []
    for i, want in enumerate(lengths):
        context = list(prompt_ids) + model.tokenizer.encode("".join(ln + "\n" for ln in lines),
                                                            add_special_tokens=False)
        best = ""
        for s in range(samples):
            p = _retry_params(params, s, offset=100 * i)
            p = p.replace(stop=["\n"], max_new_tokens=min(p.max_new_tokens, 32))  # one line
            line = " ".join(clean(model.generate(context, p)))
            if abs(syllables(line) - want) < abs(syllables(best) - want) or not best:
                best = line
            if syllables(best) == want:
                break
        lines.append(best)
    return "\n".join(lines)


def _line_ends(form: Form) -> list[str]:
    if form.name == "haiku":
        return ["\n"] * len(form.lines)
    return ["，\n" if i % 2 == 0 else "。\n" for i in range(len(form.lines))]


def _can_guide(model) -> bool:
    # The constraint engine reads a Hugging Face tokenizer (Muse's, GGUF ones included) with an EOS.
    tok = model.tokenizer
    return hasattr(tok, "backend") and bool(getattr(tok, "eos_ids", None))


# -- creating ---------------------------------------------------------------------

def _attempt(model, kind: str, form: Form, messages: list[dict], lang: str, p: SamplingParams,
             guide: str | None) -> tuple[str, list[str]]:
    """One generation, repaired, and the problems left in it. guide: None, "characters" or "syllables"."""
    if guide:
        ids = model.tokenizer.encode(model.chat_prompt(messages), add_special_tokens=False)
        if guide == "characters":
            text = guided_lines(model, ids, form.lines, _line_ends(form), p)
        else:
            text = guided_syllables(model, ids, form.lines, p)
        return text, check_form(text, form.name)
    chunks = list(model.stream_chat(messages, p))
    raw = "".join(c.text for c in chunks)
    finish = chunks[-1].finish_reason if chunks else None
    if kind == "poem" and form.lines:
        text = repair(raw, form.name)
        return text, check_form(text, form.name)  # a cut-off reply may still hold a whole haiku
    lines = clean(raw)
    text = lines[0] if kind == "slogan" and lines else "\n".join(lines)
    return text, _check_prose(kind, text, lang, finish, p.max_new_tokens)


def _retry_params(p: SamplingParams, attempt: int, offset: int = 0) -> SamplingParams:
    """A new seed for each retry (derived from the given one, so runs repeat); greedy would only
    repeat itself, so a retry after temperature 0 samples at TEMPERATURE."""
    if attempt == 0 and not offset:
        return p
    seed = None if p.seed is None else p.seed + offset + attempt
    return p.replace(seed=seed, temperature=p.temperature or TEMPERATURE) if attempt else p.replace(seed=seed)


def _guide(model, form: Form, lang: str) -> str | None:
    """How decoding is guided for this form: by characters (Chinese lines), syllables, or not at all."""
    if not form.lines:
        return None
    if form.chinese or lang == "zh":
        return "characters" if _can_guide(model) else None
    return "syllables"


def default_params(kind: str) -> SamplingParams:
    """The sampling `create` uses for `kind` without params: TEMPERATURE, TOP_P, PRESENCE_PENALTY
    against the small models' loops, and DEFAULT_TOKENS[kind] tokens."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return SamplingParams(max_new_tokens=DEFAULT_TOKENS[kind], temperature=TEMPERATURE, top_p=TOP_P,
                          presence_penalty=PRESENCE_PENALTY)


def create(model, kind: str, topic: str, form: str | None = None, params: SamplingParams | None = None,
           attempts: int = 4, guided: bool = True) -> Creation:
    """Write a poem, story, slogan or product ad copy about `topic`.

    kind: poem | story | slogan | product (for product, `topic` is the product's description).
    form (poems only): wujue, qijue, wulv, qilv (Chinese; need a bilingual model), haiku, free (default),
    or a Chinese name: 五言绝句 (五绝), 七言绝句 (七绝), 五言律诗 (五律), 七言律诗 (七律), 俳句, 自由诗.
    The piece is written in the topic's language (Chinese forms always in Chinese). Forms are checked;
    a non-conforming result is retried with a new seed up to `attempts` times in all, and the best try
    comes back with ok=False and its problems if none conforms. `guided` builds fixed forms line by line
    (`guided_lines` for Chinese characters, `guided_syllables` for a haiku); False samples the whole
    poem freely, then repairs it. Default sampling: `default_params(kind)`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind != "poem" and form is not None and get_form(form).name != "free":
        raise ValueError(f"form applies to poems only; drop form={form!r} for a {kind}")
    if not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be an integer ≥ 1, got {attempts!r}")
    if not isinstance(topic, str) or not topic.strip():
        raise ValueError("topic must not be empty: say what to write about")
    f = get_form(form)
    lang = check_language(model, topic)
    if f.chinese:
        if not supports_chinese(model):
            raise LanguageError(f"A {f.title} ({f.name}) is Chinese verse, and {model.name} is an English-only "
                                "model. Use the bilingual model: `--model qwen2.5-0.5b`.")
        lang = "zh"
    guide = _guide(model, f, lang) if guided else None
    p = params or default_params(kind)
    messages = [{"role": "user", "content": instruction(kind, f, topic.strip(), lang)}]
    best: Creation | None = None
    for i in range(attempts):
        text, problems = _attempt(model, kind, f, messages, lang, _retry_params(p, i), guide)
        if not problems:
            return Creation(text, f.name if kind == "poem" else None, True, [], i + 1)
        if best is None or len(problems) < len(best.problems):
            best = Creation(text, f.name if kind == "poem" else None, False, problems, i + 1)
    best.tries = attempts
    return best
