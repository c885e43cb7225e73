"""Muse's Transformer against transformers' reference models (tiny, random, fp32)."""

from __future__ import annotations

import pytest
import torch

import muse
from muse.config import ModelConfig
from muse.model import KVCache, Transformer

transformers = pytest.importorskip("transformers")


def _tiny_hf(kind: str, tie: bool):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                      tie_word_embeddings=tie, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        return transformers.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tie, rms_norm_eps=1e-5)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=5000.0, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=20000.0, **common))
    with torch.no_grad():  # random biases/norm weights so every switch is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("kind,tie", [("gpt2", True), ("llama", False), ("llama", True), ("qwen2", True),
                                      ("qwen2", False)])
def test_logits_match_transformers(tmp_path, kind, tie):
    hf = _tiny_hf(kind, tie).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    m = muse.load(tmp_path, precision="fp32")
    assert m.config.arch == kind and m.config.tie_embeddings == tie
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        out, _ = m.model(ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_kv_cache_matches_full_forward(tmp_path, kind):
    hf = _tiny_hf(kind, True).eval()
    hf.save_pretrained(tmp_path)
    model = muse.load(tmp_path, precision="fp32").model
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        full, _ = model(ids)
        cache = KVCache(model.config, 1, 20)
        a, _ = model(ids[:, :7], cache=cache)  # prefill
        b, _ = model(ids[:, 7:12], cache=cache)  # prefill on top of a filled cache
        steps = [model(ids[:, i:i + 1], cache=cache)[0] for i in range(12, 20)]  # decode
    torch.testing.assert_close(torch.cat([a, b, *steps], dim=1), full, rtol=1e-4, atol=1e-4)


def test_sharded_safetensors(tmp_path):
    hf = _tiny_hf("llama", False).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    m = muse.load(tmp_path, precision="fp32")
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(m.model(ids)[0], hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_training_loss_matches_transformers(tmp_path):
    hf = _tiny_hf("qwen2", True).eval()
    hf.save_pretrained(tmp_path)
    m = muse.load(tmp_path, precision="fp32")
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        ref = hf(ids, labels=ids).loss
        _, loss = m.model(ids[:, :-1], targets=ids[:, 1:])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_presets_and_validation():
    cfg = ModelConfig.from_name("shakespeare-char-cpu")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (4, 4, 128, 64)
    assert Transformer(ModelConfig.from_name("tiny")).num_params() == ModelConfig.from_name("tiny").num_params()
    assert Transformer(ModelConfig.from_name("gpt2")).num_params() == ModelConfig.from_name("gpt2").num_params()
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(n_head=6, n_kv_head=4, n_embd=48)
    with pytest.raises(ValueError, match="block_size"):
        ModelConfig.from_name("tiny", block_size=0)
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_name("gpt5")
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({"n_layers": 3})
    # an explicit False is kept, not replaced by the family default
    assert ModelConfig(arch="gpt2", bias=False, n_embd=64, n_head=4).bias is False
