"""Output gates (muse.apps.gates) on fixed strings, English and Chinese, and the writer's retries."""

from __future__ import annotations

from muse.apps import gates
from muse.apps.gates import check, repair
from muse.text import numbers


def gate_names(problems) -> set[str]:
    return {p.gate for p in problems}


# -- invented facts -------------------------------------------------------------------------

def test_amounts_compare_by_value_across_scripts():
    src = "项目预算为30万元，2024年3月启动。"
    assert "30,000" in gates.summary(check("translate", src, "The project budget is $30,000, starting in March 2024."))
    assert check("translate", src, "The project budget is 300,000 yuan, starting in March 2024.") == []
    assert check("translate", "The budget is 300,000 yuan.", "预算是三十万元。") == []
    assert check("translate", "The budget is 300,000 yuan.", "预算为300000元。") == []


def test_chinese_numerals_and_scales():
    vals = numbers("三百人，两千五百元，一万二千步，30万元，1.2万，5k")
    assert {300, 2500, 12000, 300_000, 12_000, 5000} <= set(vals)
    assert 1 not in numbers("我们一起统一意见")  # 一起, 统一: words, not numbers
    assert set(numbers("4.2 million dollars")) == {4_200_000}  # a decimal at a line's start is no list marker
    assert set(numbers("3. Buy milk\n1.第一步")) == set()


def test_an_added_year_or_number_is_flagged():
    p = check("rewrite", "The fair opens on 6 May.", "The fair opens on 6 May 2025.")
    assert gate_names(p) == {"invented"} and "2025" in p[0].message
    assert check("rewrite", "we need three chairs by 5pm", "We need 3 chairs by 17:00.") == []  # words and 24 h


def test_a_number_the_output_lost_is_flagged_in_any_form():
    src = "yo, rent is due on the 5th, its 1,350 this month. Price 39 dollars from 1 September."
    p = check("rewrite", src, "Rent is due on the 5th. The price is $39 from September 1.")
    assert gate_names(p) == {"dropped"} and "1,350" in p[0].message
    assert check("rewrite", src, "Rent of $1350 is due on the 5th; from September 1 the price is $39.") == []
    assert "dropped" in gate_names(check("translate", "预算为30万元。", "The budget is large."))
    # shortening drops words, not facts: a shortened text that loses its amounts failed
    p = check("shorten", src, "Rent, 1,350, is due on the 5th.")
    assert gate_names(p) == {"dropped"} and "39" in p[0].message
    assert "dropped" not in gate_names(check("summarize", src, "Rent is due on the 5th."))  # a summary may drop


def test_a_name_the_output_lost_is_flagged_in_the_same_language_only():
    src = "Please tell Mr Grant that the meeting with Lisbon Motors moved to the hall."
    p = check("polish", src, "Please tell Mr. Grant that the meeting moved to the hall.")
    assert gate_names(p) == {"dropped"} and "Lisbon" in p[0].message and "Grant" not in p[0].message
    assert check("polish", src, "Please tell Mr. Grant that the Lisbon Motors meeting has moved to the hall.") == []
    zh = check("rewrite", "请转告张经理，会议改在人民路开。", "请转告一下，会议改在人民路举行。")
    assert gate_names(zh) == {"dropped"} and "张经理" in zh[0].message
    assert "dropped" not in gate_names(check("translate", src, "请告诉格兰特先生，与里斯本汽车的会议改到大厅了。"))


def test_the_retry_note_names_the_lost_number():
    from muse.apps.writer import _repair_note, get_action

    note = _repair_note(get_action("rewrite"), "en", "x", check("rewrite", "It costs 1,350.", "It is costly."))
    assert note == "Keep every name, number, date and amount of the text, including 1,350."
    both = check("rewrite", "Ask Ana Lopes: it costs 1,350.", "Ask her: it is costly.")
    assert _repair_note(get_action("rewrite"), "en", "x", both) == \
        "Keep every name, number, date and amount of the text, including 1,350, Ana, Lopes."


def test_of_two_failing_attempts_the_one_that_lost_fewer_facts_is_kept():
    from muse.apps.writer import _severity

    src = "On 3 May, 40 staff met in Leeds; 12 left early and 7 stayed until 9 p.m."
    lost_four = check("shorten", src, "On 3 May, staff met in Leeds.")
    lost_one = check("shorten", src, "On 3 May, 40 staff met in Leeds; 12 left early and 7 stayed.")
    # both fail with one "dropped" problem each, so only the facts inside them tell them apart
    assert [p.gate for p in lost_four if p.gate == "dropped"] == ["dropped"]
    assert [p.gate for p in lost_one if p.gate == "dropped"] == ["dropped"]
    assert len(lost_four[0].items) > len(lost_one[0].items) == 1
    assert _severity(lost_one) < _severity(lost_four)


