"""PII detection (issue 12, item 6): the named misses and false alarms, context and scores, the validators,
redaction that leaves the rest of the text alone, precision/recall on the labelled sets, and hostile input.

The older PII tests (every kind, restore round trips, the CLI) are in tests/test_safety.py.
"""

from __future__ import annotations

import random

import pytest

from muse.safety.pii import THRESHOLD, card_network_ok, cn_id15_ok, cn_id_ok, find_pii, luhn_ok, redact, restore
from muse.safety.pii_eval import evaluate, load_split


def found(text: str, **kw) -> list[tuple[str, str]]:
    """(kind, the text the finding covers) for each finding."""
    return [(e.kind, text[e.start:e.end]) for e in find_pii(text, **kw)]


def score(text: str, kind: str) -> float:
    return max((e.score for e in find_pii(text, threshold=0) if e.kind == kind), default=0.0)


# -- the misses named in the issue ----------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # an 18-character ID written 3-3-4-4-4, 6-4-4-4 and 6-8-4, with spaces or dashes
    ("ID 110 105 1949 1231 002X", [("id", "110 105 1949 1231 002X")]),
    ("身份证号 110105 1949 1231 002X。", [("id", "110105 1949 1231 002X")]),
    ("证件 110105-19491231-002x", [("id", "110105-19491231-002x")]),
    # 15-digit legacy IDs with an ID word nearby
    ("身份证 110105491231002", [("id", "110105491231002")]),
    ("old ID card 440524800101001.", [("id", "440524800101001")]),
    # Chinese landlines
    ("座机 010-62345678，周末不在", [("phone", "010-62345678")]),
    ("上海 (021) 6123 4567", [("phone", "(021) 6123 4567")]),
    ("上海（021）6123 4567", [("phone", "（021）6123 4567")]),                     # full-width brackets
    ("深圳 0755-26781234 / 0571 8765 4321", [("phone", "0755-26781234"), ("phone", "0571 8765 4321")]),
    ("Beijing +86 10 6275 1234", [("phone", "+86 10 6275 1234")]),
    # North-American numbers with dots
    ("phone 415.555.2671", [("phone", "415.555.2671")]),
    ("call 1-800-555-0199 or +1 (212) 555-0100", [("phone", "1-800-555-0199"), ("phone", "+1 (212) 555-0100")]),
    # non-ASCII e-mail addresses, whole
    ("Contact josé.garcía@example.com please", [("email", "josé.garcía@example.com")]),
    ("联系josé.garcía@example.com处理", [("email", "josé.garcía@example.com")]),
    ("邮箱：用户@例子.中国。", [("email", "用户@例子.中国")]),
    ("Write to zoë.müller@bücher.de.", [("email", "zoë.müller@bücher.de")]),
    # obfuscated e-mail addresses
    ("name [at] example [dot] com", [("email", "name [at] example [dot] com")]),
    ("send to first_last(at)company.io", [("email", "first_last(at)company.io")]),
    ("Reach alice{at}example{dot}net", [("email", "alice{at}example{dot}net")]),
    ("我的邮箱是liuyang艾特qq点com", [("email", "liuyang艾特qq点com")]),
    ("my email is bob at example dot com", [("email", "bob at example dot com")]),
    # cards split by a line break or dots
    ("卡号 6212 2612 3409\n8761", [("card", "6212 2612 3409\n8761")]),
    ("credit card 5432109876\n543212", [("card", "5432109876\n543212")]),
    ("card 4111.1111.1111.1111.", [("card", "4111.1111.1111.1111")]),
])
def test_issue_misses_are_found(text, expected):
    assert found(text) == expected


def test_non_ascii_email_does_not_leak_the_name():
    r = redact("Contact josé.garcía@example.com for Spanish clients")
    assert r.text == "Contact [EMAIL_1] for Spanish clients"
    assert "jos" not in r.text and "garc" not in r.text


def test_each_id_layout_has_the_same_value():
    values = {e.value for text in ("11010519491231002X", "110 105 1949 1231 002X", "110105 19491231 002x",
                                   "110105-1949-1231-002X") for e in find_pii(f"身份证 {text}")}
    assert values == {"11010519491231002X"}


# -- the false alarms named in the issue ---------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "version 1.2.3.4 is out",
    "Upgrade to v1.2.3.4 today",
    "版本 1.2.3.4 已上线",
    "Firmware 2.10.4.1 fixes the bug",
    "OID 1.3.6.1.4.1.311 and 1.2.3.4.5",                         # part of a longer dotted number
    "GPS 37.774929, -122.419416",
    "location: +40.7128,-74.0060",
    "坐标：北纬 31.230416，东经 121.473701",
    "lat +31.230416, lon +121.473701",
    "39.9042° N, 116.4074° E",
    "Tokyo is at 35.689487, 139.69171100",                        # 139.69171100 has a mobile's digits
    "charge +1.602e-19 C",
    "c = +2.99792458e8 m/s",
    "元电荷 1.602176634e-19 库仑",
    "I work at google.com these days",                            # "at" + a domain is not an address
    "look at this dot com bubble",
])
def test_issue_false_alarms_are_not_found(text):
    assert find_pii(text) == []
    assert redact(text).text == text


