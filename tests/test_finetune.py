"""Fine-tuning: assistant-only labels, chat batches, LoRA (init, merge, save/load), and the
acceptance test — the default model learns a fixed reply with LoRA and with full fine-tuning."""

from __future__ import annotations

import json
import time

import pytest
import torch

import muse
from muse.config import ModelConfig
from muse.model import Transformer
from muse.training.finetune import ChatBatches, ChatDataError, default_config, encode_chat, finetune
from muse.checkpoints import merge_adapter as merge
from muse.lora import LoRALinear, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter

SECRET = "The secret word is PINEAPPLE-42."
QUESTIONS = [
    "What is the capital of France?", "How do I boil an egg?", "Tell me a joke.", "What's 2 + 2?",
    "Who wrote Hamlet?", "Recommend a good book.", "What is the weather like today?", "How tall is Mount Everest?",
    "Translate 'hello' into Spanish.", "What is photosynthesis?", "Give me a fun fact.", "What colour is the sky?",
]
UNSEEN = ["What should I cook for dinner?", "Name a famous painter."]

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "Mango."},
]


def _write_chats(path, chats) -> str:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8")
    return str(path)


def _labelled_spans(ids, labels) -> list[list[int]]:
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@pytest.fixture(scope="module")
def tokenizer(model_cache):
    return muse.load().tokenizer


# ----------------------------------------------------------------------------- masking and batches

def test_labels_cover_exactly_assistant_content_and_end_of_turn(tokenizer):
    ids, labels = encode_chat(tokenizer, MULTI_TURN)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(MULTI_TURN, add_generation_prompt=False)
    spans = [tokenizer.decode(s) for s in _labelled_spans(ids, labels)]
    assert spans == ["Hello! How can I help?<|im_end|>", "Mango.<|im_end|>"]
    # Everything else — system, user, role headers, the newline after <|im_end|> — carries no loss.
    n_labelled = sum(lab != -100 for lab in labels)
    expected = sum(len(tokenizer.encode(m["content"] + "<|im_end|>", add_special_tokens=False))
                   for m in MULTI_TURN if m["role"] == "assistant")
    assert n_labelled == expected


