"""Generation mechanics: sampling parameters, streaming, stop strings, limits, beams."""

from __future__ import annotations

import pytest
import torch

import muse
from muse.generation import SamplingParams, StopMatcher, beam_search, make_sampler, stream_generate
from tests.helpers import ScriptedLM, free_passes


@pytest.fixture(scope="module")
def tok(default_gguf):
    import gguf

    from muse.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf.GGUFReader(str(default_gguf)))


def _scripted(tok, text: str, eos: bool = True) -> ScriptedLM:
    ids = tok.encode(text, add_special_tokens=False) + ([min(tok.eos_ids)] if eos else [])
    return ScriptedLM(ids, tok.vocab_size)


@pytest.mark.parametrize("text", ["你好，世界！今天天气很好。", "Emoji 👍🏽🎉 and 中文 mixed ✓", "naïve café — 日本語"])
def test_streaming_never_splits_utf8(tok, text):
    chunks = list(stream_generate(_scripted(tok, text), tok, "Hi", max_new_tokens=100))
    assert "".join(c.text for c in chunks) == text
    assert all("\ufffd" not in c.text for c in chunks)
    # multi-byte characters span several byte-level tokens, so some steps emit nothing
    assert any(c.text == "" for c in chunks[:-1])
    assert chunks[-1].finish_reason == "stop" and chunks[-1].token in tok.eos_ids


def test_stop_strings_are_never_emitted(tok):
    model = _scripted(tok, "Answer: 42\nUser: next question", eos=False)
    chunks = list(stream_generate(model, tok, "Q", max_new_tokens=50, stop=["\nUser:"]))
    assert "".join(c.text for c in chunks) == "Answer: 42"
    assert chunks[-1].finish_reason == "stop"


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END"])
    assert m.push("abcE") == ("abc", False)
    assert m.push("N") == ("", False)
    assert m.push("X") == ("ENX", False)
    assert m.push("yyEND zz") == ("yy", True)


def test_max_new_tokens_and_length_finish(tok):
    model = _scripted(tok, "one two three four five six seven", eos=False)
    chunks = list(stream_generate(model, tok, "Count", max_new_tokens=3))
    assert len(chunks) == 3 and chunks[-1].finish_reason == "length"
    assert chunks[-1].generation_tokens == 3 and chunks[-1].prompt_tokens == len(tok.encode("Count"))


def test_prompt_longer_than_context_is_a_clear_error(tok):
    model = ScriptedLM([10, 11, 12, 13], tok.vocab_size, block_size=16)
    long_prompt = list(range(100, 140))
    with pytest.raises(muse.ContextLengthError, match="40 tokens.*16 tokens"):
        list(stream_generate(model, tok, long_prompt))
    # an explicit truncation policy keeps the newest tokens and still generates
    chunks = list(stream_generate(model, tok, long_prompt, max_new_tokens=4, truncate="left"))
    assert chunks[-1].prompt_tokens == 12 and chunks[-1].generation_tokens == 4


@pytest.mark.parametrize("name,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                        ("min_p", 1.0), ("max_new_tokens", 0), ("repetition_penalty", 0.0),
                                        ("num_beams", 0), ("seed", -3), ("truncate", "middle")])
def test_out_of_range_parameters_name_the_parameter(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_temperature_zero_is_greedy_not_default():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    assert int(make_sampler(SamplingParams(temperature=0.0))(logits)) == 1


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda **kw: {int(make_sampler(SamplingParams(temperature=1.0, seed=s, **kw))(logits))  # noqa: E731
                          for s in range(200)}
    assert draws(top_k=2, top_p=1.0) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5+0.3 reaches it
    assert draws(top_p=1.0, min_p=0.5) == {0, 1}  # 0.3 ≥ 0.25, 0.15 < 0.25
    assert draws(top_p=1.0) == {0, 1, 2, 3}


def test_repetition_penalty_discourages_seen_tokens():
    from muse.generation import apply_penalties

    logits = torch.tensor([[2.0, 1.0, -1.0]])
    out = apply_penalties(logits, torch.tensor([[0, 2]]), torch.tensor([[0]]),
                          SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5))
    torch.testing.assert_close(out, torch.tensor([[1.0 - 0.5, 1.0, -2.0]]))


