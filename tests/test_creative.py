"""Creative writing: form checks, repair, guided decoding, the retry loop, the create command."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import muse
from muse.api import Model
from muse.apps.creative import check_form, create, get_form, repair, syllables
from muse.apps.language import LanguageError
from tests.helpers import ScriptedLM

# Classic poems with their forms (Tang dynasty, public domain).
DENGGUANQUE = "白日依山尽，\n黄河入海流。\n欲穷千里目，\n更上一层楼。"  # 五言绝句
ZAOFA = "朝辞白帝彩云间，千里江陵一日还。\n两岸猿声啼不住，轻舟已过万重山。"  # 七言绝句, couplets per line
CHUNWANG = "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"  # 五律
OLD_POND = "An old silent pond\nA frog jumps into the pond\nSplash! Silence again."  # 5-7-5

# Dictionary syllable counts (Merriam-Webster hyphenation), the words haiku use most.
SYLLABLE_REFERENCE = {
    1: "the sky rain leaves snow frog pond dawn dew moon light night stone make breeze eyes rose whale "
       "jumped rained sea once where skies cried goes trees strength wind",
    2: "autumn blossom cherry silence water golden falling petals gentle maple hidden sunset over lonely "
       "movement careful whisper morning mountain river flower table little wanted faces roses horses "
       "branches alone ancient being flying seeing ocean poem quiet people purple summer winter shadow",
    3: "beautiful whispering area idea violin radio stadium period lavender butterfly memory family "
       "gentleness carefully dragonfly poetry tomorrow yesterday mystery animal wonderful delicate",
    4: "melancholy caterpillar invisible eternity ceremony",
    5: "imagination",
}


def test_syllable_counts_match_the_dictionary():
    wrong = [(w, syllables(w), n) for n, words in SYLLABLE_REFERENCE.items() for w in words.split()
             if syllables(w) != n]
    assert wrong == []
    assert [syllables(line) for line in OLD_POND.splitlines()] == [5, 7, 5]
    assert syllables("秋风送爽山") == 5 and syllables("café") == 2  # a Chinese character is a syllable


@pytest.mark.parametrize("text,form", [
    (DENGGUANQUE, "wujue"),
    ("白日依山尽，黄河入海流。\n\n欲穷千里目，更上一层楼。\n", "wujue"),  # couplets, blank lines
    ("白日依山尽, 黄河入海流. 欲穷千里目, 更上一层楼.", "wujue"),  # half-width punctuation, one line
    (ZAOFA, "qijue"),
    (CHUNWANG, "wulv"),
    (OLD_POND, "haiku"),
    ("\n  An old silent pond\n\nA frog jumps into the pond\n\nSplash! Silence again.\n", "haiku"),
    ("anything at all", "free"),
])
def test_check_form_accepts_conforming_poems(text, form):
    assert check_form(text, form) == []


def test_check_form_names_what_is_wrong():
    six = DENGGUANQUE.replace("黄河入海流", "黄河入大海流")
    assert check_form(six, "wujue") == ["line 2 '黄河入大海流' has 6 characters; it needs 5"]
    assert check_form(DENGGUANQUE, "qijue")[0] == "line 1 '白日依山尽' has 5 characters; it needs 7"
    assert check_form(CHUNWANG, "wujue") == ["8 lines; a 五言绝句 has 4"]
    titled = "《登鹳雀楼》\n" + DENGGUANQUE
    assert "5 lines; a 五言绝句 has 4" in check_form(titled, "wujue")
    assert check_form(DENGGUANQUE.replace("白日", "Hi"), "wujue") == [
        "line 1 'Hi依山尽' has characters that are not Chinese"]
    basho = "Autumn moonlight\na worm digs silently\ninto the chestnut"  # a 4-6-5 translation
    assert check_form(basho, "haiku") == ["line 1 'Autumn moonlight' has 4 syllables; it needs 5",
                                          "line 2 'a worm digs silently' has 6 syllables; it needs 7"]
    assert check_form("  \n", "haiku") == ["the poem is empty"]
    with pytest.raises(ValueError, match=r"form must be one of wujue \(五言绝句, 五绝\), qijue"):
        check_form(DENGGUANQUE, "sonnet")


@pytest.mark.parametrize("name,form", [
    ("五言绝句", "wujue"), ("五绝", "wujue"), ("五言絕句", "wujue"), ("七言绝句", "qijue"), ("七绝", "qijue"),
    ("五言律诗", "wulv"), ("五律", "wulv"), ("wulu", "wulv"), ("七言律诗", "qilv"), ("七律", "qilv"),
    ("俳句", "haiku"), ("Haiku", "haiku"), (" wujue ", "wujue"), ("自由诗", "free"), ("free", "free"),
])
def test_forms_have_their_chinese_names_too(name, form):
    assert get_form(name).name == form


def test_unknown_form_lists_the_names_in_both_scripts():
    with pytest.raises(ValueError) as e:
        get_form("sonnet")
    for shown in ("wujue (五言绝句, 五绝)", "qijue (七言绝句, 七绝)", "wulv (五言律诗, 五律)", "qilv (七言律诗, 七律)",
                  "haiku (俳句)", "free (自由诗)", "got 'sonnet'"):
        assert shown in str(e.value)


@pytest.mark.parametrize("reply,form,expected", [
    # a one-line 绝句 splits at its punctuation
    ("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "wujue", DENGGUANQUE),
    # preamble, markdown title and commentary are stripped
    ("好的，这是一首五言绝句：\n\n**《登鹳雀楼》**\n白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n\n"
     "这首诗写登高望远，寓意深刻。", "wujue", DENGGUANQUE),
    # no punctuation at all: a 20-character line splits every 5
    ("白日依山尽黄河入海流欲穷千里目更上一层楼", "wujue", DENGGUANQUE),
    ("1. 朝辞白帝彩云间\n2. 千里江陵一日还\n3. 两岸猿声啼不住\n4. 轻舟已过万重山", "qijue",
     "朝辞白帝彩云间，\n千里江陵一日还。\n两岸猿声啼不住，\n轻舟已过万重山。"),
    # haiku: title, numbering and a closing remark stripped; words reflowed to 5-7-5
    ("Title: The Pond\n1. An old silent pond\n2. A frog jumps into the pond\n3. Splash! Silence again.\n"
     "I hope you enjoy it!", "haiku", OLD_POND),
    ("Here is a haiku about a pond:\n\nAn old silent pond a frog\njumps into the pond splash! Silence again.",
     "haiku", "An old silent pond\na frog jumps into the pond\nsplash! Silence again."),
])
def test_repair_extracts_and_lays_out_the_poem(reply, form, expected):
    fixed = repair(reply, form)
    assert fixed == expected
    assert check_form(fixed, form) == []


# -- the retry loop with scripted models --------------------------------------------

class ScriptSequence(ScriptedLM):
    """Emits the next script of `scripts` on every new generation (each prefill starts one)."""

    def __init__(self, scripts: list[list[int]], vocab_size: int):
        super().__init__(scripts[0], vocab_size)
        self.scripts, self.calls = scripts, 0

    def forward(self, idx, targets=None, cache=None, last_only=False):
        if cache.pos == 0:
            self.script = self.scripts[min(self.calls, len(self.scripts) - 1)]
            self.calls += 1
        return super().forward(idx, targets, cache, last_only)


def _scripted_model(default_model, texts: list[str], name: str = "qwen2.5-0.5b") -> Model:
    # The default model's byte-level tokenizer spells Chinese too; naming the model after the bundled
    # bilingual one makes supports_chinese() say yes without loading it.
    tok = default_model.tokenizer
    eos = min(tok.eos_ids)
    lm = ScriptSequence([tok.encode(t, add_special_tokens=False) + [eos] for t in texts], tok.vocab_size)
    return Model(lm, tok, {"name": name})


def test_retry_after_a_wrong_form_then_conforms(default_model):
    m = _scripted_model(default_model, ["春风吹，\n花开了。\n鸟儿叫，\n春天到。", "好的：\n" + DENGGUANQUE])
    c = create(m, "poem", "春天", form="wujue", guided=False, params=muse.SamplingParams(temperature=0))
    assert (c.ok, c.tries, c.problems, c.text) == (True, 2, [], DENGGUANQUE)
    assert m.model.calls == 2


def test_a_chinese_form_name_writes_that_form(default_model):
    m = _scripted_model(default_model, [DENGGUANQUE])
    c = create(m, "poem", "春天", form="五言绝句", guided=False)
    assert (c.ok, c.form, c.text) == (True, "wujue", DENGGUANQUE)
    assert check_form(DENGGUANQUE, "五绝") == []
    assert create(m, "story", "cats", form="自由诗", attempts=1).form is None  # free verse is no form


def test_never_conforming_says_so_and_keeps_the_best_try(default_model):
    worst = "春风吹，\n花开了。"
    closest = DENGGUANQUE.replace("更上一层楼", "更上一层高楼")
    m = _scripted_model(default_model, [worst, closest, worst])
    c = create(m, "poem", "春天", form="wujue", guided=False, attempts=3)
    assert (c.ok, c.tries, c.text) == (False, 3, closest)
    assert c.problems == ["line 4 '更上一层高楼' has 6 characters; it needs 5"]
    assert m.model.calls == 3


def test_guided_haiku_resamples_each_line_until_it_scans(default_model):
    lines = OLD_POND.splitlines()
    # line 1: two misses (3 and 8 syllables) before a 5; lines 2 and 3 right first time
    m = _scripted_model(default_model, ["Sun sets bright\n", "The evening bell rings softly here\n",
                                        lines[0] + "\n", lines[1] + "\n", lines[2] + "\n"], name="scripted")
    c = create(m, "poem", "a pond", form="haiku")
    assert (c.ok, c.text, c.tries) == (True, OLD_POND, 1)
    assert m.model.calls == 5


def test_prose_kinds_are_cleaned_and_checked(default_model):
    m = _scripted_model(default_model, ['Here is a slogan:\n"Fresh coffee, brighter mornings."\nEnjoy!'],
                        name="scripted")
    c = create(m, "slogan", "a coffee shop", attempts=1)
    assert (c.ok, c.text, c.form) == (True, "Fresh coffee, brighter mornings.", None)
    long_story = _scripted_model(default_model, ["Once upon a time " * 20], name="scripted")
    c = create(long_story, "story", "a dragon", params=muse.SamplingParams(max_new_tokens=8), attempts=2)
    assert not c.ok and c.problems == ["the text was cut off at 8 tokens; allow more with max_new_tokens"]


def test_bad_requests_are_clear_errors(default_model):
    with pytest.raises(LanguageError, match="English-only.*qwen2.5-0.5b"):
        create(default_model, "poem", "spring", form="wujue")
    with pytest.raises(LanguageError, match="Chinese"):
        create(default_model, "story", "一只小猫")
    with pytest.raises(ValueError, match="kind must be one of poem, story"):
        create(default_model, "limerick", "cats")
    with pytest.raises(ValueError, match="form applies to poems only"):
        create(default_model, "story", "cats", form="haiku")
    with pytest.raises(ValueError, match="attempts"):
        create(default_model, "poem", "cats", attempts=0)
    with pytest.raises(ValueError, match="topic"):
        create(default_model, "poem", "  ")


# -- the bilingual model --------------------------------------------------------------


def test_guided_chinese_forms_conform_on_the_bilingual_model(qwen):
    # Unguided, the 0.5B model wrote 0 of 8 五言绝句 with five characters per line; under the grammar
    # constraint every line fits (more seeds: the random-model test below, which is faster).
    c = create(qwen, "poem", "春天", form="wujue", attempts=1,
               params=muse.SamplingParams(temperature=0.8, top_p=0.95, presence_penalty=1.0, seed=3))
    assert (c.ok, c.tries, c.form) == (True, 1, "wujue"), c
    assert check_form(c.text, "wujue") == []
    assert [line[-1] for line in c.text.splitlines()] == ["，", "。", "，", "。"]


# -- the grammar constraint -------------------------------------------------------------

def test_verse_grammar_spells_the_form():
    from muse.apps.creative import FORMS, _line_ends, verse_grammar

    g = verse_grammar((5, 5), _line_ends(FORMS["wujue"])[:2])
    han = "[\\u3400-\\u4dbf\\u4e00-\\u9fff\\uf900-\\ufaff]"
    assert g == f'start: /{han}{{5}}/ "，\\n" /{han}{{5}}/ "。"'


@pytest.mark.parametrize("form", ["wujue", "qilv"])
def test_grammar_constrained_verse_conforms_even_from_a_random_model(tiny, form):
    # A random model (byte-level tokenizer, 49k tokens) at temperature 1.5 would write noise; under the
    # grammar every line has exactly N Chinese characters and the right punctuation, for every seed.
    m = Model(tiny.model, tiny.tokenizer, {"name": "qwen2.5-0.5b"})  # named so Chinese forms are allowed
    for seed in range(3 if form == "wujue" else 1):
        c = create(m, "poem", "春天", form=form, attempts=1,
                   params=muse.SamplingParams(temperature=1.5, top_p=1.0, seed=seed))
        assert (c.ok, c.problems) == (True, []), c.text
        f = get_form(form)
        assert [len(line) for line in c.text.splitlines()] == [n + 1 for n in f.lines]
        assert c.text.endswith("。")


def test_a_chinese_haiku_is_guided_by_characters_too(tiny):
    # 汉俳: a haiku on a Chinese topic has lines of 5, 7 and 5 characters, no punctuation required
    m = Model(tiny.model, tiny.tokenizer, {"name": "qwen2.5-0.5b"})
    c = create(m, "poem", "春天", form="haiku", attempts=1, params=muse.SamplingParams(temperature=1.5, seed=0))
    assert c.ok and [len(line) for line in c.text.splitlines()] == [5, 7, 5], c.text


# -- the command ------------------------------------------------------------------

def test_create_command_warns_when_the_form_is_not_met(default_model, monkeypatch):
    from muse.cli import app

    m = _scripted_model(default_model, ["Sun sets bright\nwind\nrain"], name="scripted")
    monkeypatch.setattr(muse, "load", lambda *a, **k: m)
    result = CliRunner().invoke(app, ["create", "poem", "sunset", "--form", "haiku", "--no-guided",
                                      "--attempts", "2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ok"] is False and out["tries"] == 2 and out["text"] == "Sun sets bright\nwind\nrain"
    assert "Warning: after 2 tries this still does not conform" in result.stderr
    assert "line 1 'Sun sets bright' has 3 syllables; it needs 5" in result.stderr


def test_create_command_errors(default_model):
    from muse.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["create", "poem", "春天", "--form", "wujue"])
    assert result.exit_code == 1 and "qwen2.5-0.5b" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(app, ["create", "sonnet", "love"])
    assert result.exit_code == 2 and "kind must be one of" in result.stderr


def test_create_command_on_the_default_model():
    from muse.cli import app

    result = CliRunner().invoke(app, ["create", "slogan", "fresh bread", "-n", "16", "--seed", "1",
                                      "--attempts", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    # a slogan is the first line of the reply; ok exactly when no problem is left
    assert out["form"] is None and out["tries"] == 1 and "\n" not in out["text"]
    assert out["ok"] is (out["problems"] == [])


def test_create_command_takes_the_chinese_form_name(default_model):
    from muse.cli import app

    result = CliRunner().invoke(app, ["create", "poem", "春天", "--form", "五言绝句"])
    # accepted as a form: the refusal is the English-only model's, naming the bilingual one
    assert result.exit_code == 1 and "qwen2.5-0.5b" in result.stderr and "form must be" not in result.stderr
