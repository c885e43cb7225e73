"""Constrained decoding and the logits-processor chain (muse.constrain, generation.LogitsProcessors).

Output that must parse always parses, even from a random model sampling at temperature 1; the
constrained and unconstrained greedy outputs agree where the unconstrained one already conforms;
`stream_generate` and the batching `Scheduler` pick the same tokens through the same chain.
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from muse import Constraint, ConstraintError, Model, SamplingParams
from muse.generation import generate, stream_generate
from muse.scheduler import Scheduler


def _gen(model, prompt, **kw):
    chunks = list(stream_generate(model.model, model.tokenizer, prompt, SamplingParams(**kw)))
    return "".join(c.text for c in chunks), chunks


# -- random schemas --------------------------------------------------------------------

ZH_WORDS = ["北京", "上海", "苹果", "红色", "你好", "数据"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random JSON schema over the keywords people use: nested objects, arrays, enums (Chinese
    ones too), bounded integers and numbers, booleans, strings with a length limit. Every part is
    bounded so a random model's output ends."""
    kinds = ["string", "integer", "number", "boolean", "enum", "zh_enum"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": -10, "maximum": 10}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "amber", "x y"], rng.randint(1, 4))}
    if kind == "zh_enum":
        return {"type": "string", "enum": rng.sample(ZH_WORDS, rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": 0, "maxItems": rng.randint(1, 3)}
    props = {f"k{i}_{rng.choice(['名字', 'name', 'v'])}": random_schema(rng, depth + 1)
             for i in range(rng.randint(1, 4))}
    return {"type": "object", "properties": props, "required": rng.sample(sorted(props), rng.randint(0, len(props))),
            "additionalProperties": False}


def test_random_schemas_always_parse_and_validate_even_from_a_random_model(tiny):
    rng = random.Random(7)
    for i in range(20):
        schema = {"type": "object", "properties": {"answer": random_schema(rng)}, "required": ["answer"],
                  "additionalProperties": False}
        text, chunks = _gen(tiny, "JSON:", constraint=Constraint.json_schema(schema), temperature=1.0, seed=i,
                            max_new_tokens=400, loop_guard=False)
        assert chunks[-1].finish_reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_and_grammar_from_a_random_model(tiny):
    cases = [
        (Constraint.regex(r"[0-9]{4}-[01][0-9]-[0-3][0-9]"), lambda t: re.fullmatch(r"\d{4}-[01]\d-[0-3]\d", t)),
        (Constraint.choice(["积极", "消极", "中性"]), lambda t: t in ("积极", "消极", "中性")),
        (Constraint.grammar('start: "yes" | "no" | NUM\nNUM: /[1-9][0-9]{0,3}/'),
         lambda t: t in ("yes", "no") or re.fullmatch(r"[1-9]\d{0,3}", t)),
    ]
    for constraint, ok in cases:
        for seed in range(4):
            text, chunks = _gen(tiny, "Answer:", constraint=constraint, temperature=1.0, seed=seed,
                                max_new_tokens=300, loop_guard=False)
            assert chunks[-1].finish_reason == "stop" and ok(text), (constraint, text)


# -- the real model --------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.mark.parametrize("question, schema", [
    ('Reply with only this JSON: {"city": "Paris", "country": "France"}', {"type": "object"}),
    ("Convert to JSON with keys name and age: Bob is 40 years old.", PERSON),
])
def test_constrained_greedy_equals_unconstrained_where_it_already_conforms(default_model, question, schema):
    ids = default_model.tokenizer.encode(default_model.chat_prompt([{"role": "user", "content": question}]),
                                         add_special_tokens=False)
    free, free_chunks = _gen(default_model, ids, temperature=0, max_new_tokens=60)
    jsonschema.validate(json.loads(free), schema)  # the premise: the free output conforms
    bound, bound_chunks = _gen(default_model, ids, temperature=0, max_new_tokens=60,
                               constraint=Constraint.json_schema(schema))
    assert bound == free
    assert [c.token for c in bound_chunks] == [c.token for c in free_chunks]


def test_json_object_from_the_real_model(default_model):
    msgs = [{"role": "user", "content": "Name a fruit. JSON only."}]
    assert not default_model.chat(msgs, temperature=0, max_new_tokens=20).lstrip().startswith("{")  # prose unconstrained
    out = default_model.chat(msgs, temperature=0, max_new_tokens=60, constraint=Constraint.json_object())
    assert isinstance(json.loads(out), dict)


def test_a_schema_turns_free_text_into_valid_json(default_model):
    msgs = [{"role": "user", "content": "Give JSON for a person named Ann aged 31."}]
    strict = {**PERSON, "additionalProperties": False}
    free = default_model.chat(msgs, temperature=0, max_new_tokens=60)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)  # unconstrained, this model rambles past the object
    out = json.loads(default_model.chat(msgs, temperature=0, max_new_tokens=60,
                                        constraint=Constraint.json_schema(strict)))
    jsonschema.validate(out, strict)
    assert out == {"name": "Ann", "age": 31}


