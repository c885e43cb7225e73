"""Text normalisation that defeats simple evasions before the moderation lexicon looks at a text.

    normalize("Ｉ will K\\u200bILL you")   -> "i will kill you"     (full-width, zero-width space)
    normalize("i will k i l l you")         -> "i will kill you"
    variants("I will k1ll y0u")              -> ["i will k1ll y0u", "i will kill you"]
    normalize("我要殺了你")                   -> "我要杀了你"      (traditional -> simplified, if opencc is installed)

Steps: NFKC (full-width letters and digits, compatibility forms), zero-width characters removed,
look-alike Cyrillic/Greek letters and typographic dashes/quotes folded to ASCII, case folded,
traditional Chinese converted to simplified, spaced-out letters ("k i l l", "k.i.l.l") joined,
separators inside Chinese words ("杀 了 你", "自*杀") removed. Leetspeak (1→i 0→o 3→e 4→a 5→s 7→t
@→a $→s) is decoded in a second variant only, so that "12 year old" or "ak-47" keep their digits in
the first; the lexicon is matched against both.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from muse.errors import MuseError

# Characters that render as nothing and are used to split words invisibly.
_INVISIBLE = "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad\u180e\u034f\u061c"
# Cyrillic and Greek letters that look like Latin ones (the common homoglyph evasions), and the
# dashes and quotes NFKC leaves alone.
_FOLD = {
    **dict.fromkeys(map(ord, _INVISIBLE)),
    **{ord(k): v for k, v in zip("аеорсухіјѕԁӏАЕОРСУХІЈЅΑΒΕΗΙΚΜΝΟΡΤΥΧαοικνρτυχ",
                                 "aeopcyxijsdlAEOPCYXIJSABEHIKMNOPTYXaoikvptux")},
    **dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63"), "-"),
    **dict.fromkeys(map(ord, "\u2018\u2019\u201a\u201b\u2032\u00b4`"), "'"),
    **dict.fromkeys(map(ord, "\u201c\u201d\u201e\u201f\u2033"), '"'),
}
FOLD_TABLE = str.maketrans(_FOLD)

HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# Three or more single letters separated by one separator each: "k i l l", "k.i.l.l", "k-i-l-l".
_SPACED = re.compile(r"(?<![a-z0-9])(?:[a-z][ .\-_*·|]){2,}[a-z](?![a-z0-9])")
_SPACED_LEET = re.compile(r"(?<![a-z0-9@$])(?:[a-z0-9@$][ .\-_*·|]){2,}[a-z0-9@$](?![a-z0-9@$])")
_SEPARATORS = re.compile(r"[ .\-_*·|]")
# Separators between two Chinese characters: "杀 了 你", "自*杀", "毒.品".
_HAN_GAP = re.compile(f"(?<=[{HAN}])[\\s.\\-_*·|/\\\\~,]+(?=[{HAN}])")
_SPACES = re.compile(r"\s+")
# A word that may be written in leetspeak: letters, digits and @ $ ("k1ll", "$uicide", "h@te").
_LEET_WORD = re.compile(r"[a-z0-9@$]+(?:!+[a-z0-9@$]+)*")
_LEET_TABLE = str.maketrans("013457@$!", "oieastasi")


class FoldingTableError(MuseError):
    """opencc is installed but its traditional→simplified table cannot be loaded."""


@functools.lru_cache(maxsize=1)
def _t2s():
    """opencc's traditional→simplified converter, or None when opencc is not installed (it is optional).

    Installed but broken is a FoldingTableError, not None: carrying on without the table would let
    "殺" through where "杀" is caught, and nobody would know moderation had weakened."""
    try:
        import opencc
    except ImportError:
        return None
    try:
        return opencc.OpenCC("t2s").convert
    # a missing or unreadable table file (OSError), a corrupt one (json: ValueError), the C++ binding's failure
    except (OSError, ValueError, RuntimeError) as e:
        raise FoldingTableError(
            f"opencc is installed but cannot load its traditional→simplified table ({type(e).__name__}: {e}), "
            "which moderation needs to catch traditional Chinese. Reinstall it (`pip install --force-reinstall "
            "opencc-python-reimplemented`), or uninstall it to moderate without that folding.") from e


def fold(text: str) -> str:
    """NFKC, invisible characters dropped, look-alikes/dashes/quotes folded, lower case."""
    return unicodedata.normalize("NFKC", text).translate(FOLD_TABLE).casefold()


def _join_spaced(text: str, pattern: re.Pattern) -> str:
    def join(m: re.Match) -> str:
        run = m.group(0)
        return _SEPARATORS.sub("", run) if any(c.isalpha() for c in run) else run

    return pattern.sub(join, text)


def _leet(text: str) -> str:
    def decode(m: re.Match) -> str:
        word = m.group(0)
        has_letter = any("a" <= c <= "z" for c in word)
        return word.translate(_LEET_TABLE) if has_letter and not word.isalpha() else word

    return _LEET_WORD.sub(decode, text)


def normalize(text: str) -> str:
    """The text as the lexicon sees it (without leetspeak decoding)."""
    t = fold(text)
    convert = _t2s()
    if convert is not None and re.search(f"[{HAN}]", t):
        t = convert(t)
    t = _HAN_GAP.sub("", t)
    t = _join_spaced(t, _SPACED)
    return _SPACES.sub(" ", t).strip()


def variants(text: str) -> list[str]:
    """`normalize(text)`, plus the leetspeak-decoded form when it differs."""
    plain = normalize(text)
    leet = _SPACES.sub(" ", _leet(_join_spaced(plain, _SPACED_LEET)))
    return [plain] if leet == plain else [plain, leet]
