"""Is a knowledge-base answer grounded in the passages it was given? Checks that need no model.

The model answers from numbered passages; `verify` then decides whether the reply is an answer:

* a refusal ("not in the documents", "文档中没有提到…") is not one;
* nor is a reply that says nothing beyond citations, a bare passage number, a document title or
  heading, or only the question's own words;
* a reply of several sentences (`DUMP_SENTENCES`) is a passage copied out: only its sentences that
  speak to the question count, and with none it is no answer;
* a reply is supported when every number it states beyond the question appears in one passage and,
  of the content words it adds, at least `SUPPORT` of them do too (a passage in the other language
  than the reply cannot share words, so numbers alone count there; words about the source, "The
  passage states that…", `SOURCE_TALK`, are no claim and are not shown);
* that passage must hold what the question names of a document's title (`names_another`: "星辰科技
  的婚假" is not answered from another company's handbook), and the reply's numbers must come in a
  unit the passages use for them (`miscounted`: "15元" is not backed by "提前15天");
* and when every term of the question that it repeats (its subject: "parental leave", "停车费") is
  in some passage, question-frame words aside (`GENERIC`, `_ZH_FRAME`): otherwise it answers about
  what the documents never mention;
* and when it gives the kind of answer the question asks for (`wrong_kind`: "几个月" is not answered
  in days, "多长时间" and "how long does…" not with dates, "how much does it cost" not without an amount).

A supported reply keeps its valid inline citations; one without any gets the supporting passage's
number added, so every found answer cites where it comes from.

`speaks_to` tells whether a sentence of the passages is about what a question asks, for
`muse.apps.kb.quote`, which quotes such a sentence when the model's own reply is no grounded answer.

    verdict = verify(reply, question, passages)    # passages: objects with .n, .title, .section, .text
    verdict.text, verdict.cited                    # None, [] when the reply is no grounded answer
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from muse.text import HAN_RE, has_number, language, numbers, sentences, terms

SUPPORT = 0.5  # share of the reply's new content words that the supporting passage must contain

NOT_FOUND = {"en": "The answer is not in your documents.", "zh": "你的文档中没有这个问题的答案。"}

CITE = re.compile(r"\[(\d+)\]")
_NUM = re.compile(r"\d+(?:\.\d+)?")
_REFUSAL = re.compile(
    r"not (?:found |mentioned |stated |given |provided |contained |included )?in (?:your|the|any of the) "
    r"(?:documents?|passages?|text)"
    r"|(?:documents?|passages?|text) (?:do|does) not (?:contain|mention|say|state|provide|include|specify)"
    r"|(?:no|not enough) information|is not (?:mentioned|stated|specified|provided)"
    r"|(?:cannot|can't|can not|unable to) (?:find|answer|determine|be determined)"
    r"|没有这个问题的答案|没有(?:提到|提及|说明|相关|给出|找到)|未(?:提到|提及|说明|给出)|无法(?:回答|确定|找到)"
    r"|(?:文档|段落|资料)中没有",
    re.IGNORECASE)
_TRIM = " \t\r\n.。,，:：;；!！?？-—–*\"'“”‘’()（）「」"


@dataclass
class Verdict:
    text: str | None                     # the answer to show, None when the reply is no grounded answer
    cited: list[int] = field(default_factory=list)  # passage numbers the answer cites
    reason: str = ""  # why it is not an answer ("refusal", "bare", "title", "dump", "unsupported", "off")


def refuses(reply: str) -> bool:
    """Whether the reply says the passages do not hold the answer."""
    flat = re.sub(r"\s+", " ", reply)
    return bool(_REFUSAL.search(flat)) or any(_squash(nf) in _squash(flat) for nf in NOT_FOUND.values())


def _squash(text: str) -> str:
    return re.sub(r"[\W_]+", "", text).lower()


def claims(reply: str, question: str) -> tuple[set[float], set[str]]:
    """(numbers by value, content words) the reply states beyond the question, citations left out.
    Numbers compare by value across scripts (`muse.text.numbers`): "300,000 yuan" is backed by 30万元."""
    body = CITE.sub(" ", reply)
    nums = set(numbers(body)) - set(numbers(question, generous=True))
    asked = set(terms(question)[1])
    words = {t for t in terms(body)[1] if not _NUM.fullmatch(t)} - asked - SOURCE_TALK
    return nums, words


def support(passage: str, nums: set[float], words: set[str], reply_lang: str) -> float:
    """How well `passage` backs the claims: 0 when a number is missing, else the share of words found
    (numbers alone back a reply in the other language than the passage)."""
    found = numbers(passage, generous=True)
    if not all(has_number(n, found) for n in nums):
        return 0.0
    if not words:
        return 1.0 if nums else 0.0
    if nums and language(passage) != reply_lang:
        return 1.0
    return len(words & set(terms(passage)[1])) / len(words)


# Question words a reply may repeat though no passage has them: they ask, they do not name the subject.
# Measured on the kbqa dev sets: "daily limit", "capacity" and "offer" framed questions whose answers the
# passages do state, in other words ("up to 40 dollars per day", "a 1.7-litre kettle").
GENERIC = frozenset("many much long often soon late early time times date day days daily cost costs price need "
                    "needs get gets give given make made take can could may might must should would will please "
                    "tell know find use used way ways kind type number amount limit limits capacity maximum "
                    "minimum offer offers set still".split())
# Words a reply uses to talk about its sources, not about the answer ("The passage states that…",
# "根据文档…"): no claim a passage must back. On kbqa dev, "The passage states that receipts can be
# submitted within 60 days" was refused for lack of "passage" and "state" in the passage.
SOURCE_TALK = frozenset("passage passages document documents state says said according mention text information "
                        "provided 根据 据文 文档 资料 文件 提到 说明".split())


# Characters that frame a Chinese question or join its words ("会受到", "可以提前"): a pair holding one is
# no subject term. Without them the subject check refused right answers on kbqa_zh_dev as often as it
# caught made-up ones ("会受", "以提"); with them it refused none of 14 and caught 2 of 6 made-up answers.
_ZH_FRAME = frozenset("的了是在和也就都而及与着或之于其这那个们我你他她它有为以被把让从到对会将可能要需应该几多少"
                      "什么哪谁吗呢怎样请每一后前时上下中里内外还再又才已")
# Verbs and nouns that frame what is asked ("会受到什么处理", "需要什么手续"), as GENERIC does in English.
_ZH_GENERIC = frozenset("受到 处理 办理 需要 规定 要求 情况 方法 办法 时间 费用 价格 得到 提供 使用 进行 属于 包括 获得 "
                        "享受 手续 条件 标准 注意 事项 允许 可以 应该 多长 多久".split())
_HAN_RUN = re.compile(f"{HAN_RE.pattern}+")


def _subject_terms(text: str, lang: str) -> set[str]:
    """Terms that can name what a question is about: English content words; Chinese character pairs
    with no framing character (`_ZH_FRAME`)."""
    if lang != "zh":
        return set(terms(text)[1])
    return {run[i:i + 2] for run in _HAN_RUN.findall(text) for i in range(len(run) - 1)
            if run[i] not in _ZH_FRAME and run[i + 1] not in _ZH_FRAME}


def _junctions(text: str, held: set[str]) -> set[str]:
    """Chinese character pairs of `text` that straddle two held words: "区游" of "深水区游泳" when
    "水区" and "游泳" are held. A pair is no word, so the passages need not hold it."""
    return {run[i:i + 2] for run in _HAN_RUN.findall(text) for i in range(1, len(run) - 2)
            if run[i - 1:i + 1] in held and run[i + 1:i + 3] in held}


def unbacked_subject(body: str, question: str, passages: list, reply_lang: str) -> list[str]:
    """The question's terms that the reply repeats but no passage about the question holds: the reply
    answers about something the documents never mention ("parental leave", "停车费") — made up.

    Passages "about the question" are those in the reply's language that share a term with it; a
    passage in the other language cannot share words, so when none is about the question (a Chinese
    question on an English-only document) nothing is checked."""
    asked = _subject_terms(question, reply_lang)
    held_by = [_subject_terms(f"{p.title}\n{getattr(p, 'section', '')}\n{p.text}", reply_lang)
               for p in passages if language(p.text) == reply_lang]
    held_by = [h for h in held_by if h & asked]
    if not held_by:
        return []
    held = set().union(*held_by)
    echoed = _subject_terms(CITE.sub(" ", body), reply_lang) & asked
    if reply_lang == "zh":
        return sorted(echoed - held - _ZH_GENERIC - _junctions(question, held))
    stems = {w[:5] for w in held if len(w) >= 5}  # "claim" is held by "claims", "carried" by "carry"…
    return sorted(w for w in echoed - held if w not in GENERIC and not _NUM.fullmatch(w)
                  and w.rstrip("s") not in held and w + "s" not in held and not (len(w) >= 5 and w[:5] in stems))


# What a question asks for, and what a reply must then say: a question about months is not answered by a
# number of days ("年终奖发几个月" → "15天"). Only the unmistakable kinds; anything else asks for nothing.
# A length of time, not a date: "2月8日至2月17日" is no answer to "要多长时间" (kbqa dev).
_DURATION = (r"(?<![\d月])\d+(?:\.\d+)?\s*(?:个)?(?:秒|分钟|小时|钟头|天|周|星期|礼拜|个月|年)|"
             r"[一二两三四五六七八九十百半几]+\s*(?:个)?(?:秒|分钟|小时|钟头|天|周|星期|礼拜|个月|年)|"
             r"\b(?:\d+|an?|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|"
             r"half an?|a few|several)(?:[\s-]+(?:working|business|full|calendar|whole|more))?[\s-]*"
             r"(?:seconds?|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|years?|nights?)\b")
_ASKS = [(re.compile(q, re.IGNORECASE), re.compile(a, re.IGNORECASE)) for q, a in (
    (r"几个月|多少个月|how many months", r"月|month|year|年"),
    (r"几天|多少天|how many days", r"天|日|day|week|周|星期"),
    (r"几年|多少年|how many years", r"年|year"),
    (r"几楼|几层|which floor|what floor", r"楼|层|floor|storey"),
    (r"多长时间|多久|几个?小时|how many hours|\bhow long (?:do|does|did|will|would|can|is|are|was|should)\b", _DURATION),
    (r"几次|多少次|how many times", r"次|遍|回|once|twice|times"),
    (r"多少钱|收费多少|费用是多少|价格是多少|售价|票价|how much (?:does|do|is|are|will)\b.*\b(?:cost|charge|fee|price)",
     r"元|块|钱|免费|美元|欧元|英镑|dollar|yuan|euro|pound|cent|free|[$¥￥€£]"),
    (r"^what time\b|几点", r"\d|noon|midnight|o'clock|点|时"),
)]


# The model is asked for one sentence; a reply of this many or more is a passage copied out, not an answer.
DUMP_SENTENCES = 3


def _focus(question: str, passages: list, lang: str) -> set[str]:
    """The question's terms that are no title or heading of the passages: what it asks about beyond
    the document ("保修期" of "小蜜蜂X3扫地机器人的保修期是多久", not the product's name)."""
    names = set().union(*(_subject_terms(f"{p.title}\n{getattr(p, 'section', '')}", lang) for p in passages))
    return _subject_terms(question, lang) - names


def names_the_subject(reply: str, question: str, passages: list) -> bool:
    """Whether the reply says what it is about: one of the question's `_focus` terms (any reply when
    the question names nothing beyond the titles). "15天" names nothing; "婚假有15天" does."""
    lang = language(CITE.sub(" ", reply))
    focus = _focus(question, passages, lang)
    return not focus or bool(_subject_terms(CITE.sub(" ", reply), lang) & focus)


def speaks_to(sentence: str, question: str, passages: list) -> bool:
    """Whether `sentence` holds one of the question's `_focus` terms that frames nothing (`GENERIC`,
    `_ZH_GENERIC`, everyday `_LIGHT` words and "last year" left out) and is no name (`_names`), in any
    inflection (`_forms`): it is about what the question asks ("notice" of "How much notice do I have
    to give?", "恢复出厂" of "怎样恢复出厂设置"), not only about what both name. Unlike
    `names_the_subject`, a question that names nothing beyond the titles and names gets no sentence."""
    lang = language(sentence)
    question = _WHEN.sub(" ", question)
    focus = _focus(question, passages, lang) - GENERIC - _ZH_GENERIC - _LIGHT - _names(question)
    said = _subject_terms(sentence, lang) - _LIGHT
    if lang == "zh":
        return bool(said & focus)
    return bool(set().union(*map(_forms, said)) & set().union(*map(_forms, focus)))


def _forms(word: str) -> set[str]:
    """An English word and what it may be without an inflection: "repairs" and "repair" meet in
    "repair", "beeped" and "beeps" in "beep"."""
    out = {word}
    for end in ("s", "es", "ed", "ing"):
        if word.endswith(end) and len(word) - len(end) >= 3:
            out.add(word[:-len(end)])
    return out


# Everyday words that say little of what a question asks ("…until my kettle comes back?"): a sentence
# sharing only these ("Our kettles come with a warranty") does not speak to it.
_LIGHT = frozenset("come comes came go goes went back want wants like keep put see look say think good new old "
                   "also just only really more most first next any anything something thing things "
                   "happen happens one two get got".split())


# "last year's", "next week": when, not what is asked ("How long does the warranty last?" asks of "last").
_WHEN = re.compile(r"\b(?:last|next|this) (?:year|week|month|time|night|weekend)(?:'s)?\b", re.IGNORECASE)


def _names(question: str) -> set[str]:
    """The capitalised words of an English question, each sentence's first left out (lower-cased):
    names ("Zorblat"), which say what the question is about, never what it asks of it."""
    return {w.lower() for part in re.split(r"[.?!]\s+", question) for w in re.findall(r"[A-Za-z][\w'-]*", part)[1:]
            if w[0].isupper() and w.isalpha()}


def answering_sentences(said: list[str], question: str, passages: list, reply_lang: str) -> list[str]:
    """Of a reply's sentences `said`, when they are a passage copied out (`DUMP_SENTENCES` or more),
    those that speak to the question: holding one of its terms that is no document title or heading
    ("保修期" of "小蜜蜂X3扫地机器人的保修期是多久", not the product's name, which every sentence of its
    manual repeats). All of them when the question names nothing beyond the titles, or the reply is short."""
    if len(said) < DUMP_SENTENCES:
        return said
    focus = _focus(question, passages, reply_lang)
    if not focus:
        return said
    return [x for x in said if _subject_terms(x, reply_lang) & focus]


_YES_NO = re.compile(r"^\W*(?:can|could|does|do|did|is|are|was|were|will|would|should|has|have|may|must)\b"
                     r"|吗\W*$|是否|能否|可否|有没有|是不是|能不能|可不可以|会不会", re.IGNORECASE)


def asks_yes_or_no(question: str) -> bool:
    """Whether the question asks yes or no ("Can staff claim a gym membership?", "酒店有没有停车场？")."""
    return bool(_YES_NO.search(question.strip()))


def wrong_kind(body: str, question: str) -> bool:
    """Whether the question asks for a kind of answer (`_ASKS`: days, a price, a floor…) that the
    reply does not give."""
    return any(q.search(question) and not a.search(body) for q, a in _ASKS)


# Units a number is counted in, by kind: "15元" is not backed by a passage that has only "提前15天".
_UNITS = {u: kind for kind, units in {
    "yuan": "元 块 yuan rmb ¥ ￥", "dollar": "美元 dollar dollars $", "pound": "英镑 pound pounds £",
    "euro": "欧元 euro euros €", "day": "天 day days", "week": "周 星期 week weeks", "month": "个月 month months",
    "year": "年 year years", "hour": "小时 钟头 hour hours", "minute": "分钟 minute minutes",
    "times": "次 遍 time times", "floor": "楼 层 floor", "age": "岁", "percent": "% percent", "clock": "点",
}.items() for u in units.split()}
_WITH_UNIT = re.compile(r"([$£€¥￥])\s*(\d+(?:\.\d+)?)|(\d+(?:\.\d+)?)\s*(" + "|".join(
    sorted((re.escape(u) for u in _UNITS if u not in "$£€¥￥"), key=len, reverse=True)) + r")(?![a-z])", re.I)


def _counted(text: str) -> dict[str, set]:
    """Each number of `text` with the kinds of unit it is written with (None: none that `_UNITS` knows)."""
    seen: dict[str, set] = {}
    counted = set()  # start offsets of the numbers written with a unit
    for m in _WITH_UNIT.finditer(text):
        n, unit, at = (m.group(2), m.group(1), m.start(2)) if m.group(1) else (m.group(3), m.group(4), m.start(3))
        seen.setdefault(n, set()).add(_UNITS[unit.lower()])
        counted.add(at)
    for m in _NUM.finditer(text):
        seen.setdefault(m.group(), set())
        if m.start() not in counted:
            seen[m.group()].add(None)
    return seen


def miscounted(body: str, passages: list) -> list[str]:
    """Numbers the reply gives in a unit the passages never use for them: "上涨15元" where the only 15 is
    "提前15天", "婚假有10天" where it is "10点" (kbqa dev, unanswerable questions). A number the passages
    also write bare is not held to it."""
    held = _counted("\n".join(p.text for p in passages))
    wrong = []
    for n, kinds in _counted(body).items():
        there = held.get(n)
        if there and None not in there and kinds - {None} and not (kinds & there):
            wrong.append(n)
    return wrong


def names_another(question: str, passage, passages: list, lang: str) -> bool:
    """Whether the question names a document (its title's terms) that `passage` does not hold: "星辰科技
    员工的婚假" is not answered by another company's handbook, which has a 婚假 (kbqa dev)."""
    titled = set().union(*(_subject_terms(p.title, lang) for p in passages)) if passages else set()
    named = _subject_terms(question, lang) & titled
    own = _subject_terms(f"{passage.title}\n{getattr(passage, 'section', '')}\n{passage.text}", lang)
    return bool(named - own)


def verify(reply: str, question: str, passages: list) -> Verdict:
    """The grounded answer in `reply`, or why there is none (see the module docstring)."""
    text = reply.strip()
    if not text or refuses(text):
        return Verdict(None, reason="refusal")
    body = CITE.sub(" ", text).strip(_TRIM)
    if not body or (body.isdigit() and int(body) <= max(len(passages), 1)):
        return Verdict(None, reason="bare")
    names = {_squash(p.title) for p in passages}
    names |= {_squash(h) for p in passages for h in getattr(p, "section", "").split(" › ") if h}
    if _squash(body) in names:
        return Verdict(None, reason="title")
    reply_lang = language(body)
    said = sentences(body)
    kept = answering_sentences(said, question, passages, reply_lang)
    if not kept:
        return Verdict(None, reason="dump")  # a passage copied out that never speaks to the question
    if len(kept) < len(said):
        text = " ".join(kept) if reply_lang != "zh" else "".join(kept)
        body = CITE.sub(" ", text).strip(_TRIM)
    nums, words = claims(text, question)
    if not nums and not words:
        return Verdict(None, reason="bare")  # only the question's own words
    scores = {p.n: 0.0 if names_another(question, p, passages, language(question)) or miscounted(body, [p]) else
              support(f"{p.title}\n{getattr(p, 'section', '')}\n{p.text}", nums, words, reply_lang)
              for p in passages}
    given = {p.n for p in passages}
    cited = [n for n in dict.fromkeys(int(x) for x in CITE.findall(text)) if n in given]
    best = max(scores, key=lambda n: scores[n]) if scores else None
    if best is None or scores[best] < SUPPORT or unbacked_subject(body, question, passages, reply_lang):
        return Verdict(None, reason="unsupported")
    if wrong_kind(body, question):
        return Verdict(None, reason="off")
    if not any(scores[n] >= SUPPORT for n in cited):
        text = add_citation(CITE.sub("", text).rstrip(), best)  # wrong or missing citation: cite the support
        cited = [best]
    return Verdict(without_source_talk(text), cited)


def terse(reply: str, question: str, passages: list, verdict: Verdict | None = None) -> bool:
    """Whether the reply is too bare to check: a passage number, the question's own words, or numbers
    and no word at all ("15 [1]": fifteen of what?). `verdict`: the reply's, when already known."""
    if (verdict or verify(reply, question, passages)).reason == "bare":
        return True
    words = [t for t in terms(CITE.sub(" ", reply))[1] if not _NUM.fullmatch(t)]
    return bool(numbers(reply)) and not words


_SOURCE_OPENING = re.compile(
    r"^(?:(?:based on|according to) (?:the )?(?:passages?|documents?|text|information)(?: \[\d+\])?,\s*"
    r"|the (?:passages?|documents?|text) (?:\[\d+\] )?(?:states?|says?|mentions?|shows?) that\s+"
    r"|(?:根据|按照)(?:上述)?(?:文档|资料|文件)(?:\s*\[\d+\])?[，,:：]\s*)", re.IGNORECASE)


def without_source_talk(text: str) -> str:
    """The answer without an opening about its source ("The passage states that…", "根据文档，"): the
    citation says where it comes from."""
    opening = _SOURCE_OPENING.match(text)
    if not opening or opening.end() == len(text):
        return text
    rest = text[opening.end()].upper() + text[opening.end() + 1:]
    for n in CITE.findall(opening.group()):  # "Based on the passage [1], …": the citation moves to the end
        if f"[{n}]" not in rest:
            rest = add_citation(rest, int(n))
    return rest


def add_citation(text: str, n: int) -> str:
    """`text` with " [n]" before its closing punctuation."""
    text = re.sub(r"\s+([.。!！])", r"\1", text)
    if text and text[-1] in ".。!！":
        return f"{text[:-1]} [{n}]{text[-1]}"
    return f"{text} [{n}]"