# -- logit bias, logprobs, score -------------------------------------------------------

def test_logit_bias_bans_and_forces_tokens(default_model):
    prompt = "The capital of France is"
    first = _gen(default_model, prompt, temperature=0, max_new_tokens=1)[1][0].token
    banned = _gen(default_model, prompt, temperature=0, max_new_tokens=1, logit_bias={first: -100})[1][0].token
    assert banned != first
    forced = default_model.tokenizer.encode(" banana", add_special_tokens=False)[0]
    chunks = _gen(default_model, prompt, temperature=0, max_new_tokens=3, logit_bias={forced: 100})[1]
    assert all(c.token == forced for c in chunks)


def test_logprobs_are_the_models_own(default_model):
    prompt = default_model.tokenizer.encode("Once upon a time")
    text, chunks = _gen(default_model, prompt, temperature=0.7, seed=3, max_new_tokens=6, logprobs=5)
    generated = [c.token for c in chunks]
    logits = default_model.logits(prompt + generated[:-1])  # (T, V): row t predicts token t + 1
    ref = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1:]
    for i, c in enumerate(chunks):
        assert c.logprob == pytest.approx(float(ref[i, c.token]), abs=1e-4)
        ids = [t for t, _ in c.top_logprobs]
        assert ids == torch.topk(ref[i], 5).indices.tolist()
        lps = [lp for _, lp in c.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert sum(float(torch.tensor(lp).exp()) for lp in lps) <= 1.0 + 1e-5
    assert _gen(default_model, prompt, temperature=0, max_new_tokens=2)[1][0].logprob is None  # off by default


def test_score_equals_a_full_forward_pass(default_model):
    tok = default_model.tokenizer
    prompt, conts = "The capital of France is", [" Paris", " London, of course"]
    totals = default_model.score(prompt, conts)
    prefix = tok.encode(prompt)
    for cont, total in zip(conts, totals):
        ids = tok.encode(prompt + cont)[len(prefix):]
        logp = torch.log_softmax(default_model.logits(prefix + ids).float(), dim=-1)
        want = sum(float(logp[len(prefix) - 1 + j, t]) for j, t in enumerate(ids))
        assert total == pytest.approx(want, abs=1e-3)
    assert totals[0] > totals[1]


# -- one chain, two loops --------------------------------------------------------------

def test_scheduler_and_stream_generate_pick_the_same_tokens(tiny):
    tok = tiny.tokenizer
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tag": {"enum": ["甲", "乙"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    banned = tok.encode("the", add_special_tokens=False)[0]
    requests = [
        SamplingParams(temperature=1.0, seed=1, max_new_tokens=80, constraint=Constraint.json_schema(schema),
                       loop_guard=False),
        SamplingParams(temperature=0.8, seed=2, max_new_tokens=20, repetition_penalty=1.3, logit_bias={banned: -100},
                       loop_guard=False),
        SamplingParams(temperature=0, max_new_tokens=20, presence_penalty=1.5, logprobs=2, loop_guard=False),
        SamplingParams(temperature=1.0, seed=4, max_new_tokens=40, constraint=Constraint.regex(r"[a-z ]{1,30}\."),
                       loop_guard=False),
    ]
    prompts = ["Tell me", "A story about", "Once", "Write"]
    want = [[(c.token, c.logprob) for c in stream_generate(tiny.model, tok, p, params)]
            for p, params in zip(prompts, requests)]
    sched = Scheduler(tiny, max_batch=4)
    try:
        streams = [sched.submit(p, params) for p, params in zip(prompts, requests)]
        got = [[(c.token, c.logprob) for c in s] for s in streams]
    finally:
        sched.close()
    for w, g in zip(want, got):
        assert [t for t, _ in g] == [t for t, _ in w]
    assert [lp for _, lp in got[2]] == pytest.approx([lp for _, lp in want[2]], abs=1e-4)
    assert all(lp is None for _, lp in got[0])
    assert banned not in [t for t, _ in got[1]]


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("constraint, words", [
    (Constraint.regex("[a-z"), "regex"),
    (Constraint.grammar("start: undefined_rule"), "grammar"),
    (Constraint.json_schema({"type": "object", "properties": {"x": {"type": "strnig"}}}), "schema"),
])
def test_an_unusable_constraint_is_a_clear_error(tiny, constraint, words):
    with pytest.raises(ConstraintError, match=words.split()[0]) as e:
        generate(tiny.model, tiny.tokenizer, "x", SamplingParams(constraint=constraint, max_new_tokens=4))
    assert "Traceback" not in str(e.value)


def test_bad_parameters_name_themselves(tiny):
    for kwargs, name in [(dict(logit_bias={5: 101}), "logit_bias"), (dict(logit_bias={-1: 1}), "logit_bias"),
                         (dict(logprobs=21), "logprobs"), (dict(constraint={"type": "object"}), "constraint")]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="constraint kind"):
        Constraint("xml", "<a/>")
    with pytest.raises(ValueError, match="vocabulary"):
        generate(tiny.model, tiny.tokenizer, "x", SamplingParams(logit_bias={10**7: 1.0}, max_new_tokens=2))
    with pytest.raises(ValueError, match="num_beams"):
        generate(tiny.model, tiny.tokenizer, "x", SamplingParams(num_beams=2, constraint=Constraint.json_object()))


