"""The writing desk's library side: a model output saved as a version (an empty one refused), the
word diff between versions, and finding a rated message by its id. No model needed."""

from __future__ import annotations

import pytest

from muse.apps import writer
from muse.apps.diff import word_diff
from muse.apps.feedback import message_number
from muse.errors import MuseError
from muse.store import Store

TEXT = "The meeting, which had been scheduled for Monday, has now been moved to Tuesday."


@pytest.fixture
def store():
    with Store() as s:
        yield s


def actions(store, key: str) -> list[tuple[int, str]]:
    return [(v["seq"], v["action"]) for v in writer.history(store, key)]


def test_a_result_is_saved_after_the_text_it_started_from(store):
    assert writer.save_result(store, "desk:memo", "shorten", TEXT, "Moved to Tuesday.") == (2, "Moved to Tuesday.")
    assert writer.save_result(store, "desk:memo", "continue", "Moved to Tuesday.", " At three.") == (
        3, "Moved to Tuesday. At three.")  # the latest version already: not saved twice
    writer.save_result(store, "desk:memo", "polish", "Edited by hand.", "Edited.")
    assert actions(store, "desk:memo") == [(1, "original"), (2, "shorten"), (3, "continue"), (4, "edited"),
                                           (5, "polish")]


@pytest.mark.parametrize("output", ["", "  \n "])
def test_an_empty_output_is_refused_and_only_the_text_is_kept(store, output):
    with pytest.raises(writer.EmptyOutputError, match="returned nothing, so the memo was not changed"):
        writer.save_result(store, "desk:memo", "shorten", TEXT, output, "the memo")
    assert actions(store, "desk:memo") == [(1, "original")]
    with pytest.raises(MuseError, match="returned nothing"):  # continue too: it would record no change
        writer.result_text("continue", TEXT, output)


def test_version_diff_compares_with_the_previous_version(store):
    writer.save_result(store, "desk:memo", "shorten", TEXT, "The meeting is on Tuesday.")
    first = writer.version_diff(store, "desk:memo", 1)
    assert first["previous"] is None and first["ops"] == [{"op": "insert", "text": TEXT}]
    second = writer.version_diff(store, "desk:memo", 2)
    assert second["previous"] == 1 and second == {"previous": 1, **word_diff(TEXT, "The meeting is on Tuesday.")}
    with pytest.raises(MuseError, match="no version 3"):
        writer.version_diff(store, "desk:memo", 3)


def test_word_diff_keeps_both_texts():
    old, new = "今天天气很好。We met on Monday.", "今天天气不好。We met on Tuesday."
    ops = word_diff(old, new)["ops"]
    assert "".join(o["text"] for o in ops if o["op"] != "insert") == old
    assert "".join(o["text"] for o in ops if o["op"] != "delete") == new
    assert {"op": "delete", "text": "Monday"} in ops and {"op": "insert", "text": "不"} in ops


def test_a_message_is_found_by_its_id():
    conv = {"id": "c1", "messages": [{"n": 1, "id": 10}, {"n": 2, "id": 11}]}
    assert message_number(conv, 11) == 2
    with pytest.raises(MuseError, match="Message 12 is not in conversation c1"):
        message_number(conv, 12)


def test_a_desk_output_that_fails_its_checks_is_not_saved(tmp_path):
    from muse.apps.writer import CheckFailedError, Checked
    from muse.apps.gates import check

    text = "预算为30万元。"
    output = "The budget is $30,000."
    checked = Checked(output, check("translate", text, output), 3, [])
    assert not checked.ok
    with Store(tmp_path / "muse.db") as store:
        writer.keep_version(store, "desk:memo", text)
        e = CheckFailedError(checked, "the desk document 'memo'")
        assert "Not saved: the desk document 'memo' was not changed" in str(e) and "30,000" in str(e)
        assert [v["action"] for v in writer.history(store, "desk:memo")] == ["original"]