# -- context raises and lowers, scores and the threshold -------------------------------------------------

def test_context_words_move_the_score():
    assert score("电话 13800138000", "phone") > score("13800138000", "phone") > score("订单号 13800138000", "phone")
    assert score("server 10.0.0.1", "ip") > score("10.0.0.1", "ip") > score("version 10.0.0.1", "ip")
    card = "6228123456789018"
    assert luhn_ok(card) and score(f"卡号 {card}", "card") > score(card, "card") > score(f"订单号 {card}", "card")
    assert found(f"订单号 {card}") == [] and found(f"card {card}") == [("card", card)]
    # a 15-digit legacy ID has no check digit: it needs an ID word nearby
    assert found("110105491231002") == [] and found("身份证号码：110105491231002") == [("id", "110105491231002")]
    assert found("obfuscated: bob at example dot com") == []                    # plain words need an e-mail word
    # a keyword labels the value right after it, not one further on
    assert found("订单 2024-05-01 卡 4111111111111111") == [("card", "4111111111111111")]
    assert found("订单 2024-05-01 4111111111111111") == [("card", "4111111111111111")]


def test_letters_glued_to_digits_lower_the_score():
    assert found("SF13800138000") == [] and found("tel13800138000") == [("phone", "13800138000")]


def test_threshold_and_scores():
    text = "version 1.2.3.4 on server 10.0.0.1"
    assert [e.value for e in find_pii(text)] == ["10.0.0.1"]
    assert [e.value for e in find_pii(text, threshold=0)] == ["1.2.3.4", "10.0.0.1"]
    assert all(0 < e.score <= 1 for e in find_pii(text, threshold=0))
    assert all(e.score >= THRESHOLD for e in find_pii(text))
    assert [e.value for e in redact(text, threshold=0.2).entities] == ["1.2.3.4", "10.0.0.1"]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            find_pii(text, threshold=bad)


def test_overlaps_go_to_the_higher_score():
    # +86 138… is both a Chinese mobile and an international number: one finding, the mobile's value
    assert [(e.kind, e.value) for e in find_pii("call +86 138 0013 8000")] == [("phone", "13800138000")]
    # an 18-digit ID is not also a card or a phone
    assert [e.kind for e in find_pii("身份证 11010519491231002X")] == ["id"]


# -- validators ---------------------------------------------------------------------------------------------

def test_cn_id_checksum_date_and_province():
    assert cn_id_ok("11010519491231002X") and cn_id_ok("440524188001010014") and cn_id_ok("11010519491231002x")
    assert not cn_id_ok("110105194912310021")                   # wrong check character
    assert not cn_id_ok("11010519491331002X")                   # month 13 (and the check no longer fits)
    assert not cn_id_ok("99010519491231002X")                   # no province 99
    assert not cn_id_ok("1101051949123100")                     # too short


def test_cn_id15_needs_a_province_and_a_real_date():
    assert cn_id15_ok("110105491231002") and cn_id15_ok("440524800101001")
    assert not cn_id15_ok("110105490230002")                    # 1949-02-30
    assert not cn_id15_ok("202405011234567")                    # an order number: no province 20
    assert not cn_id15_ok("11010549123100")


@pytest.mark.parametrize("number, ok", [
    ("4111111111111111", True), ("5500005555555559", True), ("378282246310005", True), ("6011111111111117", True),
    ("3530111333300000", True), ("2221000000000009", True), ("6222021234567890128", True),
    ("3782822463100050", False),           # Amex is 15 digits
    ("1380013800012345", False),           # no network starts with 1
    ("9787111547426", False),              # an ISBN
])
def test_card_network_prefixes_and_lengths(number, ok):
    assert card_network_ok(number) == ok


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_card_checks_work_in_every_layout():
    good, bad = "4111111111111111", "4111111111111112"
    for number in (good, bad):
        groups = [number[i:i + 4] for i in range(0, 16, 4)]
        for layout in (" ".join(groups), "-".join(groups), ".".join(groups), " ".join(groups[:3]) + "\n" + groups[3],
                       number[:9] + "\n" + number[9:], number):
            assert [e.value for e in find_pii(f"card {layout} ok")] == ([good] if number == good else []), layout
    # one line break joins two pieces; a column of numbers is not a card
    assert find_pii("\n".join(groups)) == []