# -- on the real default model ----------------------------------------------------

def test_same_seed_same_text(default_model):
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95)
    a = default_model.generate("Write a story about a fox.", seed=7, **kw)
    b = default_model.generate("Write a story about a fox.", seed=7, **kw)
    c = default_model.generate("Write a story about a fox.", seed=8, **kw)
    assert a == b and a != c


def test_chat_uses_template_and_stops_at_end_of_turn(default_model):
    reply = default_model.chat([{"role": "user", "content": "What is 2+2? Answer with one number."}],
                               temperature=0, max_new_tokens=40)
    assert "4" in reply and "<|im_end|>" not in reply and "<|im_start|>" not in reply


def test_beam_search_matches_transformers_on_tiny_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   eos_token_id=5, bos_token_id=1, pad_token_id=0, initializer_range=0.5)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = muse.load(tmp_path, precision="fp32").model
    # the third prompt reaches EOS early, where length_penalty changes the winner
    for prompt, lp in [([1, 9, 17, 33, 2], 1.0), ([1, 4, 5, 6], 0.0), ([7, 7, 7], 1.0), ([7, 7, 7], 2.0)]:
        p = SamplingParams(num_beams=5, length_penalty=lp, max_new_tokens=12)
        ours = beam_search(model, prompt, p, 12, {5})
        ref = hf.generate(torch.tensor([prompt]), num_beams=5, do_sample=False, max_new_tokens=12,
                          length_penalty=lp, eos_token_id=5, pad_token_id=0)[0, len(prompt):].tolist()
        while ref and ref[-1] == 0 and 0 not in ours:  # HF pads finished beams
            ref.pop()
        assert ours == ref, f"prompt={prompt} length_penalty={lp}"
    assert beam_search(model, [7, 7, 7], SamplingParams(num_beams=5), 12, {5})[-1] == 5
    # logit_bias on the beams, as transformers bans words and renormalizes: the plain beam's tokens are out
    prompt = [1, 9, 17, 33, 2]
    plain = beam_search(model, prompt, SamplingParams(num_beams=5, max_new_tokens=12), 12, {5})
    banned = sorted(set(plain[:3]) - {5})
    ours = beam_search(model, prompt, SamplingParams(num_beams=5, max_new_tokens=12,
                                                     logit_bias={t: -100.0 for t in banned}), 12, {5})
    ref = hf.generate(torch.tensor([prompt]), num_beams=5, do_sample=False, max_new_tokens=12, eos_token_id=5,
                      pad_token_id=0, bad_words_ids=[[t] for t in banned], renormalize_logits=True)[0, len(prompt):]
    ref = ref.tolist()
    while ref and ref[-1] == 0 and 0 not in ours:
        ref.pop()
    assert ours == ref and not set(ours) & set(banned)