def test_a_shortening_too_long_or_too_short_gets_the_matching_retry_note():
    from muse.apps.writer import _repair_note, get_action

    src = " ".join(f"w{a}{b}" for a in "abcdefgh" for b in "xyzuv")  # 40 words, no numbers
    shorten = get_action("shorten")
    assert _repair_note(shorten, "en", src, check("shorten", src, src)) == "Use at most 24 words."
    assert _repair_note(shorten, "en", src, check("shorten", src, "wax wby")) == \
        "Keep every key point and fact, in at least 16 words."


def test_an_invented_name_is_flagged_but_a_capitalised_day_is_not():
    src = "hey guys meeting moved to fri cuz boss is sick"
    assert check("rewrite", src, "The meeting has moved to Friday because the boss is sick.") == []
    p = check("rewrite", src, "The meeting has moved to Friday in Cancun because the boss is sick.")
    assert "Cancun" in gates.summary(p)
    p = check("polish", "请联系王经理。", "请联系李经理。")
    assert "李经理" in gates.summary(p)
    assert check("polish", "请联系王经理，地点在人民路。", "请您联系王经理，地点在人民路。") == []


def test_a_corrected_spelling_or_a_code_is_not_a_new_name():
    src = "its deducted from ur salary in Feburary. ur order ref is BK-5531, ask Hanover st"
    out = "It is deducted from your salary in February. Your order reference is BK-5531; ask Hanover St."
    assert check("polish", src, out) == []  # before: February invented, Feburary dropped, BK both
    p = check("polish", src, out.replace("Hanover", "Hannibal"))  # a different name still counts
    assert "Hannibal" in gates.summary(p) and "Hanover" in gates.summary(p)
    assert gates._misspelt("febuary", {"february"}) and gates._misspelt("recieve", {"receive"})
    assert not gates._misspelt("hannibal", {"hanover"}) and not gates._misspelt("mary", {"mark"})


def test_translation_across_scripts_checks_numbers_not_names():
    assert check("translate", "王经理3点到。", "Manager Wang arrives at 3.") == []


# -- repetition and preambles -------------------------------------------------------------------

def test_a_title_line_repeated_13_times_is_flagged_and_repaired():
    out = "Team Lunch on Friday\n" * 13 + "Join us at noon."
    p = check("rewrite", "team lunch on friday, join us at noon", out)
    assert gate_names(p) == {"repetition"} and "13 times" in p[0].message
    fixed = repair("rewrite", "team lunch on friday, join us at noon", out)
    assert fixed == "Team Lunch on Friday\nJoin us at noon."
    assert check("rewrite", "team lunch on friday, join us at noon", fixed) == []


def test_near_repeats_and_chinese_loops():
    out = "We will meet on Friday at noon. We will meet on Friday at noon!"
    assert gate_names(check("rewrite", "meet friday noon", out)) == {"repetition"}
    assert gate_names(check("polish", "周五中午聚餐。", "周五中午大家一起聚餐吧。" * 3)) == {"repetition"}
    assert check("polish", "Go. Go.", "Go. Go.") == []  # too short to count


def test_a_leftover_label_is_flagged_anywhere():
    src = "The library is closed on Monday for repairs, and it reopens on Tuesday morning at nine."
    p = check("shorten", src, "Closed Monday, reopens Tuesday.\nThe short answer is:")
    assert gate_names(p) == {"preamble"}
    assert gate_names(check("polish", "明天开会。", "以下是润色后的文字：\n明天开会。")) == {"preamble"}
    assert repair("shorten", src, "Closed Monday, reopens Tuesday.\nThe short answer is:") == "Closed Monday, reopens Tuesday."


# -- length and shape ---------------------------------------------------------------------------

def test_length_targets():
    words = [f"w{a}{b}" for a in "abcdefgh" for b in "xyzuv"]  # 40 words, no numbers
    src = " ".join(words)
    assert gate_names(check("shorten", src, " ".join(words[:36]))) == {"length"}  # 10 % cut
    assert check("shorten", src, " ".join(words[:20])) == []
    assert gate_names(check("shorten", src, " ".join(words[:3]))) == {"length"}  # a headline, not the key points
    assert gate_names(check("expand", src, src)) == {"length"}
    assert gate_names(check("summarize", src, src, length=10)) == {"length"}
    assert gate_names(check("shorten", "今天下午三点在二楼会议室开会，请大家准时参加，不要迟到。", "今天下午三点在二楼会议室开会，请大家准时参加。")) == {"length"}


def test_a_shortening_that_copied_the_text_loses_its_plain_sentences_not_its_facts():
    src = ("The library is closed on Monday for repairs. We are sorry for the trouble. It reopens on Tuesday "
           "at 9 am with Ms Lee at the desk. Thank you for your patience and understanding, as always.")
    fixed = repair("shorten", src, src)
    assert fixed == ("The library is closed on Monday for repairs. We are sorry for the trouble. It reopens on "
                     "Tuesday at 9 am with Ms Lee at the desk.")  # the closing formula went first
    assert check("shorten", src, fixed) == []
    zh = "下周三下午两点开会。会议在二楼会议室。请准时参加。会后有茶点。"
    assert repair("shorten", zh, zh) == "下周三下午两点开会。会议在二楼会议室。"
    facts = "周三下午2点开会。地点在3楼301室。带上2份报告。"
    assert repair("shorten", facts, facts) == facts  # every sentence holds a fact: left for the gates to flag
    assert gate_names(check("shorten", facts, facts)) == {"length"}


