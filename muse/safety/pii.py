"""Personal data: find it, replace it with placeholders, and put it back in the answer.

    >>> r = redact("邮箱 li@example.com，电话13800138000谢谢")
    >>> r.text
    '邮箱 [EMAIL_1]，电话[PHONE_1]谢谢'
    >>> restore("I will write to [EMAIL_1].", r.mapping)
    'I will write to li@example.com.'

Kinds: e-mail addresses; phone numbers (Chinese mobiles 1[3-9]x with optional +86/0086, spaces,
dashes or dots; international numbers written with a leading +; North-American (415) 555-2671 and
415-555-2671); Chinese resident ID numbers (18 characters, GB 11643 checksum and a real birth date);
bank cards (13-19 digits written whole or in the printed layouts, Luhn check and a card-network first
digit); IPv4 and IPv6 addresses
(validated by `ipaddress`). The same value gets the same placeholder however it is written
("138-0013-8000" and "13800138000" are both [PHONE_1]); `restore` puts back the first spelling.

Why regular expressions and checksums, not Microsoft Presidio: Presidio's analyzer needs a spaCy
language model downloaded at run time (Muse never downloads at run time) and has no recognizers for
Chinese IDs or mobiles; the checksums here (GB 11643, Luhn) are what makes a digit run an ID or a card,
so order numbers, dates and numbers that fail the check are left alone.

Text is matched on a folded copy (NFKC, so full-width １３８ and ＠ count; invisible characters
dropped; typographic dashes folded), and every match is mapped back to its span in the original text.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field

from muse.safety.normalize import FOLD_TABLE

KINDS = ("email", "phone", "id", "card", "ip")
TAGS = {"email": "EMAIL", "phone": "PHONE", "id": "ID", "card": "CARD", "ip": "IP"}
# The order kinds claim text in: an 18-digit ID is not also a card, an IP is not a phone.
_PRIORITY = ("id", "card", "email", "ip", "phone")

_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![A-Za-z0-9-])")
_SEP = r"[ \t.-]"
_CN_MOBILE = re.compile(rf"(?<![\d+])(?:(?:\+|00)86{_SEP}?|\(\+?86\)\s?)?1[3-9]\d(?:{_SEP}?\d){{8}}(?!\d)")
_INTL_PHONE = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?:[ \t.-]?\(?\d{1,4}\)?){2,6}(?!\d)")
_NANP_PHONE = re.compile(r"(?<![\d-])(?:\(\d{3}\)[ \t]?\d{3}[ \t.-]\d{4}|\d{3}-\d{3}-\d{4})(?![\d-])")
_CN_ID = re.compile(r"(?<!\d)[1-9]\d{5}[ \t-]?(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
                    r"[ \t-]?\d{3}[0-9Xx](?!\d)")
_DIGIT_RUN = re.compile(r"(?<!\d)\d+(?:[ \t-]\d+)*(?!\d)")        # digit groups, one separator apart
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![0-9A-Za-z:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})"
                   r"(?:%[0-9A-Za-z]+)?(?![0-9A-Za-z:])")
_PLACEHOLDER = re.compile(r"[\[［【]\s*([A-Za-z]+_\d+)\s*[\]］】]")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


@dataclass
class Entity:
    kind: str          # email | phone | id | card | ip
    start: int         # span in the original text
    end: int
    value: str         # canonical form: lower-case e-mail, digits only, compressed IP
    placeholder: str = ""


@dataclass
class Redaction:
    """The redacted text, placeholder -> original text, and where each entity was (spans in the original)."""
    text: str
    mapping: dict[str, str] = field(default_factory=dict)
    entities: list[Entity] = field(default_factory=list)

    def restore(self, text: str) -> str:
        return restore(text, self.mapping)


# -- validators ------------------------------------------------------------------------


def digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def luhn_ok(number: str) -> bool:
    """The Luhn checksum every payment card number carries."""
    total = 0
    for i, d in enumerate(reversed(number)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def cn_id_ok(number: str) -> bool:
    """An 18-character Chinese resident ID: GB 11643 check character and a birth date that exists."""
    number = number.upper()
    if not re.fullmatch(r"\d{17}[\dX]", number):
        return False
    try:
        born = datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    if not datetime.date(1800, 1, 1) <= born <= datetime.date.today():
        return False
    check = "10X98765432"[sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS)) % 11]
    return number[17] == check


def _card_prefix_ok(number: str) -> bool:
    """Issued card numbers start with 3 (Amex, JCB, Diners), 4 (Visa), 5 (Mastercard), 6 (UnionPay,
    Discover) or 2221-2720 (Mastercard); an order number starting with a date is not a card."""
    return number[0] in "3456" or 2221 <= int(number[:4]) <= 2720


# -- recognizers (on the folded text; each yields (start, end, canonical value)) --------


def _emails(t: str):
    for m in _EMAIL.finditer(t):
        yield m.start(), m.end(), m.group(0).lower()


def _phones(t: str):
    for m in _CN_MOBILE.finditer(t):
        yield m.start(), m.end(), digits(m.group(0))[-11:]
    for m in _INTL_PHONE.finditer(t):
        d = digits(m.group(0))
        if 8 <= len(d) <= 15:
            yield m.start(), m.end(), "+" + (d[2:] if d.startswith("86") and len(d) == 13 else d)
    for m in _NANP_PHONE.finditer(t):
        yield m.start(), m.end(), "+1" + digits(m.group(0))


def _ids(t: str):
    for m in _CN_ID.finditer(t):
        value = re.sub(r"[ \t-]", "", m.group(0)).upper()
        if cn_id_ok(value):
            yield m.start(), m.end(), value


def _cards(t: str):
    """Cards are written whole or in groups ("4111 1111 1111 1111"); a run of groups may hold a card
    plus more (an expiry, a CVV), so try windows of whole groups, longest first."""
    for run in _DIGIT_RUN.finditer(t):
        groups = [(m.start() + run.start(), m.end() + run.start()) for m in re.finditer(r"\d+", run.group(0))]
        i = 0
        while i < len(groups):
            found = _card_window(t, groups, i)
            if found:
                yield found[0], found[1], found[2]
                i = found[3]
            else:
                i += 1


def _card_layout_ok(lengths: list[int]) -> bool:
    """How cards are printed: whole, in fours (the last group shorter: 4-4-4-4-3, 4-4-4-1), or Amex 4-6-5 and
    Diners 4-6-4. A table of numbers ("123 4567 890 ...") is not a card even when a window passes Luhn."""
    return (len(lengths) == 1 or tuple(lengths) in ((4, 6, 5), (4, 6, 4))
            or (all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 4))


def _card_window(t: str, groups: list[tuple[int, int]], i: int):
    for j in range(min(len(groups), i + 5), i, -1):     # 19 digits span at most 5 printed groups
        window = groups[i:j]
        number = "".join(t[a:b] for a, b in window)
        if 13 <= len(number) <= 19 and _card_layout_ok([b - a for a, b in window]) and _card_prefix_ok(number) \
                and luhn_ok(number):
            return window[0][0], window[-1][1], number, j
    return None


def _ips(t: str):
    for m in _IPV4.finditer(t):
        try:
            yield m.start(), m.end(), str(ipaddress.IPv4Address(m.group(0)))
        except ValueError:
            continue
    for m in _IPV6.finditer(t):
        s = m.group(0)
        if sum(bool(g) for g in re.split(r"[:%]", s)) < 2 or not re.search(r"\d", s):
            continue  # "a::b", "::1" and C++ "std::" are not someone's address
        try:
            yield m.start(), m.end(), str(ipaddress.IPv6Address(s))
        except ValueError:
            continue


_RECOGNIZERS = {"email": _emails, "phone": _phones, "id": _ids, "card": _cards, "ip": _ips}


# -- public API ----------------------------------------------------------------------------


def _fold(text: str) -> tuple[str, list[int]]:
    """The folded text and, for each of its characters, the index of the original character."""
    out, index = [], []
    for i, ch in enumerate(text):
        for c in unicodedata.normalize("NFKC", ch).translate(FOLD_TABLE):
            out.append(c)
            index.append(i)
    return "".join(out), index


def _check_kinds(kinds) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be some of {', '.join(KINDS)}; got {bad or 'nothing'}")
    return kinds


def find_pii(text: str, kinds=None) -> list[Entity]:
    """Personal data in `text`, in order, without overlaps (spans index the original text)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    kinds = _check_kinds(kinds)
    folded, index = _fold(text)
    taken = [False] * len(folded)
    found = []
    for kind in _PRIORITY:
        if kind not in kinds:
            continue
        for a, b, value in _RECOGNIZERS[kind](folded):
            if not any(taken[a:b]):
                taken[a:b] = [True] * (b - a)
                found.append(Entity(kind, index[a], index[b - 1] + 1, value))
    return sorted(found, key=lambda e: e.start)


