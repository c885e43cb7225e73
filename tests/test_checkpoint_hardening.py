"""Broken and hostile checkpoints: every one gives a `CheckpointError` that names the problem.

Each crafted checkpoint is built here from a tiny valid one (written with Muse's own
exporters, so the valid case loads and matches), then damaged one way: config.json
types and ranges, deep or huge JSON, tensor names/shapes/dtypes, shard indexes that point
outside the model folder, pickles, safetensors and GGUF headers that lie about sizes.
A seeded fuzz of byte flips and truncations checks that nothing else ever escapes.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import muse
from muse.checkpoints import read_config
import muse.checkpoints.files as files
import muse.model
from muse.checkpoints.files import PICKLE_HINT
from muse.config import ModelConfig
from muse.errors import CheckpointError
from muse.export import export_hf, gguf_tensors
from muse.model import KVCache, Transformer, rope_cache

gguf = pytest.importorskip("gguf")

CFG = ModelConfig(arch="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                  intermediate_size=64, block_size=64, norm_eps=1e-5, tie_embeddings=False)
GPT2 = ModelConfig(arch="gpt2", vocab_size=64, n_layer=2, n_head=4, n_embd=32, block_size=64)


def _model(config: ModelConfig = CFG, seed: int = 0) -> Transformer:
    return Transformer(config).init_weights(seed).eval()


def _logits(model, n: int = 12) -> torch.Tensor:
    ids = torch.arange(n)[None] % model.config.vocab_size
    with torch.no_grad():
        return model(ids)[0]


def _hf_dir(tmp_path: Path, config: ModelConfig = CFG, name: str = "hf") -> tuple[Path, Transformer]:
    model = _model(config)
    return export_hf(model, tmp_path / name), model


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _write_gguf(path: Path, model: Transformer, meta=None, tensors=None, drop=(), raw=None) -> Path:
    """A GGUF of `model` (f32) with llama.cpp names; `meta` key → value overrides the metadata
    (None drops a key), `tensors` edits the name → array dict, `raw` adds (name, bytes, type)."""
    c = model.config
    arch = c.arch
    values = {
        f"{arch}.context_length": c.block_size, f"{arch}.embedding_length": c.n_embd,
        f"{arch}.block_count": c.n_layer, f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.n_head, f"{arch}.attention.head_count_kv": c.n_kv_head,
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.norm_eps), f"{arch}.rope.freq_base": float(c.rope_theta),
        f"{arch}.vocab_size": c.vocab_size,
    }
    values.update(meta or {})
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint64(key, value) if value >= 1 << 32 else w.add_uint32(key, value)
    arrays = {k: v.float().numpy() for k, v in gguf_tensors(model.state_dict(), c).items() if k not in drop}
    if tensors:
        tensors(arrays)
    for name, arr in arrays.items():
        w.add_tensor(name, np.ascontiguousarray(arr))
    for name, data, qtype in raw or ():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ----------------------------------------------------------------------------- valid checkpoints


@pytest.mark.parametrize("config", [CFG, GPT2], ids=["llama", "gpt2"])
def test_valid_checkpoints_still_load_exactly(tmp_path, config):
    path, model = _hf_dir(tmp_path, config)
    torch.testing.assert_close(_logits(muse.load(path, precision="fp32").model), _logits(model))
    gguf_path = _write_gguf(tmp_path / "m.gguf", model) if config.arch == "llama" else None
    if gguf_path:
        torch.testing.assert_close(_logits(muse.load(gguf_path, precision="fp32").model), _logits(model))
    muse_dir = muse.save_checkpoint(tmp_path / "muse", model)
    torch.testing.assert_close(_logits(muse.load(muse_dir).model), _logits(model), rtol=0, atol=0)


# ----------------------------------------------------------------------------- config.json


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _drop(key):
    return lambda d: d.pop(key)


CONFIG_EDITS = {
    "missing hidden_size": (_drop("hidden_size"), r"lacks the field 'hidden_size'"),
    "hidden_size a string": (_set("hidden_size", "32"), r"hidden_size must be a positive integer, got '32'"),
    "layers a bool": (_set("num_hidden_layers", True), r"num_hidden_layers must be a positive integer"),
    "negative vocab": (_set("vocab_size", -1), r"vocab_size must be a positive integer, got -1"),
    "float width": (_set("intermediate_size", 64.0), r"intermediate_size must be a positive integer"),
    "heads a list": (_set("num_attention_heads", [4, 4]), r"num_attention_heads must be a positive integer"),
    "a billion layers": (_set("num_hidden_layers", 10**9), r"num_hidden_layers is 1,000,000,000, more than the 1,024"),
    "2^31 context": (_set("max_position_embeddings", 2**31), r"max_position_embeddings is 2,147,483,648, more than"),
    "2^63 vocab": (_set("vocab_size", 2**63), r"vocab_size is .*, more than"),
    "eps a string": (_set("rms_norm_eps", "small"), r"rms_norm_eps must be a positive number"),
    "theta zero": (_set("rope_theta", 0), r"rope_theta must be a positive number"),
    "tie a string": (_set("tie_word_embeddings", "false"), r"tie_word_embeddings must be true or false"),
    "bias a number": (_set("attention_bias", 1), r"attention_bias must be true or false"),
    "rope scaling a list": (lambda d: (d.pop("rope_parameters"), d.__setitem__("rope_scaling", [1]))[0],
                            r"rope_scaling must be an object"),
    "rope scaling yarn": (_set("rope_parameters", {"rope_type": "yarn"}), r"RoPE scaling 'yarn' is not supported"),
    "model_type a list": (_set("model_type", ["llama"]), r"model_type \['llama'\] is not supported"),
    "heads do not divide width": (_set("num_attention_heads", 3),
                                  r"n_head \(3\) must be a multiple of n_kv_head|divisible"),
    "kv heads do not divide heads": (_set("num_key_value_heads", 3), r"must be a multiple of n_kv_head \(3\)"),
    "odd head_dim": (_set("head_dim", 7), r"head_dim must be even"),
}


@pytest.mark.parametrize("edit,message", CONFIG_EDITS.values(), ids=CONFIG_EDITS.keys())
def test_bad_config_values_are_named(tmp_path, edit, message):
    path, _ = _hf_dir(tmp_path)
    _edit_json(path / "config.json", edit)
    with pytest.raises(CheckpointError, match=message) as e:
        muse.load(path)
    assert "config.json" in str(e.value)
    with pytest.raises(CheckpointError, match=message):
        read_config(path)  # reading the config alone is as strict


DEEP = 100_000
CONFIG_TEXTS = {
    "a list": ("[1, 2, 3]", r"must hold a JSON object, but holds a list"),
    "a string": ('"llama"', r"must hold a JSON object, but holds a str"),
    "null": ("null", r"must hold a JSON object"),
    "deep arrays": ('{"model_type": "llama", "x": ' + "[" * DEEP + "]" * DEEP + "}", r"nested too deeply"),
    "deep objects": ('{"a": ' * DEEP + "1" + "}" * DEEP, r"nested too deeply"),
    "deep but parseable": ('{"model_type": "llama", "x": ' + "[" * 200 + "]" * 200 + "}", r"nests more than 64"),
    "NaN": ('{"model_type": "llama", "rms_norm_eps": NaN}', r"not valid JSON .*NaN"),
    "Infinity": ('{"model_type": "llama", "rope_theta": Infinity}', r"not valid JSON"),
    "5000-digit number": ('{"model_type": "llama", "vocab_size": ' + "9" * 5000 + "}", r"not valid JSON"),
    "truncated": ('{"model_type": "llama", "vocab', r"not valid JSON"),
}


@pytest.mark.parametrize("text,message", CONFIG_TEXTS.values(), ids=CONFIG_TEXTS.keys())
def test_malformed_config_json(tmp_path, text, message):
    path, _ = _hf_dir(tmp_path)
    (path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        muse.load(path)


def test_config_json_that_is_not_utf8_or_too_large(tmp_path, monkeypatch):
    path, _ = _hf_dir(tmp_path)
    (path / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        muse.load(path)
    monkeypatch.setattr(files, "MAX_CONFIG_BYTES", 1000)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "pad": "x" * 2000}))
    with pytest.raises(CheckpointError, match=r"config.json is 2,0\d\d bytes, more than the 1,000"):
        muse.load(path)


def test_model_config_itself_refuses_bad_types_and_sizes():
    for kw, message in [
        (dict(block_size=2**31), r"block_size is 2,147,483,648, above the 16,777,216"),
        (dict(n_embd="64"), r"n_embd must be a positive integer, got '64'"),
        (dict(n_layer=10**6), r"n_layer is 1,000,000, above"),
        (dict(norm_eps="1e-5"), r"norm_eps must be a finite number"),
        (dict(rope_theta=float("inf")), r"rope_theta must be a finite number"),
        (dict(tie_embeddings="no"), r"tie_embeddings must be true or false"),
    ]:
        with pytest.raises(ValueError, match=message):
            ModelConfig(**{**CFG.to_dict(), **kw})
    with pytest.raises(ValueError, match="must be a mapping"):
        ModelConfig.from_dict([("n_layer", 2)])


# ----------------------------------------------------------------------------- context length / RoPE


def test_huge_context_is_refused_and_a_long_real_one_allocates_little(tmp_path):
    path, model = _hf_dir(tmp_path)
    _edit_json(path / "config.json", _set("max_position_embeddings", 2**31))
    with pytest.raises(CheckpointError, match=r"max_position_embeddings is 2,147,483,648.*16,777,216"):
        muse.load(path)
    # Llama 3's real context: loads, and the RoPE tables cover only what is used so far
    _edit_json(path / "config.json", _set("max_position_embeddings", 131072))
    loaded = muse.load(path, precision="fp32").model
    assert loaded.config.block_size == 131072
    assert loaded.rope_cos.shape[0] <= muse.model.ROPE_TABLE_START
    torch.testing.assert_close(_logits(loaded), _logits(model))
    # even the largest context Muse accepts costs nothing up front
    big = Transformer(ModelConfig(**{**CFG.to_dict(), "block_size": 1 << 24}))
    assert big.rope_cos.shape == (muse.model.ROPE_TABLE_START, CFG.head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_grow_to_exactly_the_full_tables(monkeypatch, dtype):
    monkeypatch.setattr(muse.model, "ROPE_TABLE_START", 4)
    grown = _model().to(dtype)
    assert grown.rope_cos.shape[0] == 4
    full = _model().to(dtype)  # the same weights with the whole table up front, as before
    cos, sin = rope_cache(CFG)
    full.rope_cos, full.rope_sin = cos.to(dtype), sin.to(dtype)
    ids = torch.arange(20)[None] % CFG.vocab_size

    def run(model):  # a prefill, then one token at a time past each table size
        cache = KVCache(CFG, 1, 20, dtype=dtype)
        with torch.no_grad():
            steps = [model(ids[:, :3], cache=cache)[0]] + [model(ids[:, i:i + 1], cache=cache)[0]
                                                           for i in range(3, 20)]
        return torch.cat(steps, 1)

    torch.testing.assert_close(run(grown), run(full), rtol=0, atol=0)
    assert grown.rope_cos.shape[0] == 32 and grown.rope_cos.dtype == dtype  # 4 → 8 → 16 → 32
    torch.testing.assert_close(grown.rope_cos, full.rope_cos[:32], rtol=0, atol=0)
    with torch.no_grad():
        grown(torch.zeros(1, 64, dtype=torch.long))  # the whole context: grows to block_size, no further
    assert grown.rope_cos.shape[0] == 64


# ----------------------------------------------------------------------------- tensors


def _rename(old, new):
    return lambda t: t.__setitem__(new, t.pop(old))


TENSOR_EDITS = {
    "missing norm": (lambda t: t.pop("model.norm.weight"), r"missing tensors: model.norm.weight"),
    "missing one of q/k/v": (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
                             r"missing tensors: model.layers.1.self_attn.k_proj.weight"),
    "extra layer": (lambda t: t.__setitem__("model.layers.2.input_layernorm.weight", torch.ones(32)),
                    r"unexpected tensors: model.layers.2.input_layernorm.weight"),
    "unknown tensor": (lambda t: t.__setitem__("score.weight", torch.ones(2, 32)), r"unexpected tensors: score.weight"),
    "layer index not a number": (_rename("model.layers.0.mlp.up_proj.weight", "model.layers.x.mlp.up_proj.weight"),
                                 r"missing tensors: model.layers.0.mlp.up_proj.weight; "
                                 r"unexpected tensors: model.layers.x.mlp.up_proj.weight"),
    "q rows wrong": (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight", torch.ones(31, 32)),
                     r"wrong shapes: model.layers.0.self_attn.q_proj.weight is \[31, 32\], expected \[32, 32\]"),
    "transposed": (lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight", torch.ones(64, 32)),
                   r"mlp.down_proj.weight is \[64, 32\], expected \[32, 64\]"),
    "vocab off by one": (lambda t: t.__setitem__("model.embed_tokens.weight", torch.ones(65, 32)),
                         r"model.embed_tokens.weight is \[65, 32\], expected \[64, 32\]"),
    "norm is a matrix": (lambda t: t.__setitem__("model.norm.weight", torch.ones(1, 32)),
                         r"model.norm.weight is \[1, 32\], expected \[32\]"),
    "scalar": (lambda t: t.__setitem__("model.norm.weight", torch.tensor(1.0)), r"model.norm.weight is \[\]"),
    "integer weights": (lambda t: t.__setitem__("model.norm.weight", torch.ones(32, dtype=torch.int8)),
                        r"unsupported dtypes .*: model.norm.weight is I8"),
    "bool weights": (lambda t: t.__setitem__("lm_head.weight", torch.ones(64, 32, dtype=torch.bool)),
                     r"lm_head.weight is BOOL"),
}


@pytest.mark.parametrize("edit,message", TENSOR_EDITS.values(), ids=TENSOR_EDITS.keys())
def test_tensor_names_shapes_and_dtypes_are_checked_before_loading(tmp_path, monkeypatch, edit, message):
    path, _ = _hf_dir(tmp_path)
    _edit_tensors(path / "model.safetensors", edit)
    read = []
    real_get = files.SafetensorsFile.get
    monkeypatch.setattr(files.SafetensorsFile, "get", lambda self, name: read.append(name) or real_get(self, name))
    with pytest.raises(CheckpointError, match=message) as e:
        muse.load(path)
    assert str(path) in str(e.value) and "does not match its config" in str(e.value)
    assert read == []  # refused from the headers: no tensor data was read


def test_float16_and_bfloat16_weights_load(tmp_path):
    path, model = _hf_dir(tmp_path)
    _edit_tensors(path / "model.safetensors", lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    out = _logits(muse.load(path, precision="fp32").model)
    torch.testing.assert_close(out, _logits(model), rtol=0.05, atol=0.05)


def test_derived_buffers_in_old_checkpoints_are_ignored(tmp_path):
    path, model = _hf_dir(tmp_path)
    _edit_tensors(path / "model.safetensors", lambda t: t.update(
        {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(2)}))
    torch.testing.assert_close(_logits(muse.load(path, precision="fp32").model), _logits(model))


# ----------------------------------------------------------------------------- sharded index and paths


def _shard(path: Path, parts: int = 2) -> dict[str, str]:
    """Split model.safetensors into `parts` shards with an index; returns the weight map."""
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[i::parts]}
        save_file(chunk, str(path / file))
        weight_map.update(dict.fromkeys(chunk, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _index(path: Path, edit) -> None:
    _edit_json(path / "model.safetensors.index.json", edit)


INDEX_EDITS = {
    "no weight_map": (lambda d: d.pop("weight_map"), r"has no weight_map"),
    "weight_map a list": (_set("weight_map", ["model-00001-of-00002.safetensors"]), r"has no weight_map"),
    "weight_map empty": (_set("weight_map", {}), r"has no weight_map"),
    "file name a number": (lambda d: d["weight_map"].__setitem__("model.norm.weight", 7),
                           r"weight_map must map tensor names to file names; got 'model.norm.weight': 7"),
    "missing shard": (lambda d: d["weight_map"].__setitem__("model.norm.weight", "model-00009.safetensors"),
                      r"model-00009.safetensors is listed in model.safetensors.index.json but missing"),
    "pickle shard": (lambda d: d["weight_map"].__setitem__("model.norm.weight", "pytorch_model-00001.bin"),
                     r"lists 'pytorch_model-00001.bin', which is not a .safetensors file"),
    "tensor not in its shard": (lambda d: d["weight_map"].__setitem__("model.extra.weight",
                                                                      "model-00001-of-00002.safetensors"),
                                r"lists tensors its shards do not hold: model.extra.weight"),
}


@pytest.mark.parametrize("edit,message", INDEX_EDITS.values(), ids=INDEX_EDITS.keys())
def test_bad_shard_indexes(tmp_path, edit, message):
    path, model = _hf_dir(tmp_path)
    _shard(path)
    torch.testing.assert_close(_logits(muse.load(path, precision="fp32").model), _logits(model))
    _index(path, edit)
    with pytest.raises(CheckpointError, match=message):
        muse.load(path)


def test_index_that_is_not_an_object_or_too_large(tmp_path, monkeypatch):
    path, _ = _hf_dir(tmp_path)
    weight_map = _shard(path)
    (path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="index.json must hold a JSON object"):
        muse.load(path)
    (path / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        muse.load(path)
    monkeypatch.setattr("muse.checkpoints.hf.MAX_INDEX_BYTES", 100)
    _write_index(path, weight_map)
    with pytest.raises(CheckpointError, match="more than the 100"):
        muse.load(path)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    path, _ = _hf_dir(tmp_path)
    _shard(path)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        _edit_tensors(path / shard, lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' is in both model-0000\d"):
        muse.load(path)


@pytest.fixture
def opened(monkeypatch):
    """Every path opened through open()/io.open()/safetensors.safe_open, resolved."""
    import safetensors

    seen: list[Path] = []
    real_open, real_safe_open = builtins.open, safetensors.safe_open

    def spy(real):
        def wrapper(file, *a, **k):
            if isinstance(file, (str, os.PathLike)):
                seen.append(Path(file).resolve())
            return real(file, *a, **k)
        return wrapper

    monkeypatch.setattr(builtins, "open", spy(real_open))
    monkeypatch.setattr(io, "open", spy(real_open))
    monkeypatch.setattr(safetensors, "safe_open", spy(real_safe_open))
    return seen


@pytest.mark.parametrize("where", ["../outside.safetensors", "{abs}", "sub/../../outside.safetensors",
                                   "..\\outside.safetensors", "C:\\outside.safetensors"])
def test_index_paths_outside_the_model_folder_are_refused_unopened(tmp_path, opened, where):
    path, _ = _hf_dir(tmp_path)
    weight_map = _shard(path, parts=1)
    outside = tmp_path / "outside.safetensors"
    (path / "model-00001-of-00001.safetensors").rename(outside)  # a valid shard: loading it would work
    target = where.format(abs=outside)
    _index(path, _set("weight_map", dict.fromkeys(weight_map, target)))
    opened.clear()
    with pytest.raises(CheckpointError, match="points outside the model directory"):
        muse.load(path)
    assert outside.resolve() not in opened


def test_symlinks_out_of_the_model_folder_are_refused_unopened(tmp_path, opened):
    path, _ = _hf_dir(tmp_path)
    outside = tmp_path / "elsewhere" / "weights.safetensors"
    outside.parent.mkdir()
    names = list(load_file(str(path / "model.safetensors")))
    (path / "model.safetensors").rename(outside)
    (path / "model.safetensors").symlink_to(outside)
    opened.clear()
    with pytest.raises(CheckpointError, match=r"is a link to .*outside the model directory"):
        muse.load(path)
    assert outside.resolve() not in opened
    # the same file as the shard of an index
    (path / "model.safetensors").unlink()
    (path / "shard.safetensors").symlink_to(Path("..") / "elsewhere" / outside.name)
    _write_index(path, dict.fromkeys(names, "shard.safetensors"))
    opened.clear()
    with pytest.raises(CheckpointError, match="outside the model directory"):
        muse.load(path)
    assert outside.resolve() not in opened
    # and config.json itself
    config = outside.parent / "config.json"
    (path / "config.json").rename(config)
    (path / "config.json").symlink_to(config)
    opened.clear()
    with pytest.raises(CheckpointError, match=r"config.json is a link to .*outside the model directory"):
        muse.load(path)
    assert config.resolve() not in opened


def _write_index(path: Path, weight_map: dict[str, str]) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("name", ["model.safetensors", "model.safetensors.index.json"])
def test_fifos_and_directories_are_refused_without_blocking(tmp_path, name):
    import threading
    import time

    path, _ = _hf_dir(tmp_path)
    (path / "model.safetensors").unlink()
    os.mkfifo(path / name)  # opening it for reading would wait for a writer forever

    def unblock():  # should a reader be stuck on the FIFO, end its wait so the test fails instead of hanging
        time.sleep(5)
        try:
            os.close(os.open(path / name, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader (ENXIO), or the FIFO is gone: nothing was stuck
            pass

    threading.Thread(target=unblock, daemon=True).start()
    with pytest.raises(CheckpointError, match=f"{name} is not a regular file"):
        muse.load(path)
    (path / name).unlink()
    (path / name).mkdir()
    with pytest.raises(CheckpointError, match=f"{name} is not a regular file"):
        muse.load(path)


def test_hugging_face_cache_layout_still_loads(tmp_path):
    """models--x/snapshots/<rev>/<file> are links to ../../blobs/<sha>: that layout is allowed."""
    src, model = _hf_dir(tmp_path)
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"sha{i}"
        f.rename(blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    torch.testing.assert_close(_logits(muse.load(snap, precision="fp32").model), _logits(model))


# ----------------------------------------------------------------------------- pickles


def test_pickled_weights_are_refused_with_how_to_convert(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was unpickled"))
    path, model = _hf_dir(tmp_path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    for target in (path, path / "pytorch_model.bin"):
        with pytest.raises(CheckpointError) as e:
            muse.load(target)
        text = str(e.value)
        assert "pickle" in text and "safe_serialization=True" in text and "safetensors" in text
        assert "weights_only" not in text
    (path / "pytorch_model.bin").rename(path / "weights.pt")
    with pytest.raises(CheckpointError, match=r"PyTorch pickle \(weights.pt\)"):
        muse.load(path)
    assert "weights_only" not in PICKLE_HINT


# ----------------------------------------------------------------------------- safetensors files


def _header(n: int, body: bytes = b"") -> bytes:
    return struct.pack("<Q", n) + body


def _st(header: dict, data: bytes = b"") -> bytes:
    body = json.dumps(header).encode()
    return _header(len(body), body) + data


SAFETENSORS_BYTES = {
    "empty": (b"", r"only 0 bytes long"),
    "three bytes": (b"abc", r"only 3 bytes long"),
    "huge header length": (_header(1 << 40, b"{}"), r"header claims 1,099,511,627,776 bytes \(at most"),
    "header longer than file": (_header(1000, b"{}"), r"header claims 1,000 bytes but the file has 10"),
    "header not JSON": (_header(4, b"abcd"), r"header is not a JSON object"),
    "header broken JSON": (_header(4, b"{abc"), r"corrupt or truncated"),
    "header a list of tensors": (_header(2, b"{]"), r"corrupt or truncated"),
    "offsets past the end": (_st({"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}),
                             r"corrupt or truncated"),
    "shape and size disagree": (_st({"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 4]}},
                                    b"\0" * 4), r"corrupt or truncated"),
    "unknown dtype": (_st({"model.norm.weight": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
                      r"corrupt or truncated"),
    "2^62 elements": (_st({"model.norm.weight": {"dtype": "F32", "shape": [1 << 31, 1 << 31],
                                                 "data_offsets": [0, 4]}}, b"\0" * 4), r"corrupt or truncated"),
}


@pytest.mark.parametrize("data,message", SAFETENSORS_BYTES.values(), ids=SAFETENSORS_BYTES.keys())
def test_broken_safetensors_files(tmp_path, data, message):
    path, _ = _hf_dir(tmp_path)
    (path / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=message) as e:
        muse.load(path)
    assert "model.safetensors" in str(e.value)


# ----------------------------------------------------------------------------- Muse's own format


MUSE_EDITS = {
    "model a list": (_set("model", [1, 2]), r"model must be a JSON object"),
    "model missing": (_drop("model"), r"has no model section"),
    "model bad field": (lambda d: d["model"].update(n_layer="2"), r"n_layer must be a positive integer"),
    "model unknown field": (lambda d: d["model"].update(layers=2), r"unknown model config field"),
    "version a string": (_set("format_version", "1"), r"format_version must be an integer"),
    "newer version": (_set("format_version", 99), r"newer Muse"),
    "dtype a list": (_set("dtype", []), r"dtype must be a JSON string"),
    "quantization a list": (_set("quantization", [1]), r"quantization must be a JSON object"),
    "quantized unknown layer": (_set("quantization", {"layers.9.attn.qkv": {"bits": 8, "group_size": 32}}),
                                r"names 'layers.9.attn.qkv', which is not a linear layer"),
    "quantization bits a string": (_set("quantization", {"layers.0.attn.qkv": {"bits": "8", "group_size": 32}}),
                                   r"must give integer bits and group_size"),
    "quantization bad group": (_set("quantization", {"layers.0.attn.qkv": {"bits": 8, "group_size": 7}}),
                               r"group_size=7 must be a positive divisor"),
}


@pytest.mark.parametrize("edit,message", MUSE_EDITS.values(), ids=MUSE_EDITS.keys())
def test_bad_muse_checkpoints(tmp_path, edit, message):
    out = muse.save_checkpoint(tmp_path / "ckpt", _model())
    _edit_json(out / "config.json", edit)
    with pytest.raises(CheckpointError, match=message):
        muse.load(out)


def test_muse_config_that_is_a_list_is_not_taken_for_one(tmp_path):
    out = muse.save_checkpoint(tmp_path / "ckpt", _model())
    (out / "config.json").write_text(json.dumps([{"format": "muse"}]))
    with pytest.raises(CheckpointError, match=r"config.json must hold a JSON object, but holds a list"):
        muse.load(out)


def test_muse_checkpoint_with_wrong_tensor_shapes(tmp_path):
    out = muse.save_checkpoint(tmp_path / "ckpt", _model())
    _edit_tensors(out / "model.safetensors", lambda t: t.__setitem__("norm_f.weight", torch.ones(33)))
    with pytest.raises(CheckpointError, match=r"wrong shapes: norm_f.weight is \[33\], expected \[32\]"):
        muse.load(out)
    _edit_tensors(out / "model.safetensors", lambda t: t.pop("norm_f.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: norm_f.weight"):
        muse.load(out)


def test_quantized_muse_checkpoint_with_wrong_code_dtype(tmp_path):
    model = muse.load(_write_gguf(tmp_path / "m.gguf", _model()), precision="int8")
    out = muse.save_checkpoint(tmp_path / "q", model.model, None, model.info["quantization"])
    _edit_tensors(out / "model.safetensors", lambda t: t.__setitem__(
        "layers.0.attn.qkv.qweight", t["layers.0.attn.qkv.qweight"].float()))
    with pytest.raises(CheckpointError, match=r"wrong dtypes: layers.0.attn.qkv.qweight is float32, expected int8"):
        muse.load(out)


def test_adapter_config_with_a_bad_model_section(tmp_path):
    from muse.lora import ADAPTER_CONFIG, ADAPTER_FORMAT

    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"format": ADAPTER_FORMAT, "rank": 4, "alpha": 8,
                                                       "modules": [], "model": [1, 2]}))
    with pytest.raises(CheckpointError, match="adapter_config.json has no valid model section"):
        read_config(tmp_path)


# ----------------------------------------------------------------------------- GGUF metadata and tensors


GGUF_META = {
    "block count a string": ({"llama.block_count": "2"}, r"llama.block_count must be a positive integer, got '2'"),
    "head count per layer": ({"llama.attention.head_count": [4, 4]},
                             r"llama.attention.head_count must be a positive integer, got an array of 2 values"),
    "no context length": ({"llama.context_length": None}, r"lacks the field 'llama.context_length'"),
    "2^31 context": ({"llama.context_length": 2**31},
                     r"llama.context_length is 2,147,483,648, more than the 16,777,216"),
    "no norm eps": ({"llama.attention.layer_norm_rms_epsilon": None},
                    r"lacks the field 'llama.attention.layer_norm_epsilon'"),
    "zero width": ({"llama.embedding_length": 0}, r"llama.embedding_length must be a positive integer, got 0"),
    "heads mismatch": ({"llama.attention.head_count_kv": 3}, r"multiple of n_kv_head \(3\)"),
    "wider than the weights": ({"llama.embedding_length": 64},
                               r"wrong shapes: blk.0.attn_k.weight is \[16, 32\], expected \[32, 64\]"),
    "scaled rope": ({"llama.rope.scaling.type": "yarn"}, r"RoPE scaling 'yarn' is not supported"),
}


@pytest.mark.parametrize("meta,message", GGUF_META.values(), ids=GGUF_META.keys())
def test_bad_gguf_metadata(tmp_path, meta, message):
    path = _write_gguf(tmp_path / "m.gguf", _model(), meta=meta)
    with pytest.raises(CheckpointError, match=message) as e:
        muse.load(path)
    assert str(path) in str(e.value)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "t5.gguf"
    w = gguf.GGUFWriter(str(path), "t5")
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="architecture 't5' is not supported"):
        muse.load(path)


def _q8_1_bytes(rows: int, cols: int) -> np.ndarray:
    return np.zeros((rows, cols // 32 * 40), np.uint8)


GGUF_TENSORS = {
    "missing tensor": (dict(drop=("blk.1.ffn_norm.weight",)), r"missing tensors: blk.1.ffn_norm.weight"),
    "missing k": (dict(drop=("blk.0.attn_k.weight",)), r"missing tensors: blk.0.attn_k.weight"),
    "extra layer": (dict(raw=[("blk.7.attn_norm.weight", np.ones(32, np.float32), None)]),
                    r"unexpected tensors: blk.7.attn_norm.weight"),
    "name without layer": (dict(raw=[("blk.attn", np.ones(32, np.float32), None)]), r"unexpected tensors: blk.attn"),
    "q rows wrong": (dict(tensors=lambda t: t.__setitem__("blk.0.attn_q.weight", np.ones((30, 32), np.float32))),
                     r"wrong shapes: blk.0.attn_q.weight is \[30, 32\], expected \[32, 32\]"),
    "3-D tensor": (dict(tensors=lambda t: t.__setitem__("output_norm.weight", np.ones((1, 1, 32), np.float32))),
                   r"output_norm.weight is \[1, 1, 32\], expected \[32\]"),
    "integer weights": (dict(tensors=lambda t: t.__setitem__("output_norm.weight", np.ones(32, np.int32))),
                        r"unsupported dtypes .*output_norm.weight is I32"),
    "undecodable block type": (dict(drop=("output.weight",), raw=[("output.weight", _q8_1_bytes(64, 32),
                                                                   gguf.GGMLQuantizationType.Q8_1)]),
                               r"output.weight is stored as Q8_1, which Muse cannot decode"),
}


@pytest.mark.parametrize("kw,message", GGUF_TENSORS.values(), ids=GGUF_TENSORS.keys())
def test_bad_gguf_tensors(tmp_path, kw, message):
    path = _write_gguf(tmp_path / "m.gguf", _model(), **kw)
    with pytest.raises(CheckpointError, match=message):
        muse.load(path)


GGUF_TOKENIZERS = {
    "merges not in the vocabulary": {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                                     "tokenizer.ggml.tokens": ["a", "b"],
                                     "tokenizer.ggml.merges": ["a b c d"]},
    "tokens that are numbers": {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                                "tokenizer.ggml.tokens": [1, 2, 3],
                                "tokenizer.ggml.merges": ["a b"]},
}


@pytest.mark.parametrize("meta", GGUF_TOKENIZERS.values(), ids=GGUF_TOKENIZERS.keys())
def test_bad_gguf_tokenizer_metadata(tmp_path, meta):
    path = _write_gguf(tmp_path / "m.gguf", _model(), meta=meta)
    with pytest.raises(CheckpointError, match=r"m.gguf.*(tokenizer|merges)"):
        muse.load(path)


TOKENIZER_FILES = {
    "eos list a number": ("tokenizer_config.json", json.dumps({"muse_eos_tokens": 5})),
    "eos token a list": ("tokenizer_config.json", json.dumps({"eos_token": ["x"]})),
    "eos id a string": ("generation_config.json", json.dumps({"eos_token_id": ["x"]})),
    "deep JSON": ("tokenizer_config.json", "[" * DEEP + "]" * DEEP),
    "templates not objects": ("tokenizer_config.json", json.dumps({"chat_template": [1]})),
    "tokenizer.json a list": ("tokenizer.json", "[]"),
}


@pytest.mark.parametrize("name,text", TOKENIZER_FILES.values(), ids=TOKENIZER_FILES.keys())
def test_bad_tokenizer_files(tmp_path, name, text):
    from muse.training.data import char_tokenizer

    path, _ = _hf_dir(tmp_path)
    char_tokenizer("abc").save(path)
    assert muse.load(path).tokenizer.vocab_size == 3
    (path / name).write_text(text)
    with pytest.raises(CheckpointError, match=name if name == "tokenizer.json" else r"tokenizer is unusable|JSON"):
        muse.load(path)


# ----------------------------------------------------------------------------- GGUF headers that lie


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


ARCH = _kv("general.architecture", 8, _s("llama"))


def _raw_gguf(kvs=(ARCH,), tensors=(), counts=None, version=3, data=b"") -> bytes:
    n_tensors, n_kv = counts or (len(tensors), len(kvs))
    out = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs)
    for name, dims, ttype, offset in tensors:
        out += _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)
    return out + b"\0" * (-len(out) % 32) + data


def _tensor(name="token_embd.weight", dims=(32, 64), ttype=0, offset=0):
    return (name, dims, ttype, offset)


RAW_GGUF = {
    "2^40 tensors": (_raw_gguf(counts=(1 << 40, 1)), r"claims 1,099,511,627,776 tensors"),
    "2^40 keys": (_raw_gguf(counts=(0, 1 << 40)), r"1,099,511,627,776 metadata keys"),
    "more keys than the file holds": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1000) + ARCH,
                                      r"a metadata key at byte 69 runs past the end of the file"),
    "key of 2^60 bytes": (_raw_gguf(kvs=[struct.pack("<Q", 1 << 60)]), r"a metadata key claims .* bytes"),
    "string value of 2^40 bytes": (_raw_gguf(kvs=[_kv("general.name", 8, struct.pack("<Q", 1 << 40))]),
                                   r"the value of general.name claims 1,099,511,627,776 bytes"),
    "array of 2^40 bytes": (_raw_gguf(kvs=[ARCH, _kv("x", 9, struct.pack("<IQ", 0, 1 << 40))]),
                            r"the array x claims 1,099,511,627,776 elements"),
    "array past the end": (_raw_gguf(kvs=[ARCH, _kv("x", 9, struct.pack("<IQ", 4, 1 << 19))]),
                           r"the array x at byte .* runs past the end"),
    "a million empty strings": (_raw_gguf(kvs=[ARCH, _kv("x", 9, struct.pack("<IQ", 8, 1 << 20))]),
                                r"a string in x at byte .* runs past the end"),
    "too many array elements in all": (_raw_gguf(kvs=[ARCH] + [_kv(f"x{i}", 9, struct.pack("<IQ", 0, 1 << 20))
                                                               + b"\0" * (1 << 20) for i in range(9)]),
                                       r"more than 8,388,608 elements in all"),
    "nested arrays": (_raw_gguf(kvs=[ARCH, _kv("x", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 0, 0))]),
                      r"the array x nests arrays"),
    "unknown value type": (_raw_gguf(kvs=[ARCH, _kv("x", 99, b"")]), r"x has value type 99"),
    "unknown array type": (_raw_gguf(kvs=[ARCH, _kv("x", 9, struct.pack("<IQ", 42, 1))]), r"element type 42"),
    "duplicate key": (_raw_gguf(kvs=[ARCH, ARCH]), r"'general.architecture' appears twice"),
    "key not UTF-8": (_raw_gguf(kvs=[ARCH, _kv(b"\xff\xfe", 4, b"\0" * 4)]), r"metadata key at byte .* not UTF-8"),
    "bad alignment": (_raw_gguf(kvs=[ARCH, _kv("general.alignment", 4, struct.pack("<I", 3))]),
                      r"general.alignment 3 is not a power of two"),
    "alignment not uint32": (_raw_gguf(kvs=[ARCH, _kv("general.alignment", 10, struct.pack("<Q", 32))]),
                             r"general.alignment must be a uint32"),
    "version 1": (_raw_gguf(version=1), r"GGUF version 1"),
    "version 7": (_raw_gguf(version=7), r"GGUF version 7"),
    "five dimensions": (_raw_gguf(tensors=[_tensor(dims=(1, 1, 1, 1, 1))]), r"has 5 dimensions"),
    "zero dimensions": (_raw_gguf(tensors=[_tensor(dims=())]), r"has 0 dimensions"),
    "a zero-length dimension": (_raw_gguf(tensors=[_tensor(dims=(0, 64))]), r"shape \[0, 64\], impossible"),
    "Q8_0 row not whole blocks": (_raw_gguf(tensors=[_tensor(dims=(33, 64), ttype=8)]), r"impossible for its type"),
    "unknown tensor type": (_raw_gguf(tensors=[_tensor(ttype=99)]), r"has type 99"),
    "data past the end": (_raw_gguf(tensors=[_tensor()], data=b"\0" * 100), r"lies outside the file"),
    "offset past the end": (_raw_gguf(tensors=[_tensor(dims=(32,), offset=1 << 62)], data=b"\0" * 128),
                            r"lies outside the file"),
    "misaligned offset": (_raw_gguf(tensors=[_tensor(dims=(8,), offset=4)], data=b"\0" * 64),
                          r"offset 4, not a multiple of the alignment 32"),
    "dims overflowing 64 bits": (_raw_gguf(tensors=[_tensor(dims=(1 << 62, 1 << 62))], data=b"\0" * 64),
                                 r"lies outside the file"),
    "duplicate tensor": (_raw_gguf(tensors=[_tensor(dims=(8,)), _tensor(dims=(8,))], data=b"\0" * 32),
                         r"'token_embd.weight' appears twice"),
    "tensor name of 2^40 bytes": (b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + ARCH + struct.pack("<Q", 1 << 40),
                                  r"a tensor name claims 1,099,511,627,776 bytes"),
    "header only": (b"GGUF" + struct.pack("<I", 3), r"shorter than a GGUF header"),
}


@pytest.mark.parametrize("data,message", RAW_GGUF.values(), ids=RAW_GGUF.keys())
def test_gguf_headers_that_lie_are_refused_before_parsing(tmp_path, monkeypatch, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: pytest.fail("the gguf package parsed a bad header"))
    with pytest.raises(CheckpointError, match=message) as e:
        muse.load(path)
    assert str(path) in str(e.value)


def test_gguf_metadata_string_that_is_not_utf8(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(_raw_gguf(kvs=[_kv("general.architecture", 8, _s(b"\xffllama"))]))
    with pytest.raises(CheckpointError, match=r"the value of general.architecture at byte \d+ is not UTF-8"):
        muse.load(path)


def test_big_endian_gguf_header_is_walked_too(tmp_path):
    path = tmp_path / "be.gguf"
    path.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 1 << 40, 0))
    with pytest.raises(CheckpointError, match=r"claims 1,099,511,627,776 tensors"):
        muse.load(path)


# ----------------------------------------------------------------------------- fuzz


def _mutations(data: bytes, hot: int, rng: random.Random, n: int):
    """n damaged copies: a cut, or 1-8 bytes changed (mostly in the first `hot` bytes, where the
    header is; a digit there becomes another digit, so JSON shapes and offsets change but parse)."""
    for _ in range(n):
        buf = bytearray(data)
        if rng.random() < 0.2:
            yield bytes(buf[:rng.randrange(len(buf))])
            continue
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(hot) if rng.random() < 0.7 else rng.randrange(len(buf))
            if chr(buf[i]).isdigit() and rng.random() < 0.7:
                buf[i] = ord(str(rng.randrange(10)))
            else:
                buf[i] = rng.choice([buf[i] ^ (1 << rng.randrange(8)), 0, 0xFF, rng.randrange(256)])
        yield bytes(buf)


def _load_or_checkpoint_error(path) -> str:
    try:
        m = muse.load(path, precision="fp32")
        _logits(m.model, 4)
        return "loaded"
    except CheckpointError:
        return "refused"


def test_fuzzed_gguf_loads_or_gives_checkpoint_error(tmp_path):
    good = _write_gguf(tmp_path / "good.gguf", _model()).read_bytes()
    hot = gguf.GGUFReader(str(tmp_path / "good.gguf")).data_offset
    rng = random.Random(1234)
    outcomes = []
    for i, data in enumerate(_mutations(good, hot, rng, 60)):
        path = tmp_path / f"fuzz{i}.gguf"
        path.write_bytes(data)
        outcomes.append(_load_or_checkpoint_error(path))
    assert "refused" in outcomes  # the mutations did reach the checks


@pytest.mark.parametrize("kind", ["hf", "muse"])
def test_fuzzed_safetensors_loads_or_gives_checkpoint_error(tmp_path, kind):
    model = _model()
    src = export_hf(model, tmp_path / "src") if kind == "hf" else muse.save_checkpoint(tmp_path / "src", model)
    good = (src / "model.safetensors").read_bytes()
    hot = 8 + struct.unpack("<Q", good[:8])[0]
    rng = random.Random(4321)
    outcomes = []
    for data in _mutations(good, hot, rng, 40):
        (src / "model.safetensors").write_bytes(data)
        outcomes.append(_load_or_checkpoint_error(src))
    assert "refused" in outcomes