def test_titles_must_be_distinct_short_lines():
    src = "The town opens a new library with a rooftop garden."
    assert check("titles", src, "A New Library\nRooftop Reading\nBooks and Gardens\nThe Town Reads\nOpen Doors") == []
    same = "\n".join(["A New Library"] * 4 + ["Open Doors"])
    assert "the same title" in gates.summary(check("titles", src, same))
    prose = "The town has opened a new library. It has a rooftop garden where people can read."
    assert gate_names(check("titles", src, prose)) == {"shape"}
    assert gate_names(check("titles", "新图书馆开放。", "新馆开放\n新馆开放\n新馆开放\n屋顶花园\n阅读之城")) == {"shape"}


def test_outline_must_be_a_list():
    src = "The plan has three parts: budget, hiring and a launch in May."
    assert check("outline", src, "- Budget\n- Hiring\n- Launch in May") == []
    assert check("outline", src, "Plan\n1. Budget\n2. Hiring\n3. Launch in May") == []
    assert gate_names(check("outline", src, "The plan covers the budget. Then hiring. Then a launch in May.")) == {"shape"}
    assert check("outline", "计划包括预算、招聘和五月上线。", "一、预算\n二、招聘\n三、五月上线") == []


def test_commentary_and_unchanged_outputs_fail_their_gates():
    text = "hey guys, the meeting is moved to friday cuz the room is booked"
    talk = "I've made these adjustments: 1. Capitalised the first word. 2. Replaced 'cuz'."
    assert "commentary" in [p.gate for p in check("rewrite", text, talk)]
    assert [p.gate for p in check("rewrite", text, text + "\n")] == ["unchanged"]
    assert "unchanged" not in [p.gate for p in check("polish", "The meeting is on Friday.", "The meeting is on Friday.")]
    assert [p.gate for p in check("translate", "今天天气很好。", "今天天气很好。")] == ["unchanged"]
    assert check("rewrite", text, "Hi all, the meeting has moved to Friday because the room is booked.") == []
    assert "commentary" in [p.gate for p in check("polish", "我觉得这个方案可以", "我对原文做了以下修改：把“可以”改成了“可行”。")]


def test_chinese_names_a_translation_into_english_left_are_written_in_pinyin():
    source = "她在广州住了十年，去年搬到厦门，今年又搬到深圳。"
    out = repair("translate", source, "She lived in Guangzhou for ten years，moved to厦门 last year and to 深圳 this year。",
                 to="en")
    assert out == "She lived in Guangzhou for ten years, moved to Xiamen last year and to Shenzhen this year."
    # a clause left untranslated is not turned into one long pinyin word
    assert repair("translate", source, "She said 只能现场排队了吧 then.", to="fr") == "She said 只能现场排队了吧 then."
    # into a language written in Chinese characters, or when the output is still Chinese: as it was
    assert repair("translate", source, "彼女は厦门に引っ越した。", to="ja") == "彼女は厦门に引っ越した。"
    assert repair("translate", "She moved to Xiamen.", "她搬到了厦门。", to="zh") == "她搬到了厦门。"
    assert repair("rewrite", source, "She moved to厦门.") == "She moved to厦门."


def test_a_translation_in_the_wrong_script_is_flagged():
    def language_problems(source, output, to):
        return [p for p in check("translate", source, output, to=to) if p.gate == "language"]

    en, zh = "The train to Beijing leaves at eight tomorrow.", "明天早上八点的高铁从杭州开往北京。"
    assert language_problems(en, "The train to Beijing leaves at 8 tomorrow.", "zh")  # into Chinese, no Chinese
    assert not language_problems(en, "开往北京的火车明天八点出发。", "zh")
    assert not language_problems(en, "北京行きの電車は明日8時に出発します。", "ja")
    assert language_problems(en, "开往北京的火车明天八点出发。", "ko")  # Chinese is no Korean
    assert not language_problems(en, "베이징행 기차는 내일 8시에 출발합니다.", "ko")
    assert language_problems(zh, "明天早上八点的高铁从杭州开往北京，很快。", "en")  # still Chinese
    assert not language_problems(zh, "The high-speed train from Hangzhou to Beijing leaves at 8.", "en")
    # Latin-script languages are not told apart: English "into French" passes this gate
    assert not language_problems(en, "The train to Beijing leaves at 8 tomorrow.", "fr")
    assert not language_problems(en, "The train to Beijing leaves at 8 tomorrow.", None)