def redact(text: str, kinds=None) -> Redaction:
    """Replace personal data with [EMAIL_1], [PHONE_1], [ID_1], [CARD_1], [IP_1] … placeholders.

    The same value gets the same placeholder; a placeholder that already appears in the text is
    skipped, so `restore` never replaces words the user wrote.
    """
    entities = find_pii(text, kinds)
    by_value: dict[tuple[str, str], str] = {}
    counters = {tag: 0 for tag in TAGS.values()}
    mapping: dict[str, str] = {}
    for e in entities:
        key = (e.kind, e.value)
        if key not in by_value:
            tag = TAGS[e.kind]
            while True:
                counters[tag] += 1
                ph = f"[{tag}_{counters[tag]}]"
                if ph not in text:
                    break
            by_value[key] = ph
            mapping[ph] = text[e.start:e.end]
        e.placeholder = by_value[key]
    parts, pos = [], 0
    for e in entities:
        parts += [text[pos:e.start], e.placeholder]
        pos = e.end
    parts.append(text[pos:])
    return Redaction("".join(parts), mapping, entities)


def check_mapping(mapping) -> dict[str, str]:
    """A mapping as `redact` makes it ({"[EMAIL_1]": "li@example.com"}); anything else is a ValueError."""
    if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _PLACEHOLDER.fullmatch(k) for k, v in mapping.items()):
        raise ValueError('mapping must be a JSON object of placeholders to original text, like '
                         '{"[EMAIL_1]": "li@example.com"} (as written by `muse safety redact --mapping`)')
    return {f"[{_PLACEHOLDER.fullmatch(k).group(1).upper()}]": v for k, v in mapping.items()}


def restore(text: str, mapping) -> str:
    """Put the original values back for the placeholders in `text` (a model's answer, say).

    Tolerates what models do to placeholders: lower case, spaces inside, full-width brackets
    (［EMAIL_1］, 【EMAIL_1】). Placeholders not in the mapping are left as they are.
    """
    if isinstance(mapping, Redaction):
        mapping = mapping.mapping
    mapping = check_mapping(mapping)

    def put_back(m: re.Match) -> str:
        return mapping.get(f"[{m.group(1).upper()}]", m.group(0))

    return _PLACEHOLDER.sub(put_back, text)
