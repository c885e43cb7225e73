"""Personal data: find it, replace it with placeholders, and put it back in the answer.

    >>> r = redact("邮箱 li@example.com，电话13800138000谢谢")
    >>> r.text
    '邮箱 [EMAIL_1]，电话[PHONE_1]谢谢'
    >>> restore("I will write to [EMAIL_1].", r.mapping)
    'I will write to li@example.com.'
    >>> [(e.kind, e.score) for e in find_pii("version 1.2.3.4, server 10.0.0.1", threshold=0)]
    [('ip', 0.35), ('ip', 1.0)]

Kinds:
  email  ASCII and internationalised (josé.garcía@…, 用户@例子.中国; labels checked with IDNA), and the
         obfuscated spellings "name [at] example [dot] com", "name(at)example.com", "name艾特example点com",
         "name at example dot com" (the last only with an e-mail word nearby: "look at this dot com" is prose).
  phone  Chinese mobiles (1[3-9]x, +86/0086, spaces, dashes, dots); Chinese landlines with an area code
         (010-62345678, (021) 6123 4567, 0755 8612 3456, +86 21 6234 5678); North-American (415) 555-2671,
         415-555-2671, 415.555.2671, +1/1- prefixes; other international numbers written with a leading +.
  id     Chinese resident IDs: 18 characters (GB 11643 check character, a real birth date and province),
         whole or grouped 6-8-4, 6-4-4-4, 3-3-4-4-4; the 15-digit legacy IDs (no check digit: province, a real
         19yy birth date, and an ID word nearby).
  card   13-19 digits whose first digits and length fit a card network and that pass Luhn: whole, in fours
         (4-4-4-4, 4-4-4-4-3), Amex 4-6-5, Diners 4-6-4, 6-13, with spaces, dashes or dots, or split by one
         line break.
  ip     IPv4 (not inside a longer dotted number, not after "version"/"v"/"build"/"section") and IPv6
         (validated by `ipaddress`).

Each finding has a score in [0, 1]: a base for how telling its form is (a checksum, a grouping, parentheses
around an area code), raised by a word of its kind near it (电话 tel 手机 call · 身份证 ID · card 卡号 · IP
server 服务器 · email 邮箱) and lowered by a word that says it is something else (version v 版本 · doi ·
coordinates lat long 经纬度 · order 订单 invoice 发票 ISBN). The nearest such word before the candidate
decides (else the nearest after it). A candidate glued to ASCII letters ("SF13800138000") loses a little.
Findings at or above `threshold` (default THRESHOLD) are kept; where two overlap the higher score wins.
Measured on the labelled sets in muse/safety_data/pii_{dev,test}.jsonl by bench/pii.py.

Numbers that are not phones: a decimal (one dot as the only separator: 139.69171100, +31.230416), a
number followed by an exponent (+1.602e-19) or a degree sign, and one element of a coordinate pair.

The same value gets the same placeholder however it is written ("138-0013-8000" and "13800138000" are
both [PHONE_1]); `restore` puts back the first spelling.

Why regular expressions and checksums, not Microsoft Presidio: Presidio's analyzer needs a spaCy language
model downloaded at run time (Muse never downloads at run time) and has no recognizers for Chinese IDs,
mobiles or landlines; the checksums (GB 11643, Luhn) are what make a digit run an ID or a card.

Text is matched on a folded copy (NFKC, so full-width １３８ and ＠ count; invisible characters dropped;
typographic dashes folded), and every match is mapped back to its span in the original text. No pattern
repeats a group that itself holds an unbounded quantifier: candidates are flat runs, cut and checked in
Python, so the time is linear in the text (a megabyte of digits and dots takes about a second).
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
# Who wins an exact tie in score: an 18-digit ID is not also a card, an IP is not a phone.
_PRIORITY = ("id", "card", "email", "ip", "phone")
THRESHOLD = 0.5
_BOOST, _DAMP, _GLUED = 0.3, 0.4, 0.3       # a word of the kind nearby; a word against it; glued to letters
_BEFORE, _AFTER = 24, 12                     # characters of context looked at on each side

_PLACEHOLDER = re.compile(r"[\[［【]\s*([A-Za-z]+_\d+)\s*[\]］】]")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
# GB 2260 province-level codes (first two digits of an ID); 81-83: Hong Kong, Macau, Taiwan residence permits.
_PROVINCES = frozenset("11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 "
                       "61 62 63 64 65 71 81 82 83".split())


@dataclass
class Entity:
    kind: str          # email | phone | id | card | ip
    start: int         # span in the original text
    end: int
    value: str         # canonical form: lower-case e-mail, digits only, compressed IP
    placeholder: str = ""
    score: float = 1.0  # confidence in [0, 1]: form and checksum, moved by context words


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


def _date_ok(year: int, month: int, day: int) -> bool:
    try:
        born = datetime.date(year, month, day)
    except ValueError:
        return False
    return datetime.date(1800, 1, 1) <= born <= datetime.date.today()


def cn_id_ok(number: str) -> bool:
    """An 18-character Chinese resident ID: GB 11643 check character, a province code and a birth date
    that exists."""
    number = number.upper()
    if not re.fullmatch(r"\d{17}[\dX]", number) or number[:2] not in _PROVINCES:
        return False
    if not _date_ok(int(number[6:10]), int(number[10:12]), int(number[12:14])):
        return False
    check = "10X98765432"[sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS)) % 11]
    return number[17] == check


def cn_id15_ok(number: str) -> bool:
    """A 15-digit legacy ID (issued until 2004): province code and a real 19yy birth date. There is no check
    digit, so one in ~75 random 15-digit numbers passes: find_pii wants an ID word nearby as well."""
    return (len(number) == 15 and number.isdigit() and number[:2] in _PROVINCES
            and _date_ok(1900 + int(number[6:8]), int(number[8:10]), int(number[10:12])))


def card_network_ok(number: str) -> bool:
    """First digits and length that a card network issues: Visa 4 (13, 16, 19), Mastercard 51-55 and
    2221-2720 (16), Amex 34/37 (15), Diners 30/36/38 (14, 16), JCB 35 (16-19), UnionPay 62, Discover 60/64/65
    and Maestro 5/6 (16-19). An order number starting with a date is not a card."""
    n, head = len(number), number[:2]
    if number[0] == "4":
        return n in (13, 16, 19)
    if head in ("34", "37"):
        return n == 15
    if head in ("30", "36", "38"):
        return n in (14, 16)
    if head == "35" or number[0] in "56":
        return 16 <= n <= 19
    return number[0] == "2" and 2221 <= int(number[:4]) <= 2720 and n == 16


# -- context -------------------------------------------------------------------------------

_WORDS = {  # kind: (words that make it more likely, words that say it is something else)
    "email": ("email e-mail mail 邮箱 邮件 电邮 contact 联系 write reach send 发到 发送", ""),
    "phone": ("电话 手机 座机 固话 联系 致电 拨打 打 传真 热线 tel phone mobile cell call fax contact text "
              "landline whatsapp",
              "lat lon lng long latitude longitude coordinates coordinate gps 坐标 经度 纬度 经纬度 北纬 东经 "
              "version ver v 版本 doi isbn order 订单 单号 编号 invoice 发票 tracking 运单 快递 price 价格 金额 "
              "serial 序列号 sku 批次 batch 学号 ref"),
    "id": ("身份证 身份号码 证件 id identity 身份", "订单 order 单号 编号 invoice 发票 tracking 运单 快递 imei "
           "serial 序列号 流水 batch 批次 ref 学号"),
    "card": ("card 卡号 银行卡 信用卡 借记卡 储蓄卡 工资卡 卡 visa mastercard amex unionpay 银联 credit debit "
             "pay 付款 转账 账号 account",
             "order 订单 单号 编号 invoice 发票 tracking 运单 快递 imei isbn serial 序列号 流水 sku 会员 ref"),
    "ip": ("ip 服务器 server host 主机 地址 address addr ping ssh dns gateway 网关 router 路由 proxy 代理 "
           "subnet 防火墙 firewall connect 访问 内网",
           "version ver v 版本 release build firmware 固件 rev revision section 第 节 条 chapter 章 oid "
           "python numpy"),
}


def _alternation(words: str) -> str:
    """Keywords as one alternation; ASCII words only as whole words ("tel" is not in "hotel")."""
    parts = []
    for w in sorted(set(words.split()), key=len, reverse=True):
        e = re.escape(w)
        if w[0].isascii() and w[0].isalpha():
            e = r"(?<![a-z])" + e
        if w[-1].isascii() and w[-1].isalpha():
            e += r"(?![a-z])"
        parts.append(e)
    return "|".join(parts) or "(?!)"


_CONTEXT = {kind: re.compile(f"(?P<pos>{_alternation(pos)})|(?P<neg>{_alternation(neg)})")
            for kind, (pos, neg) in _WORDS.items()}
_VALUE = re.compile(r"\d[\d.:/-]+\d")          # a number of its own: 1.2.3, 2024-05-01, 12:30
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _context(low: str, a: int, b: int, kind: str) -> float:
    """+_BOOST or -_DAMP from the nearest keyword of `kind` before the span [a, b), else +_BOOST for one of
    its words just after it ("10.0.0.1 (server)"). A keyword with another number (3+ characters) between it
    and the span labels that number: in "订单 2024-05-01 4111…" 订单 is about the date, not the card."""
    rx = _CONTEXT[kind]
    start = max(0, a - _BEFORE)
    for m in _VALUE.finditer(low, start, a):
        start = m.end()
    last = None
    for last in rx.finditer(low, start, a):
        pass
    if last is not None:
        return _BOOST if last.lastgroup == "pos" else -_DAMP
    m = _VALUE.search(low, b, b + _AFTER)
    after = rx.search(low, b, m.start() if m else b + _AFTER)
    return _BOOST if after is not None and after.lastgroup == "pos" else 0.0


def _glued(t: str, a: int, b: int) -> bool:
    """A number with ASCII letters stuck to it is a code ("SF1400123456789", "v1.2.3.4"), more often than not."""
    return (a > 0 and t[a - 1].isascii() and t[a - 1].isalpha()) or (b < len(t) and t[b].isascii()
                                                                     and t[b].isalnum())


# -- recognizers (on the folded text; each yields (start, end, canonical value, base score)) --------

_SEP = r"[ \t.-]"
_CN_MOBILE = re.compile(rf"(?<![\d+])(?:(?:\+|00)86{_SEP}?|\(\+?86\) ?)?1[3-9]\d{_SEP}?\d{{4}}{_SEP}?\d{{4}}(?!\d)")
_AREA = r"(?:10|2\d|[3-9]\d{2})"             # Chinese area codes after the 0: Beijing 10, 2x, then three digits
_CN_LANDLINE = re.compile(rf"(?<![\d+])(?:(?:\+|00)86[ \t-]?\(?0?{_AREA}\)?|\(0{_AREA}\)|0{_AREA})"
                          r"[ \t-]?[2-9]\d{2,3}[ \t-]?\d{4}(?!\d)")
_NANP = re.compile(r"(?<![\d+])(?:\+1[ \t.-]?|1[ .-])?"
                   r"(?:\([2-9]\d{2}\) ?[2-9]\d{2}[ .-]?\d{4}|[2-9]\d{2}([ .-])[2-9]\d{2}\1\d{4})(?![\d-])")
_INTL = re.compile(r"(?<![\d+])\+[1-9][\d \t().-]{5,22}\d")
_CN_ID18 = re.compile(r"(?<!\d)\d{3}[ \t-]?\d{3}[ \t-]?\d{4}[ \t-]?\d{4}[ \t-]?\d{3}[\dXx](?![\dXx])")
_CN_ID15 = re.compile(r"(?<!\d)\d{6}[ \t-]?\d{6}[ \t-]?\d{3}(?![\dXx])")
_NUM_RUN = re.compile(r"\d[\d \t.\r\n-]*")   # digits and what separates card groups; split in Python
_IPV4 = re.compile(r"(?<![\d.])\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![0-9A-Za-z:.%])[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:.]{2,45}(?:%[0-9A-Za-z]{1,16})?")
_EXPONENT = re.compile(r"[eE][+-]?\d")
_GROUP_AFTER = re.compile(r"[ .-]\d{4}(?!\d)")
_SEPARATORS = re.compile(r"[^\d+]+")


def _numeric_not_phone(t: str, a: int, b: int) -> bool:
    """A decimal (one dot the only separator: 139.69171100, +31.230416), a mantissa (+1.602e-19), degrees, or
    three groups of a longer printed number ("1234 0571 8765 4321": the separator it uses ties it to a digit
    group before it, or to a 4-digit group after it; an extension "010-62345678-801" is still a phone)."""
    seps = [s for s in _SEPARATORS.findall(t[a:b]) if s]
    if seps == ["."]:
        return True
    tail = t[b:b + 8]
    if _EXPONENT.match(tail) or tail.startswith("°"):
        return True
    own = set("".join(seps)) & set(" .-")
    head = t[max(0, a - 2):a]
    return bool(own) and ((len(head) == 2 and head[0].isdigit() and head[1] in own and t[a].isdigit())
                          or (_GROUP_AFTER.match(tail) is not None and tail[0] in own))


def _phones(t: str):
    for m in _CN_MOBILE.finditer(t):
        s = m.group(0)
        base = 0.9 if s[0] in "+0(" else 0.85 if len(s) > 11 else 0.75
        yield m.start(), m.end(), digits(s)[-11:], base
    for m in _CN_LANDLINE.finditer(t):
        s = m.group(0)
        d = digits(s)
        d = "0" + d[2:].lstrip("0") if s[0] == "+" or s.startswith("0086") else d
        spaced = any(c in s for c in " \t-()")
        yield m.start(), m.end(), d, 0.8 if spaced else 0.45
    for m in _NANP.finditer(t):
        s = m.group(0)
        d = digits(s)[-10:]
        sep = "(" if "(" in s else m.group(1)
        base = {"(": 0.85, "-": 0.8, ".": 0.7}.get(sep, 0.45) + (0.1 if s[0] in "+1" else 0)
        yield m.start(), m.end(), "+1" + d, base
    for m in _INTL.finditer(t):
        a, b = m.span()
        d = digits(m.group(0))
        if 8 <= len(d) <= 15:
            yield a, b, "+" + (d[2:] if d.startswith("86") and len(d) == 13 else d), 0.8


def _ids(t: str):
    for m in _CN_ID18.finditer(t):
        value = re.sub(r"[ \t-]", "", m.group(0)).upper()
        if cn_id_ok(value):
            yield m.start(), m.end(), value, 0.95
    for m in _CN_ID15.finditer(t):
        value = digits(m.group(0))
        if cn_id15_ok(value):
            yield m.start(), m.end(), value, 0.4


_CARD_LAYOUTS = ((4, 6, 5), (4, 6, 4), (6, 13))


def _card_layout_ok(lengths: list[int]) -> bool:
    """How cards are printed: whole, in fours (the last group shorter: 4-4-4-4-3, 4-4-4-1), Amex 4-6-5, Diners
    4-6-4, or 6-13. A table of numbers ("123 4567 890 ...") is not a card even when a window passes Luhn."""
    return (len(lengths) == 1 or tuple(lengths) in _CARD_LAYOUTS
            or (all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 4))


def _sep_kind(s: str) -> str:
    """What joins two digit groups: " ", "-", ".", a line break "\\n", or "" when nothing does."""
    if s in (" ", "\t", "  ", "-", "."):
        return s.replace("\t", " ").replace("  ", " ")
    return "\n" if s.strip(" \t") in ("\n", "\r\n") else ""


def _cards(t: str):
    """Cards are written whole or in groups ("4111 1111 1111 1111"); a run of groups may hold a card plus more
    (an expiry, a CVV), so try windows of whole groups, longest first. Groups in a window are joined by one kind
    of separator, and one line break may stand in for any of them (a card wrapped at the end of a line)."""
    for run in _NUM_RUN.finditer(t):
        s = run.group(0)
        if len(s) < 13:
            continue
        groups = [(g.start() + run.start(), g.end() + run.start()) for g in re.finditer(r"\d+", s)]
        seps = [_sep_kind(t[groups[k][1]:groups[k + 1][0]]) for k in range(len(groups) - 1)]
        lengths = [b - a for a, b in groups]
        i = 0
        while i < len(groups):
            found = _card_window(t, groups, lengths, seps, i)
            if found:
                yield found[:4]
                i = found[4]
            else:
                i += 1


def _card_window(t, groups, lengths, seps, i):
    for j in range(min(len(groups), i + 6), i, -1):         # 19 digits span at most 5 groups (+1 wrapped)
        n = sum(lengths[i:j])
        if not 13 <= n <= 19:
            continue
        inner = seps[i:j - 1]
        if "" in inner or (i > 0 and seps[i - 1] == ".") or (j < len(groups) and seps[j - 1] == "."):
            continue                                          # broken run, or part of a longer dotted number
        kinds = set(inner) - {"\n"}
        if len(kinds) > 1 or inner.count("\n") > 1:
            continue
        window = lengths[i:j]
        merged = [window[0]]                                  # the groups with the line break closed up
        for k, sep in enumerate(inner):
            if sep == "\n":
                merged[-1] += window[k + 1]
            else:
                merged.append(window[k + 1])
        if not (_card_layout_ok(window) or _card_layout_ok(merged)):
            continue
        number = "".join(t[a:b] for a, b in groups[i:j])
        if card_network_ok(number) and luhn_ok(number):
            base = 0.7 if "\n" in inner else 0.75 if not inner or "." in kinds else 0.9
            return groups[i][0], groups[j - 1][1], number, base, j
    return None


def _ips(t: str):
    for m in _IPV4.finditer(t):
        try:
            yield m.start(), m.end(), str(ipaddress.IPv4Address(m.group(0))), 0.75
        except ValueError:
            continue
    for m in _IPV6.finditer(t):
        s = m.group(0)
        if s.endswith(".") or (s.endswith(":") and not s.endswith("::")):
            s = s[:-1]
        if sum(bool(g) for g in re.split(r"[:%]", s)) < 2 or not re.search(r"\d", s):
            continue  # "a::b", "::1" and C++ "std::" are not someone's address
        try:
            yield m.start(), m.start() + len(s), str(ipaddress.IPv6Address(s)), 0.85
        except ValueError:
            continue


# E-mail: a flat run of local-part characters, "@", a flat run of domain characters, cut and checked in Python.
_EMAIL = re.compile(r"[\w.%+-]{1,64}@(?=([\w.-]{1,253}))")   # the domain is looked at, not consumed: the
# next address may start inside this run ("li@example.com请联系zhang.san@qq.com")
# Obfuscated "@" and ".": [at] (at) {at} <at> [@] / 艾特 / " at " and the same for dot (and 点); the form
# decides the base score, lowest for the plain words.
_OBFUSCATED = re.compile(
    r"(?P<bat>[ \t]{0,3}[\[({<][ \t]{0,2}(?:at|@)[ \t]{0,2}[\])}>][ \t]{0,3})"
    r"|(?P<bdot>[ \t]{0,3}[\[({<][ \t]{0,2}(?:dot|\.)[ \t]{0,2}[\])}>][ \t]{0,3})"
    r"|(?<=[a-z0-9])(?P<zat>[ \t]{0,2}艾特[ \t]{0,2})(?=[a-z0-9])"
    r"|(?<=[a-z0-9])(?P<zdot>[ \t]{0,2}点[ \t]{0,2})(?=[a-z])"
    r"|(?<=[a-z0-9])(?P<wat>[ \t]{1,3}at[ \t]{1,3})(?=[a-z0-9])"
    r"|(?<=[a-z0-9])(?P<wdot>[ \t]{1,3}dot[ \t]{1,3})(?=[a-z0-9])", re.I)
_OBFUSCATED_BASE = {"b": 0.85, "z": 0.8, "w": 0.3}
_IDN_TLDS = ("中国", "中國", "公司", "网络", "網絡", "在线", "集团", "网址", "商城", "香港", "台湾", "台灣",
             "新加坡", "рф", "онлайн", "сайт", "みんな", "コム", "닷컴", "한국")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_SCRIPT_SWITCH = re.compile(r"[A-Za-z0-9][\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]"
                            r"|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af][A-Za-z0-9]")
_LEAD_IN = re.compile(r".*(?:邮箱|邮件|地址|是|为|給|给|到|至|发|向)")


def _deobfuscate(t: str) -> tuple[str, list[int], list[str]]:
    """The text with obfuscated at/dot tokens replaced by "@"/"."; for each character its index in `t` and
    "" for a plain character or the form letter (b, z, w) of the token it replaces."""
    out, index, form, pos = [], [], [], 0
    for m in _OBFUSCATED.finditer(t):
        out.append(t[pos:m.start()])
        index.extend(range(pos, m.start()))
        form.extend([""] * (m.start() - pos))
        out.append("@" if m.lastgroup.endswith("at") else ".")
        index.append(m.start())
        form.append(m.lastgroup[0])
        pos = m.end()
    out.append(t[pos:])
    index.extend(range(pos, len(t) + 1))
    form.extend([""] * (len(t) - pos))
    return "".join(out), index, form


def _local_part(local: str) -> int:
    """How many leading characters of a local-part run are not the address: Chinese words glued in front
    ("联系我josé" -> "josé", "我的邮箱是用户" -> "用户") and leading dots."""
    cut = 0
    han = list(_CJK.finditer(local))
    if han and han[-1].end() < len(local):
        cut = han[-1].end()
    elif han:
        lead = _LEAD_IN.match(local)
        cut = lead.end() if lead and lead.end() < len(local) else 0
    while cut < len(local) and local[cut] == ".":
        cut += 1
    return cut


def _domain_length(d: str) -> int:
    """How many characters of a domain run are the domain: labels checked (IDNA for non-ASCII ones), the
    top-level one letters only, cut where Chinese text runs on ("example.com谢谢", "例子.公司谢谢"); 0 if none."""
    switch = _SCRIPT_SWITCH.search(d)
    labels = d[:switch.start() + 1 if switch else len(d)].split(".")
    for n in range(len(labels), 1, -1):
        *head, last = labels[:n]
        m = re.match(r"[A-Za-z]{2,24}", last)
        if m and (m.end() == len(last) or not last[m.end()].isascii()):
            tld = m.group(0)
        else:
            tld = next((x for x in _IDN_TLDS if last.startswith(x)), "")
        if tld and all(_label_ok(x) for x in head):
            return sum(len(x) + 1 for x in head) + len(tld)
    return 0


def _label_ok(label: str) -> bool:
    if not 0 < len(label) <= 63 or "_" in label or label[0] == "-" or label[-1] == "-":
        return False
    if label.isascii():
        return True
    try:
        label.encode("idna")
    except UnicodeError:
        return False
    return True


def _emails(t: str):
    if "@" not in t and not _OBFUSCATED.search(t):
        return
    d, index, form = _deobfuscate(t)
    for m in _EMAIL.finditer(d):
        local, domain = m.group(0)[:-1], m.group(1)
        a = m.start() + _local_part(local)
        n = _domain_length(domain)
        if a == m.start() + len(local) or not n:
            continue
        b = m.start() + len(local) + 1 + n
        forms = set(form[a:b]) - {""}
        base = min((_OBFUSCATED_BASE[f] for f in forms), default=0.95 if d[a:b].isascii() else 0.9)
        value = d[a:b].lower()
        yield index[a], index[b - 1] + 1, value, base


_RECOGNIZERS = {"email": _emails, "phone": _phones, "id": _ids, "card": _cards, "ip": _ips}
_NUMERIC = frozenset(("phone", "id", "card", "ip"))


# -- public API ----------------------------------------------------------------------------


def _fold(text: str) -> tuple[str, list[int]]:
    """The folded text and, for each of its characters, the index of the original character."""
    if text.isascii():
        return text, list(range(len(text)))
    out, index = [], []
    for i, ch in enumerate(text):
        # A full-width colon is Chinese punctuation, not part of an address: "IPv6：fe80::1" is not "6:fe80::1".
        for c in ch if ch == "：" else unicodedata.normalize("NFKC", ch).translate(FOLD_TABLE):
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


def _score(folded: str, low: str, kind: str, a: int, b: int, base: float) -> float:
    if kind == "phone" and _numeric_not_phone(folded, a, b):
        return 0.0
    score = base + _context(low, a, b, kind)
    if kind in _NUMERIC and _glued(folded, a, b):
        score -= _GLUED
    return round(min(1.0, max(0.0, score)), 2)


def find_pii(text: str, kinds=None, threshold: float = THRESHOLD) -> list[Entity]:
    """Personal data in `text` scoring at least `threshold`, in order, without overlaps (spans index the
    original text). threshold=0 lists every candidate that survived its checks, with its score."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    kinds = _check_kinds(kinds)
    folded, index = _fold(text)
    low = folded.translate(_LOWER)
    candidates = []
    for kind in kinds:
        for seq, (a, b, value, base) in enumerate(_RECOGNIZERS[kind](folded)):
            score = _score(folded, low, kind, a, b, base)
            if score >= threshold and (threshold > 0 or score > 0):
                candidates.append((score, -_PRIORITY.index(kind), -seq, b - a, a, b, kind, value))
    # Highest score first; on a tie the kind with priority, then the more specific recognizer (each yields its
    # own candidates before the looser ones: a Chinese mobile before the same digits as "+86 …"), then longer.
    candidates.sort(reverse=True)
    taken = bytearray(len(folded))
    found = []
    for score, _, _, _, a, b, kind, value in candidates:
        if not any(taken[a:b]):
            taken[a:b] = b"\1" * (b - a)
            found.append(Entity(kind, index[a], index[b - 1] + 1, value, score=score))
    return sorted(found, key=lambda e: e.start)


def redact(text: str, kinds=None, threshold: float = THRESHOLD) -> Redaction:
    """Replace personal data with [EMAIL_1], [PHONE_1], [ID_1], [CARD_1], [IP_1] … placeholders.

    The same value gets the same placeholder; a placeholder that already appears in the text is
    skipped, so `restore` never replaces words the user wrote.
    """
    entities = find_pii(text, kinds, threshold)
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