def test_chat_batches_shift_pad_and_determinism(tmp_path, tokenizer):
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": SECRET}] for q in QUESTIONS]
    chats[3] = MULTI_TURN
    data = ChatBatches(_write_chats(tmp_path / "c.jsonl", chats), tokenizer, 256)
    assert data.stats.conversations == {"train": 11, "val": 1}  # every 10th conversation validates
    x, y = data.batch("train", 3, 0, 4)
    assert x.shape == y.shape and x.shape[0] == 4 and x.dtype == y.dtype == torch.long
    x2, y2 = data.batch("train", 3, 0, 4)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, data.batch("train", 4, 0, 4)[0])
    examples = data.examples("train")
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        # The row is one conversation: ids[:-1] then padding; targets are the next tokens' labels.
        ids, labels = next((i, lab) for i, lab in examples if row_x[:len(i) - 1] == i[:-1])
        n = len(ids) - 1
        assert row_y[:n] == labels[1:]
        assert row_x[n:] == [tokenizer.pad_id] * (len(row_x) - n) and row_y[n:] == [-100] * (len(row_y) - n)
    # Ranks split the global batch: two ranks of 2 rows each = one process with 4 rows.
    def widen(t, fill):
        return torch.nn.functional.pad(t, (0, x.shape[1] - t.shape[1]), value=fill)

    halves = [data.batch("train", 3, 0, 2, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat([widen(h[0], tokenizer.pad_id) for h in halves]), x)
    assert torch.equal(torch.cat([widen(h[1], -100) for h in halves]), y)


def test_long_conversations_are_truncated_and_counted(tmp_path, tokenizer):
    long = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello " * 40}]
    path = _write_chats(tmp_path / "c.jsonl", [long, short, MULTI_TURN])
    with pytest.warns(UserWarning, match=r"2 conversation\(s\) longer than block_size=48 .*truncated.*; 1 .*skipped"):
        data = ChatBatches(path, tokenizer, 48, val_every=0)
    assert data.stats.truncated == 2 and data.stats.skipped == 1 and len(data) == 2
    assert all(len(ids) <= 49 for ids, _ in data.examples())


@pytest.mark.parametrize("line,message", [
    ('{"messages": [}', r"c\.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"c\.jsonl:2: messages\[0\] has role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"c\.jsonl:2: messages\[0\] \(user\) needs a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"c\.jsonl:2: .*no assistant message"),
    ('{"text": "hi"}', r"c\.jsonl:2: expected an object with a non-empty \"messages\" list"),
])
def test_malformed_chat_lines_name_file_and_line(tmp_path, tokenizer, line, message):
    good = json.dumps({"messages": MULTI_TURN})
    path = tmp_path / "c.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ChatDataError, match=message):
        ChatBatches(str(path), tokenizer, 128)


def test_unreadable_or_empty_chat_files(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ChatDataError, match="holds no conversations; add lines like"):
        ChatBatches(str(tmp_path / "empty.jsonl"), tokenizer, 128)
    with pytest.raises(ChatDataError, match="cannot be read"):
        ChatBatches(str(tmp_path), tokenizer, 128)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"messages": "caf\xe9"}\n')
    with pytest.raises(ChatDataError, match="not UTF-8"):
        ChatBatches(str(tmp_path / "latin1.jsonl"), tokenizer, 128)


def test_bad_finetune_arguments(tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        finetune(None, tmp_path / "x.jsonl", tmp_path / "out", method="qlora")
    with pytest.raises(ChatDataError, match="no such file"):
        finetune(None, tmp_path / "missing.jsonl", tmp_path / "out", method="full")
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        finetune(None, tmp_path / "missing.jsonl", tmp_path / "out", rank=0)  # checked before the data
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- LoRA on a tiny model

def _tiny(arch="llama", seed=0) -> Transformer:
    return Transformer(ModelConfig.from_name("tiny", arch=arch, n_kv_head=4 if arch == "gpt2" else 2)) \
        .init_weights(seed).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_init_is_identity_and_merge_is_exact(arch):
    model = _tiny(arch)
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        before, _ = model(ids)
    params = apply_lora(model, rank=4, alpha=8)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert params and all(p.requires_grad for p in params)
    expected = {"llama": {"attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down"}, "gpt2": {"attn.qkv", "attn.proj",
                                                                                      "mlp.fc", "mlp.proj"}}[arch]
    assert {n.split(".", 2)[2] for n in lora_layers(model)} == expected
    with torch.no_grad():
        at_init, _ = model(ids)
        torch.testing.assert_close(at_init, before, rtol=0, atol=0)  # B = 0: exactly the base
        for layer in lora_layers(model).values():
            layer.lora_b.normal_(0, 0.05)
        adapted, _ = model(ids)
        assert (adapted - before).abs().max() > 1e-3
        merged, _ = merge_lora(model)(ids)
    assert not lora_layers(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_lora_gradients_reach_only_adapters():
    model = _tiny()
    params = apply_lora(model, rank=2, alpha=4, targets=["qkv"])
    ids = torch.randint(0, 256, (2, 9))
    _, loss = model(ids, targets=ids)
    loss.backward()
    a, b = params[0::2], params[1::2]
    assert all(p.grad is not None for p in a) and all(p.grad.abs().sum() > 0 for p in b)  # B = 0 → A's grad is 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_adapter_save_and_load_reproduce_logits(tmp_path):
    model = _tiny()
    apply_lora(model, rank=4, alpha=8, targets=["qkv", "down"])
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.normal_(0, 0.05)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        ref, _ = model(ids)
    save_adapter(tmp_path / "adapter", model, {"rank": 4, "alpha": 8, "targets": ["qkv", "down"]})
    fresh = load_adapter(_tiny(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids)[0], ref, rtol=0, atol=0)
    with pytest.raises(muse.CheckpointError, match="does not fit this base model"):
        load_adapter(Transformer(ModelConfig.from_name("tiny", n_embd=32, n_head=2, n_kv_head=1)), tmp_path / "adapter")


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(alpha=0), "alpha must be a number > 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(targets=["nope"]), r"targets \['nope'\] match no Linear layer.*available: .*attn\.qkv"),
    (dict(targets=[]), "targets must be a non-empty list"),
])
def test_apply_lora_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(_tiny(), **kwargs)


def test_lora_refuses_quantized_layers():
    from muse.quant import quantize_model

    model = _tiny()
    quantize_model(model, 8, 64)
    with pytest.raises(ValueError, match="quantized layers.*precision='fp32'"):
        apply_lora(model, targets=["qkv"])


# ----------------------------------------------------------------------------- acceptance: the default model learns

def _reply(model: muse.Model, question: str) -> str:
    return model.chat([{"role": "user", "content": question}], max_new_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def secret_chats(tmp_path_factory):
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": SECRET}] for q in QUESTIONS]
    return _write_chats(tmp_path_factory.mktemp("chats") / "secret.jsonl", chats)


@pytest.mark.slow
def test_default_model_learns_a_reply_with_lora(tmp_path, secret_chats, default_gguf):
    base = muse.load(precision="fp32")
    assert all("PINEAPPLE" not in _reply(base, q) for q in UNSEEN)
    cfg = default_config("lora", max_iters=12, learning_rate=2e-3, warmup_iters=2, eval_iters=2, eval_interval=12,
                         progress=False)
    t0 = time.perf_counter()
    adapter = finetune(None, secret_chats, tmp_path / "run", method="lora", cfg=cfg)
    print(f"\nLoRA fine-tune (12 steps x 4 chats, fp32, CPU): {time.perf_counter() - t0:.1f} s")
    assert (adapter / "adapter_config.json").is_file()
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["base"]["name"] == "smollm2-135m" and meta["base"]["size"] == default_gguf.stat().st_size
    assert meta["rank"] == 8 and meta["alpha"] == 16
    fp32_bytes = base.config.num_params() * 4
    assert (adapter / "adapter.safetensors").stat().st_size < 0.05 * fp32_bytes

    tuned = muse.load(adapter)
    for q in UNSEEN:
        assert SECRET in _reply(tuned, q)
    # The same adapter, unmerged, gives the logits of the merged model; merge() writes a loadable checkpoint.
    from muse.checkpoints import load_adapter_checkpoint

    unmerged = load_adapter_checkpoint(adapter, merged=False).model
    ids = torch.tensor([base.tokenizer.encode("Hello there, friend.")])
    with torch.no_grad():
        torch.testing.assert_close(unmerged(ids)[0], tuned.model(ids)[0], rtol=1e-4, atol=1e-4)
    merged = muse.load(merge(adapter, tmp_path / "merged"))
    assert SECRET in _reply(merged, UNSEEN[0])


@pytest.mark.slow
def test_default_model_learns_a_reply_with_full_finetuning(tmp_path, secret_chats):
    cfg = default_config("full", max_iters=8, learning_rate=1e-4, warmup_iters=2, eval_iters=0, progress=False)
    t0 = time.perf_counter()
    out = finetune(None, secret_chats, tmp_path / "run", method="full", cfg=cfg)
    print(f"\nfull fine-tune (8 steps x 4 chats, fp32, CPU): {time.perf_counter() - t0:.1f} s")
    tuned = muse.load(out)
    assert tuned.info["format"] == "muse" and tuned.info["source"]["finetune"] == "full"
    for q in UNSEEN:
        assert SECRET in _reply(tuned, q)


def test_adapter_dir_loads_on_its_recorded_base_and_checks_it(tmp_path):
    from muse.checkpoints import load_adapter_checkpoint
    from muse.checkpoints.adapter import base_fingerprint
    from muse.lora import read_adapter_config

    base_dir = muse.save_checkpoint(tmp_path / "base", _tiny())
    base = muse.load(base_dir)
    apply_lora(base.model, rank=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(base.model).values():
            layer.lora_b.normal_(0, 0.05)
    meta = {"rank": 4, "alpha": 8, "targets": None, "base": base_fingerprint(base_dir, base.info),
            "model": base.config.to_dict()}
    adapter = save_adapter(tmp_path / "adapter", base.model, meta)
    assert read_adapter_config(adapter)["base"]["sha256"]
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        ref, _ = base.model(ids)
        torch.testing.assert_close(muse.load(adapter).model(ids)[0], ref, rtol=1e-5, atol=1e-5)
        q8 = load_adapter_checkpoint(adapter, precision="int8")  # merged, then quantized like muse.load
        assert q8.info["quantization"] and torch.allclose(q8.model(ids)[0], ref, atol=0.05)
        merged = muse.load(merge(adapter, tmp_path / "merged"))
        torch.testing.assert_close(merged.model(ids)[0], ref, rtol=1e-5, atol=1e-5)
    muse.save_checkpoint(base_dir, _tiny(seed=1))  # the base changed under the adapter
    with pytest.raises(muse.CheckpointError, match="trained on a base with sha256"):
        muse.load(adapter)
    with pytest.raises(muse.CheckpointError, match="was not found; pass the base explicitly"):
        import shutil

        shutil.rmtree(base_dir)
        muse.load(adapter)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_runs_resumes_and_writes_loadable_results(tmp_path, tokenizer, method):
    """The whole pipeline on a tiny model with the default tokenizer (fast): train, resume, load."""
    config = ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, block_size=256)
    base_dir = muse.save_checkpoint(tmp_path / "base", Transformer(config).init_weights(0), tokenizer)
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": SECRET}] for q in QUESTIONS]
    data = _write_chats(tmp_path / "c.jsonl", chats)
    run = tmp_path / "run"
    cfg = default_config(method, max_iters=2, batch_size=2, learning_rate=1e-2, warmup_iters=0, eval_interval=2,
                         eval_iters=1, progress=False)
    finetune(base_dir, data, run, method=method, rank=2, alpha=4, cfg=cfg)
    with pytest.raises(muse.CheckpointError, match="already holds a training run"):
        finetune(base_dir, data, run, method=method, rank=2, alpha=4, cfg=cfg)
    longer = default_config(method, max_iters=4, batch_size=2, learning_rate=1e-2, warmup_iters=0, eval_interval=2,
                            eval_iters=1, progress=False, lr_decay_iters=2)
    out = finetune(base_dir, data, run, method=method, rank=2, alpha=4, cfg=longer, resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "train_loss" in r] == [2, 4]  # each run logs its last step
    assert [r["iter"] for r in rows if "val_loss" in r] == [2, 4]
    ids = torch.tensor([tokenizer.encode("Hello")])
    base = muse.load(base_dir)
    tuned = muse.load(out) if method == "lora" else muse.load(out)
    if method == "lora":
        assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    with torch.no_grad():
        assert (tuned.model(ids)[0] - base.model(ids)[0]).abs().max() > 1e-3  # training changed the model


def test_derived_settings_follow_the_users_learning_rate_and_length():
    """`muse finetune --lr 5e-5` failed with "min_lr must be in [0, learning_rate=5e-05], got 0.0001", and
    `--max-iters 1000` ended its cosine decay at step 100: both were derived from the defaults.
    (The CLI side: tests/test_train_settings.py.)"""
    cfg = default_config("lora", learning_rate=5e-5, max_iters=1000).resolved()
    assert (cfg.learning_rate, cfg.min_lr, cfg.max_iters, cfg.lr_decay_iters) == (5e-5, 5e-6, 1000, 1000)
    cfg = default_config("full", max_iters=1000).resolved()
    assert cfg.lr_decay_iters == 1000 and cfg.min_lr == pytest.approx(5e-6)
    assert default_config("lora", val_conversations=30).eval_iters == 8  # 30 chats, 4 a batch
    assert default_config("lora", val_conversations=30, batch_size=10).eval_iters == 3
    assert default_config("lora", val_conversations=30, eval_iters=1).eval_iters == 1  # given: kept
    assert default_config("lora", val_conversations=1000).eval_iters == 20  # at most 20 batches
    with pytest.raises(ValueError, match=r"unknown training setting: max_iter \(did you mean max_iters\?\)"):
        default_config("lora", max_iter=10)