def test_generation_config_sampling_applies_when_the_user_sets_nothing(tmp_path, monkeypatch):
    """A checkpoint's generation_config.json recommends sampling: it fills what the caller left
    unset, a value the caller sets wins (temperature=0 stays greedy), do_sample false recommends nothing."""
    import json

    import muse.api

    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.8, "top_k": 20, "repetition_penalty": 99.0,
           "bos_token_id": 1}
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    m = muse.load(tmp_path, precision="fp32")
    assert m.recommended == {"temperature": 0.6, "top_p": 0.8, "top_k": 20}  # 99 is out of range: left out
    assert (m.params().temperature, m.params().top_p, m.params().top_k) == (0.6, 0.8, 20)
    assert m.params().max_new_tokens == SamplingParams().max_new_tokens
    greedy = m.params(temperature=0)
    assert (greedy.temperature, greedy.top_p) == (0.0, 0.8)
    assert m.params(SamplingParams(top_p=0.5)) == SamplingParams(top_p=0.5)  # given params are used as given

    seen = []
    for name in ("generate", "stream_generate"):
        monkeypatch.setattr(muse.api, name, lambda model, tok, prompt, p: seen.append(p) or "")
    m.generate([1, 2, 3], max_new_tokens=4)
    m.stream([1, 2, 3], temperature=0.0, top_p=1.0)
    assert (seen[0].temperature, seen[0].top_p, seen[0].max_new_tokens) == (0.6, 0.8, 4)
    assert (seen[1].temperature, seen[1].top_p, seen[1].top_k) == (0.0, 1.0, 20)

    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}))
    assert muse.load(tmp_path, precision="fp32").recommended == {}


def test_bundled_models_recommend_their_publishers_sampling(default_model):
    """The bundled GGUFs carry no sampling keys: the registry's publisher settings fill in."""
    from muse.checkpoints.registry import BUNDLED

    assert default_model.recommended == dict(BUNDLED["smollm2-135m"].sampling) == {"temperature": 0.2, "top_p": 0.9}
    qwen = dict(BUNDLED["qwen2.5-0.5b"].sampling)
    assert SamplingParams(**qwen).top_k == 20  # every value is in range