# -- the CLI -----------------------------------------------------------------------------

def test_cli_generate_with_a_schema_choice_and_bad_files(default_model, tmp_path):
    from typer.testing import CliRunner

    from muse.cli import app

    def run(*args):
        return CliRunner().invoke(app, ["generate", "-t", "0", *args], catch_exceptions=False)

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps({**PERSON, "additionalProperties": False}))
    out = run("--chat", "--schema", str(schema), "-n", "60", "Ann is 31.")
    assert out.exit_code == 0
    jsonschema.validate(json.loads(out.stdout), json.loads(schema.read_text()))
    out = run("--chat", "--choice", "yes", "--choice", "no", "Is water wet?")
    assert out.exit_code == 0 and out.stdout.strip() in ("yes", "no")
    short = run("--chat", "--schema", str(schema), "-n", "3", "Ann is 31.")
    assert short.exit_code == 2 and "raise --max-tokens" in short.stderr
    (tmp_path / "bad.json").write_text("{bad")
    for args, words in [(("--schema", str(tmp_path / "nope.json")), "no file at"),
                        (("--schema", str(tmp_path / "bad.json")), "not valid JSON"),
                        (("--regex", "[a-"), "regex constraint is not usable"),
                        (("--json", "--regex", "a"), "not several")]:
        out = run(*args, "x")
        assert out.exit_code != 0 and words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_scheduler_call_runs_model_work_between_steps(tiny):
    """Scoring through Scheduler.call (the scheduler thread owns the model) while streams run
    gives the same numbers as scoring directly, and errors reach the caller."""
    from muse.generation import score

    prefix = tiny.tokenizer.encode("The weather today")
    conts = [tiny.tokenizer.encode(" is sunny", add_special_tokens=False), [5, 6, 7]]
    want = score(tiny.model, prefix, conts)
    sched = Scheduler(tiny, max_batch=2)
    try:
        stream = sched.submit("Once", SamplingParams(temperature=0, max_new_tokens=30, loop_guard=False))
        futures = [sched.call(score, tiny.model, prefix, conts) for _ in range(3)]
        got = [f.result() for f in futures]
        text = "".join(c.text for c in stream)
        assert text == generate(tiny.model, tiny.tokenizer, "Once", SamplingParams(temperature=0, max_new_tokens=30,
                                                                                    loop_guard=False))
        for g in got:
            assert g == [pytest.approx(w, abs=1e-5) for w in want]
        with pytest.raises(ValueError, match="prefix"):
            sched.call(score, tiny.model, [], conts).result()
    finally:
        sched.close()


def test_a_looping_constrained_output_is_closed_not_cut(default_model):
    """A model stuck repeating one token inside a JSON string: the loop guard, instead of stopping
    there (output that does not parse), steers the mask to the nearest valid end."""
    from tests.helpers import ScriptLM

    tok = default_model.tokenizer
    stuck = ScriptLM(tok, 1, "a" * 4000)  # "aaaa…": the same token at every step, whatever came before
    schema = {"type": "object", "properties": {"s": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["s", "n"], "additionalProperties": False}
    p = SamplingParams(temperature=0, max_new_tokens=300, constraint=Constraint.json_schema(schema))
    chunks = list(stream_generate(stuck, tok, "x", p))
    out = "".join(c.text for c in chunks)
    jsonschema.validate(json.loads(out), schema)
    assert chunks[-1].finish_reason == "stop" and chunks[-1].looped and len(chunks) < 100
    cut = list(stream_generate(stuck, tok, "x", p.replace(loop_guard=False)))
    assert cut[-1].finish_reason == "length" and not cut[-1].looped  # without the guard: runs out, unparseable
    sched = Scheduler(Model(stuck, tok, {"name": "stuck"}))
    try:
        assert "".join(c.text for c in sched.submit("x", p)) == out  # the scheduler does the same
    finally:
        sched.close()