# -- redaction keeps the rest of the text ----------------------------------------------------------------------

def test_redaction_keeps_surrounding_text_intact():
    text = ("张三（身份证 110 105 1949 1231 002X）说：请打 010-62345678 或发邮件到 josé.garcía@example.com，"
            "卡号 4111.1111.1111.1111；version 1.2.3.4 on server 10.0.0.1. GPS 31.2304, 121.4737.")
    r = redact(text)
    assert r.text == ("张三（身份证 [ID_1]）说：请打 [PHONE_1] 或发邮件到 [EMAIL_1]，"
                      "卡号 [CARD_1]；version 1.2.3.4 on server [IP_1]. GPS 31.2304, 121.4737.")
    assert restore(r.text, r.mapping) == text
    # the text between findings is exactly the original text between their spans
    pieces = [text[:r.entities[0].start]] + [text[a.end:b.start] for a, b in zip(r.entities, r.entities[1:])] \
        + [text[r.entities[-1].end:]]
    rebuilt = pieces[0] + "".join(e.placeholder + p for e, p in zip(r.entities, pieces[1:]))
    assert rebuilt == r.text


def test_redaction_round_trips_on_random_mixtures_of_the_new_kinds():
    pieces = ["110 105 1949 1231 002X", "(021) 6123 4567", "415.555.2671", "josé.garcía@example.com",
              "name [at] example [dot] com", "4111.1111.1111.1111", "010-62345678", "10.0.0.1"]
    filler = ["你好，", "请联系", " and ", "谢谢。", " then ", "\n", " version 1.2.3 ", " GPS 31.2304, 121.4737 "]
    rng = random.Random(12)
    for _ in range(50):
        parts = rng.sample(pieces, 3)
        text = "".join(rng.choice(filler) + p for p in parts) + rng.choice(filler)
        r = redact(text)
        assert not any(p in r.text for p in parts), (text, r.text)
        assert len(r.mapping) == 3 and restore(r.text, r.mapping) == text


# -- the labelled sets ----------------------------------------------------------------------------------------------

def test_labelled_sets_are_separate_and_cover_both_languages_and_every_kind():
    dev, test = load_split("dev"), load_split("test")
    assert not {it["text"] for it in dev} & {it["text"] for it in test}
    for items in (dev, test):
        assert len(items) >= 60
        for lang in ("zh", "en"):
            mine = [it for it in items if it["lang"] == lang]
            assert sum(not it["spans"] for it in mine) >= 15                # hard negatives
            assert {s["kind"] for it in mine for s in it["spans"]} == {"email", "phone", "id", "card", "ip"}


# Held-out test set (written and committed before the detector changed, never tuned on). Measured with
# bench/pii.py: exact-span precision and recall 1.00 for zh (35 spans) and en (33 spans). The floors allow
# about one error each way, so that a broken detector fails here.
HELD_OUT_FLOOR = {"zh": (0.95, 0.95), "en": (0.95, 0.95)}


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_held_out_precision_and_recall(lang):
    table = evaluate(find_pii, load_split("test"))
    precision, recall = HELD_OUT_FLOOR[lang]
    exact = table[lang, "all"].exact
    assert exact.precision >= precision and exact.recall >= recall, (exact, precision, recall)


def test_dev_set_is_all_found():
    table = evaluate(find_pii, load_split("dev"))
    assert table["all", "all"].exact.f1 >= 0.97


# -- hostile input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "".join(random.Random(0).choice("0123456789.") for _ in range(1_000_000)),    # digits and dots
    "1." * 500_000,
    "4111 " * 200_000,
    "4111\n" * 200_000,
    "a@" * 500_000,
    "x [at] y [dot] " * 70_000,
    "ab:" * 330_000,
    "+1 " * 330_000,
    "电话1" * 330_000,
])
def test_hostile_input_is_linear(text):
    # Run, not timed: a pattern with catastrophic backtracking would not come back from a megabyte.
    # Every pattern is flat or a bounded repetition; the whole set runs in a few seconds.
    entities = find_pii(text)
    assert all(0 <= e.start < e.end <= len(text) for e in entities)


def test_cli_redact_threshold_and_scores():
    from typer.testing import CliRunner

    from muse.cli import app

    text = "version 1.2.3.4 on server 10.0.0.1"
    r = CliRunner().invoke(app, ["safety", "redact", text, "--scores"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == "version 1.2.3.4 on server [IP_1]"
    assert "[IP_1]" in r.stderr and "1.00" in r.stderr and "'10.0.0.1'" in r.stderr
    r = CliRunner().invoke(app, ["safety", "redact", text, "--threshold", "0.2"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == "version [IP_1] on server [IP_2]"
    assert CliRunner().invoke(app, ["safety", "redact", text, "--threshold", "2"]).exit_code == 2
