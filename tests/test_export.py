"""Export to Hugging Face directories and GGUF files, checked against the readers that matter:
transformers (from_pretrained, and its GGUF loader) and Muse's own loader."""

from __future__ import annotations

import json

import pytest
import torch

import muse
from muse.config import ModelConfig
from muse.export import ExportError, export_gguf, export_hf
from muse.model import Transformer
from muse.lora import apply_lora, lora_layers

transformers = pytest.importorskip("transformers")

CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _tiny(seed=0, **overrides) -> Transformer:
    """A tiny random model with non-trivial norms and biases, so every switch is exercised."""
    if overrides.get("arch") == "gpt2":
        overrides.setdefault("n_kv_head", 4)
    model = Transformer(ModelConfig.from_name("tiny", **overrides)).init_weights(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _hf_logits(path, ids, **kwargs) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return hf(ids).logits


TINY_VARIANTS = [
    dict(arch="gpt2"),
    dict(arch="gpt2", bias=False, qkv_bias=False, tie_embeddings=False),  # nanoGPT-style: zeros are written
    dict(arch="llama"),
    dict(arch="llama", tie_embeddings=False, qkv_bias=True),
    dict(arch="qwen2"),
    dict(arch="qwen2", tie_embeddings=False, qkv_bias=False),
]


@pytest.mark.parametrize("overrides", TINY_VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_hf_export_matches_transformers(tmp_path, overrides):
    model = _tiny(**overrides)
    ids = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        ref, _ = model(ids)
    out = export_hf(model, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == overrides["arch"] and cfg["tie_word_embeddings"] == model.config.tie_embeddings
    torch.testing.assert_close(_hf_logits(out, ids), ref, rtol=1e-5, atol=1e-5)
    # ... and Muse reads its own export back, except HF llama's attention_bias, which also puts a
    # bias on o_proj (Muse's qkv_bias covers q/k/v only).
    if overrides["arch"] == "llama" and overrides.get("qkv_bias"):
        return
    with torch.no_grad():
        torch.testing.assert_close(muse.load(out, precision="fp32").model(ids)[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [o for o in TINY_VARIANTS if not (o["arch"] == "llama" and o.get("qkv_bias"))],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_gguf_export_round_trips(tmp_path, overrides):
    model = _tiny(**overrides)
    ids = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        ref, _ = model(ids)
        f32 = muse.load(export_gguf(model, tmp_path / "m-f32.gguf", dtype="f32", tokenizer=False), precision="fp32")
        torch.testing.assert_close(f32.model(ids)[0], ref, rtol=1e-6, atol=1e-6)
        q8 = export_gguf(model, tmp_path / "m-q8.gguf", dtype="q8_0", tokenizer=False)
        got = muse.load(q8).model(ids)[0]  # kept as lossless int8 codes by the loader
    torch.testing.assert_close(got, ref, rtol=0, atol=0.03)
    f16 = export_gguf(model, tmp_path / "m-f16.gguf", dtype="f16", tokenizer=False)
    assert q8.stat().st_size < f16.stat().st_size < (tmp_path / "m-f32.gguf").stat().st_size


def test_lora_model_exports_with_adapters_folded_in(tmp_path):
    model = _tiny()
    apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.normal_(0, 0.05)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref, _ = model(ids)
    torch.testing.assert_close(_hf_logits(export_hf(model, tmp_path / "hf"), ids), ref, rtol=1e-5, atol=1e-5)
    assert lora_layers(model)  # exporting did not modify the model


def test_export_errors(tmp_path):
    model = _tiny()
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_gguf(model, tmp_path / "m.gguf", dtype="q4_k")
    with pytest.raises(ExportError, match="no tokenizer.*tokenizer=False"):
        export_gguf(model, tmp_path / "m.gguf")
    with pytest.raises(ExportError, match="llama model with biases"):
        export_gguf(_tiny(qkv_bias=True), tmp_path / "m.gguf", tokenizer=False)
    with pytest.raises(ExportError, match="norm='rmsnorm'"):
        export_hf(Transformer(ModelConfig.from_name("tiny", arch="gpt2", n_kv_head=4, norm="rmsnorm")),
                  tmp_path / "hf")
    with pytest.raises(ValueError, match="model_or_path must be"):
        export_hf(42, tmp_path / "hf")
    assert not any(tmp_path.iterdir())  # nothing half-written


# ----------------------------------------------------------------------------- the default model

@pytest.fixture(scope="module")
def default_fp32(model_cache):
    return muse.load(precision="fp32")


@pytest.mark.slow
def test_default_model_hf_export(tmp_path, default_fp32):
    ids = torch.tensor([default_fp32.tokenizer.encode(CHAT)])
    with torch.no_grad():
        ref, _ = default_fp32.model(ids)
    out = export_hf(default_fp32, tmp_path / "hf")
    torch.testing.assert_close(_hf_logits(out, ids), ref, rtol=1e-5, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok(CHAT)["input_ids"] == ids[0].tolist()
    gen = json.loads((out / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted(default_fp32.tokenizer.eos_ids)


@pytest.mark.slow
def test_quantized_default_model_is_dequantized_for_export(tmp_path, default_model):
    """The bundled model loads as Q4_1 codes; the export holds exactly those weights in fp32."""
    assert default_model.info["quantization"]
    ids = torch.tensor([default_model.tokenizer.encode(CHAT)])
    with torch.no_grad():
        ref, _ = default_model.model(ids)
    torch.testing.assert_close(_hf_logits(export_hf(default_model, tmp_path / "hf"), ids), ref, rtol=1e-4, atol=2e-3)


@pytest.mark.slow
def test_default_model_gguf_export(tmp_path, default_fp32):
    ids = torch.tensor([default_fp32.tokenizer.encode(CHAT)])
    with torch.no_grad():
        ref, _ = default_fp32.model(ids)
    path = export_gguf(default_fp32, tmp_path / "smol.gguf", dtype="f32")
    back = muse.load(path, precision="fp32")
    assert back.tokenizer.encode(CHAT) == ids[0].tolist()
    assert back.tokenizer.eos_ids == default_fp32.tokenizer.eos_ids
    assert back.tokenizer.chat_template == default_fp32.tokenizer.chat_template
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids)[0], ref, rtol=0, atol=0)
    # transformers' own GGUF reader (llama arch, byte-level BPE "smollm" pre-tokenizer) agrees.
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert tok(CHAT)["input_ids"] == ids[0].tolist()
    torch.testing.assert_close(_hf_logits(tmp_path, ids, gguf_file=path.name), ref, rtol=1e-5, atol=1e-4)
