"""The loop guard: generation stops once the output repeats itself verbatim or cycles through what
it already wrote (a near-loop), the same way in `stream_generate` and the batching scheduler, and
never changes an output that does not loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from muse.api import Model
from muse.generation import LOOP_SPAN, Echo, SamplingParams, TokenText, loop_tail, near_loop, stream_generate
from muse.scheduler import Scheduler
from tests.helpers import ScriptLM, shakespeare_text

CYCLE = " The sea is calm tonight and the stars are out over the water."
INTRO = "A short note about life."


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model.tokenizer


def scripted(tok, text: str) -> tuple[Model, list[int]]:
    prompt = tok.encode("Say it:")
    return Model(ScriptLM(tok, len(prompt), text), tok, {"name": "scripted"}), prompt


def run(model, prompt, **settings):
    chunks = list(stream_generate(model.model, model.tokenizer, prompt,
                                  SamplingParams(max_new_tokens=400, temperature=0, **settings)))
    return "".join(c.text for c in chunks), chunks[-1]


def test_loop_tail_finds_the_shortest_period_and_the_whole_run():
    assert loop_tail([7] * (LOOP_SPAN - 1)) == (0, 0)  # too short to call a loop
    assert loop_tail([1, 2] + [7] * LOOP_SPAN) == (1, LOOP_SPAN)
    span = list(range(100, 112))  # 12 tokens: 3 copies are enough
    assert loop_tail([1, 2] + span * 2) == (0, 0)
    assert loop_tail([1, 2] + span * 3) == (12, 36)
    assert loop_tail(span[5:] + span * 3) == (12, 43)  # the run starts inside an earlier partial copy
    assert loop_tail([1, 2, 3, 4] * 7) == (0, 0)  # a 4-token cycle needs 8 copies (32 tokens)
    assert loop_tail([9] + [1, 2, 3, 4] * 8) == (4, 32)


def test_a_looping_script_stops_early_with_at_most_three_copies(tok):
    model, prompt = scripted(tok, INTRO + CYCLE * 20)
    text, last = run(model, prompt)
    assert last.finish_reason == "stop" and last.looped
    assert text.startswith(INTRO) and 1 <= text.count(CYCLE.strip()) <= 3
    assert last.generation_tokens < 60
    off, last_off = run(model, prompt, loop_guard=False)
    assert off.count(CYCLE.strip()) == 20 and last_off.finish_reason == "stop" and not last_off.looped


def test_a_script_that_does_not_loop_is_unchanged(tok):
    words = " ".join(f"word{i}" for i in range(80))
    model, prompt = scripted(tok, words)
    on, last_on = run(model, prompt)
    off, last_off = run(model, prompt, loop_guard=False)
    assert on == off == words and not last_on.looped
    assert last_on.generation_tokens == last_off.generation_tokens


def test_the_scheduler_stops_a_loop_like_stream_generate(tok):
    model, prompt = scripted(tok, INTRO + CYCLE * 20)
    want, last = run(model, prompt)
    sched = Scheduler(model)
    try:
        chunks = list(sched.submit(prompt, SamplingParams(max_new_tokens=400, temperature=0)))
    finally:
        sched.close()
    assert "".join(c.text for c in chunks) == want
    assert (chunks[-1].finish_reason, chunks[-1].looped, chunks[-1].generation_tokens) == (
        "stop", True, last.generation_tokens)


def test_beam_search_keeps_one_copy_of_a_loop(tok):
    model, prompt = scripted(tok, INTRO + CYCLE * 20)
    text, last = run(model, prompt, num_beams=3)
    assert last.finish_reason == "stop" and last.looped
    # one copy, in the phase the repetition was found in (here from the intro's final ".")
    assert text.startswith(INTRO + CYCLE[:-1]) and text.count("The sea is calm") == 1


def test_beam_search_ends_a_near_loop(tok):
    text = "Ten fruits:\n" + "".join(f"{i}. **Cocina de Papel**\n" for i in range(1, 26))
    model, prompt = scripted(tok, text)
    out, last = run(model, prompt, num_beams=2)
    assert last.finish_reason == "stop" and last.looped
    assert text.startswith(out) and 96 <= last.generation_tokens < 200
    off, last_off = run(model, prompt, num_beams=2, loop_guard=False)
    assert off == text and not last_off.looped


def test_near_loop_agrees_with_the_streaming_echo(tok):
    ids = tok.encode("Ten fruits:\n" + "".join(f"{i}. **Cocina de Papel**\n" for i in range(1, 26)),
                     add_special_tokens=False)
    echo, grown, hits = Echo(), [], []
    for t in ids:
        grown.append(t)
        hits.append(echo.push(grown))
    assert any(hits) and not hits[0]
    assert [near_loop(ids[:i + 1]) for i in range(len(ids))] == hits


def test_loop_guard_is_validated():
    with pytest.raises(ValueError, match="loop_guard"):
        SamplingParams(loop_guard="yes")


def test_a_near_loop_stops_numbered_copies_and_moved_paragraph_breaks(tok):
    """Copies that differ a little (a counter, where the paragraph breaks fall) are no verbatim loop."""
    numbered = "Ten fruits:\n" + "".join(f"{i}. **Cocina de Papel**\n" for i in range(1, 26))
    sentence = "I'm a creative AI that can create art that is both beautiful and innovative."
    moved = "My ideal day.\n\n" + "".join(sentence + (" " if i % 3 else "\n\n") for i in range(20))
    # the counter makes the verbatim check blind; the moved breaks make its 3 copies need ≥ 144 tokens
    for text, most in ((numbered, 200), (moved, 140)):
        model, prompt = scripted(tok, text)
        out, last = run(model, prompt)
        assert last.finish_reason == "stop" and last.looped, text[:40]
        assert text.startswith(out) and 96 <= last.generation_tokens < most
        off, last_off = run(model, prompt, loop_guard=False)
        assert off == text and not last_off.looped


def _trips(tok, text: str) -> int:
    """How many 256-token slices of `text` the loop guard would end (as bench/loop_guard.py counts)."""
    ids = tok.encode(text, add_special_tokens=False)
    tripped = 0
    for s in range(0, len(ids) - 256, 256):
        guard = TokenText(None, [], 257, loop_guard=True)
        tripped += any(guard.push(t)[1] for t in ids[s:s + 256])
    return tripped


def test_the_guard_never_trips_on_plays_code_or_data_that_do_not_loop(tok):
    root = Path(__file__).resolve().parent.parent
    assert _trips(tok, shakespeare_text(120_000)) == 0
    assert _trips(tok, (root / "muse" / "generation.py").read_text(encoding="utf-8")) == 0
    assert _trips(tok, (root / "muse" / "eval" / "data" / "sentiment_en.jsonl").read_text(encoding="utf-8")) == 0
    assert _trips(tok, ("1. Cocina de Papel\n" * 40)) == 1  # and it does trip where it should