def test_server_requests_sample_with_the_models_recommended_settings_unless_given():
    """An OpenAI request that leaves a setting out gets the model's recommended value, not a fixed one."""
    from muse.api import Model
    from muse.server.openai import _sampling
    from muse.server.schemas import ChatCompletionRequest

    m = Model(None, None, {"sampling": {"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.1}})
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    p = _sampling(m, body, 12, 0)
    assert (p.temperature, p.top_k, p.repetition_penalty, p.max_new_tokens) == (0.7, 20, 1.1, 12)
    greedy = _sampling(m, body.model_copy(update={"temperature": 0, "top_k": 5}), None, 0)
    assert (greedy.temperature, greedy.top_k, greedy.repetition_penalty) == (0.0, 5, 1.1)
    assert _sampling(Model(None, None, {}), body, None, 0) == SamplingParams()


# -- prompt lookup: drafts from the text so far, checked by the model -------------------------------

def test_prompt_lookup_drafts_what_followed_the_latest_earlier_occurrence():
    from muse.generation import PromptLookup

    look = PromptLookup([5, 6, 7, 8, 9, 1, 6, 7, 3, 4])
    assert look.draft(3) == []                  # the tail 3 4 / 7 3 4 occurs nowhere before
    look.extend([6, 7])
    assert look.draft(3) == [3, 4, 6]           # 6 7: its latest earlier occurrence was followed by 3 4 6
    look.extend([8])
    assert look.draft(2) == [9, 1]              # 6 7 8 (the longest n-gram) beats 7 8 alone
    assert look.draft(0) == []


def test_a_pass_costs_the_median_of_its_widths_timings_and_untimed_widths_extend_the_nearest():
    from muse.generation import PassCost

    cost = PassCost(slope=0.05)
    assert cost.ratio(9) == pytest.approx(1.4)           # nothing timed: the prior slope
    for _ in range(5):
        cost.timed(1, 0.010)
        cost.timed(5, 0.030)                              # 4 tokens more cost 2 passes: 0.5 a token
    cost.timed(5, 1.0)                                    # another program held the CPU: outvoted
    assert cost.slope == pytest.approx(0.5)
    assert cost.ratio(5) == pytest.approx(3.0)            # timed: its own median
    assert cost.ratio(3) == pytest.approx(2.0)            # 1 + 0.5 × 2 (width 1 is the nearest timed below)
    assert cost.ratio(9) == pytest.approx(5.0)            # 3.0 + 0.5 × 4


def test_a_pass_cost_is_timed_and_read_from_several_threads_at_once():
    """One model may generate in several threads: reading the costs while another thread records a
    new width must not fail ("dictionary changed size during iteration")."""
    import threading

    from muse.generation import PassCost

    cost, errors, done = PassCost(), [], threading.Event()

    def record():
        for width in [1] * 5 + list(range(2, 6000)):  # every pass a width not timed before
            cost.timed(width, 0.01 * (1 + 0.1 * (width - 1)))
        done.set()

    writer = threading.Thread(target=record)
    writer.start()
    try:
        while not done.is_set():
            cost.ratio(9)
    except RuntimeError as e:
        errors.append(e)
    writer.join()
    assert not errors
    assert cost.ratio(9) == pytest.approx(1.8)


def test_a_draft_is_as_long_as_it_pays_for_its_wider_pass():
    from muse.generation import PassCost, PromptLookup

    cheap, dear, prohibitive = PassCost(slope=0.05), PassCost(slope=0.4), PassCost(slope=1.0)
    fresh = PromptLookup([1, 2, 3])
    assert fresh.size(8, cheap) > 0 and fresh.size(8, prohibitive) == 0   # a first guess of 1 in 2 right

    copying = PromptLookup([1, 2, 3])
    for _ in range(10):
        copying.checked(8, 8)                             # whole drafts accepted
    assert copying.size(8, PassCost(slope=0.2)) == 8
    assert copying.size(3, PassCost(slope=0.2)) == 3      # never beyond what was asked

    paraphrasing = PromptLookup([1, 2, 3])
    for _ in range(10):
        paraphrasing.checked(4, 0)                        # every draft wrong from its first token
    assert paraphrasing.size(8, dear) == 0
    for _ in range(100):                                  # nothing drafted for a while: the counts fade,
        paraphrasing.size(8, dear)
    assert paraphrasing.size(8, dear) > 0                 # and it tries again


def test_a_new_generation_starts_from_how_the_models_recent_drafts_fared():
    from muse.generation import DraftHistory, PassCost, PromptLookup

    dear = PassCost(slope=0.6)  # a pass of 2 costs 1.6: a first guess of 1 in 2 right does not pay
    history = DraftHistory()
    assert PromptLookup([1, 2, 3], history=history).size(8, dear) == 0
    earlier = PromptLookup([1, 2, 3], history=history)
    for _ in range(20):
        earlier.checked(4, 4)                             # the model's drafts were right
    assert history.prior > 0.9
    assert PromptLookup([1, 2, 3], history=history).size(8, dear) > 0
    for _ in range(200):
        earlier.checked(4, 0)                             # then they went wrong from their first token
    assert PromptLookup([1, 2, 3], history=history).size(8, dear) == 0


def test_greedy_with_prompt_lookup_emits_the_same_tokens_in_fewer_passes(tok, monkeypatch):
    free_passes(monkeypatch)
    text = "The quick brown fox jumps over the lazy dog near the river bank at noon."
    prompt = "Copy: " + text + "\nAgain: "
    script = tok.encode(text + " Then a new sentence follows here. " + text, add_special_tokens=False)
    runs = {}
    for look in (0, 8):
        model = ScriptedLM(script, tok.vocab_size)
        chunks = list(stream_generate(model, tok, prompt, temperature=0.0, max_new_tokens=len(script) - 3,
                                      prompt_lookup=look))
        runs[look] = ([c.token for c in chunks], model.passes, chunks[-1])
    assert runs[8][0] == runs[0][0] == script[:len(script) - 3]   # max_new_tokens still bounds the drafts
    assert runs[0][1] == len(script) - 3                          # one pass a token (the prefill's gives the first)
    last = runs[8][2]
    assert last.accepted_tokens > len(script) // 2 and last.drafted_tokens >= last.accepted_tokens
    assert runs[8][1] == len(script) - 3 - last.accepted_tokens   # each accepted token saved one pass
    assert last.finish_reason == "length"


@pytest.mark.parametrize("options", [dict(temperature=0.0, logprobs=2),
                                     dict(temperature=0.0, constraint=muse.Constraint.choice(["yes", "no"]))])
def test_prompt_lookup_is_off_under_a_constraint_or_with_logprobs(tok, options):
    text = "alpha beta gamma delta alpha beta gamma delta"
    model = ScriptedLM(tok.encode(text, add_special_tokens=False), tok.vocab_size)
    last = list(stream_generate(model, tok, "alpha beta gamma delta alpha beta", max_new_tokens=8, **options))[-1]
    assert last.drafted_tokens == 0


def test_prompt_lookup_keeps_the_default_models_greedy_text(default_model, monkeypatch):
    """A real model checks drafts in one multi-token pass: the text must be the plain greedy one."""
    free_passes(monkeypatch)
    text = ("Muse runs on your own computer. It reads your documents, answers with citations, and never "
            "sends a word to the internet. Every model it runs is a file on your disk.")
    messages = [{"role": "user", "content": "Repeat this text word for word:\n\n" + text}]
    ids = default_model.tokenizer.encode(default_model.chat_prompt(messages), add_special_tokens=False)
    outs = {}
    for look in (0, 8):
        for rep in (1.0, 1.1):
            chunks = list(stream_generate(default_model.model, default_model.tokenizer, ids, temperature=0.0,
                                          max_new_tokens=60, repetition_penalty=rep, prompt_lookup=look))
            outs[look, rep] = ("".join(c.text for c in chunks), chunks[-1].accepted_tokens)
    for rep in (1.0, 1.1):
        assert outs[8, rep][0] == outs[0, rep][0]
    assert outs[8, 1.0][1] > 10  # the copy was mostly drafted


def test_a_cache_forgets_a_rejected_draft():
    from muse.model import KVCache, ModelConfig

    cache = KVCache(ModelConfig(arch="llama", vocab_size=10, n_layer=1, n_head=1, n_embd=8, block_size=16), 1, 16)
    cache.advance(9)
    cache.truncate(6)
    assert cache.pos == 6
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(7)


class SteadyLM(ScriptedLM):
    """Whatever came before, the next token is 1, 2 or 3 with probabilities 0.5, 0.3, 0.2."""

    P = torch.tensor([0.5, 0.3, 0.2])

    def forward(self, idx, targets=None, cache=None, last_only=False):
        B, T = idx.shape
        rows = 1 if last_only or cache.pos == 0 else T
        cache.pos += T
        logits = torch.full((B, rows, self.config.vocab_size), -1e4)
        logits[:, :, 1:4] = self.P.log()
        return logits, None


def test_sampling_with_prompt_lookup_gives_the_same_text_and_the_models_distribution():
    """A draft token is kept when the seeded sampler picks it anyway: the same text as without drafts,
    drawn from the model's distribution, while many tokens come from drafts checked in one pass."""
    model = SteadyLM([], vocab_size=8)
    runs = {}
    for look in (0, 8):
        tokens, accepted = [], 0
        for seed in range(12):
            chunks = list(stream_generate(model, None, [1, 2, 1, 3, 1, 2, 1, 1, 2], temperature=1.0, top_p=1.0,
                                          seed=seed, max_new_tokens=250, loop_guard=False, prompt_lookup=look))
            tokens += [c.token for c in chunks]
            accepted += chunks[-1].accepted_tokens
        runs[look] = (tokens, accepted)
    assert runs[8][0] == runs[0][0]
    assert runs[0][1] == 0 and runs[8][1] > 500
    share = torch.bincount(torch.tensor(runs[8][0]), minlength=4)[1:].float() / len(runs[8][0])
    assert torch.allclose(share, SteadyLM.P, atol=0.03), share
