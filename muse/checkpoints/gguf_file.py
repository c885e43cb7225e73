"""Read GGUF files (llama.cpp's format) with the `gguf` package.

Architectures: llama (incl. SmolLM2, Mistral-style), qwen2, gpt2. Q8_0, Q4_0 and
Q4_1 blocks are repacked losslessly into integer codes + fp16 scales (group 32) for
Muse's quantized kernels; every other type `gguf.quants` knows is dequantized —
float types (F32, F16, BF16) to fp32, quantized ones (Q5_*, K-quants, ...) and then
re-quantized to int8 in groups of 32 unless fp32 is asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from muse.checkpoints.weights import Packed, fuse_rows
from muse.config import ModelConfig
from muse.errors import CheckpointError

SUPPORTED_ARCHS = ("llama", "qwen2", "gpt2")


def open_reader(path: str | Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the gguf package raises ValueError/struct errors on garbage
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}). "
            "It may be truncated or corrupt: download or copy it again."
        ) from e


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf_config(reader, path: str | Path = "") -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; Muse runs {', '.join(SUPPORTED_ARCHS)}."
        )
    scaling = field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported yet.")
    get = lambda k, d=None: field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_head = int(get("attention.head_count"))
    n_embd = int(get("embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    names = set(tensors)
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: the GGUF has no token_embd.weight tensor; it is not a language model.")
    vocab = get("vocab_size") or int(tensors["token_embd.weight"].shape[-1])
    eps = get("attention.layer_norm_rms_epsilon") or get("attention.layer_norm_epsilon")
    kw = dict(
        arch=arch,
        vocab_size=int(vocab),
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        n_embd=n_embd,
        intermediate_size=int(get("feed_forward_length")),
        block_size=int(get("context_length")),
        norm_eps=float(eps),
        tie_embeddings="output.weight" not in names,
    )
    if arch != "gpt2":
        kw["rope_theta"] = float(get("rope.freq_base", 10000.0))
        key_len = get("attention.key_length")
        if key_len:
            kw["head_dim"] = int(key_len)
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{path}: unusable model metadata: {e}") from e


# Block layouts (bytes): Q8_0 = d:f16, q:int8[32]; Q4_0 = d:f16, q:u4[32];
# Q4_1 = d:f16, m:f16, q:u4[32]. In 4-bit blocks byte j holds element j in its low
# nibble and element j+16 in its high nibble.
def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(rows, nblocks, 16) bytes → (rows, nblocks*32) codes 0..15."""
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (rows, nb, 32)
    return codes.reshape(qs.shape[0], -1)


def _packed(t) -> Packed | None:
    """Lossless codes/scales for Q8_0, Q4_0, Q4_1 tensors; None for other types."""
    from gguf import GGMLQuantizationType as Q

    kind = t.tensor_type
    if kind not in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        return None
    raw = np.asarray(t.data)
    rows = raw.shape[0]
    block = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[kind]
    blocks = raw.reshape(rows, -1, block)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # (rows, nb)
    if kind == Q.Q8_0:
        codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)
        return Packed(8, torch.from_numpy(codes), torch.from_numpy(d.copy()), None)
    if kind == Q.Q4_0:
        codes = _unpack_nibbles(blocks[..., 2:])
        mins = (d.astype(np.float32) * -8).astype(np.float16)  # exact: power-of-two multiple
        return Packed(4, torch.from_numpy(codes), torch.from_numpy(d.copy()), torch.from_numpy(mins))
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    codes = _unpack_nibbles(blocks[..., 4:])
    return Packed(4, torch.from_numpy(codes), torch.from_numpy(d.copy()), torch.from_numpy(m.copy()))


def _tensor(t, keep_packed: bool) -> "torch.Tensor | Packed":
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    if keep_packed and len(t.shape) == 2:
        packed = _packed(t)
        if packed is not None:
            return packed
    float_type = t.tensor_type in (Q.F32, Q.F16, Q.BF16)
    if t.tensor_type in (Q.F32, Q.F16):
        arr = np.asarray(t.data).astype(np.float32)
    else:
        arr = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
    shape = [int(x) for x in reversed(t.shape)]  # GGUF lists dims innermost first
    dense = torch.from_numpy(arr.reshape(shape).copy())
    if keep_packed and len(shape) == 2 and not float_type:
        # Q5_*, K-quants, ...: no kernel of ours reads them directly; int8 in groups of
        # 32 keeps them within a fraction of their own quantization step.
        return Packed.int8(dense)
    return dense


def _unpermute_rows(w, n_head: int):
    """Undo llama.cpp's q/k row permutation (interleaved RoPE → rotate-half layout)."""
    rows = w.shape[0]
    head_dim = rows // n_head
    # GGUF row h*hd + 2j + i holds HF row h*hd + i*hd/2 + j
    perm = torch.arange(rows).view(n_head, head_dim // 2, 2).transpose(1, 2).reshape(rows)
    if isinstance(w, Packed):
        return w.rows(perm)
    return w.index_select(0, perm)


_LAYER_NAMES = {
    "attn_norm.weight": "norm1.weight", "attn_norm.bias": "norm1.bias",
    "ffn_norm.weight": "norm2.weight", "ffn_norm.bias": "norm2.bias",
    "attn_output.weight": "attn.proj.weight", "attn_output.bias": "attn.proj.bias",
    "attn_qkv.weight": "attn.qkv.weight", "attn_qkv.bias": "attn.qkv.bias",
    "ffn_down.weight": "mlp.down.weight", "ffn_down.bias": "mlp.down.bias",
}
_GPT2_LAYER_NAMES = {"ffn_up.weight": "mlp.fc.weight", "ffn_up.bias": "mlp.fc.bias",
                     "ffn_down.weight": "mlp.proj.weight", "ffn_down.bias": "mlp.proj.bias"}
_TOP_NAMES = {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
              "output_norm.weight": "norm_f.weight", "output_norm.bias": "norm_f.bias",
              "output.weight": "lm_head.weight"}


def read_gguf_weights(reader, config: ModelConfig, keep_packed: bool = True) -> dict:
    """All tensors under Muse's names: q/k/v and gate/up fused, llama q/k un-permuted."""
    by_layer: dict[int, dict[str, object]] = {}
    out: dict[str, object] = {}
    for t in reader.tensors:
        if t.name in _TOP_NAMES:
            out[_TOP_NAMES[t.name]] = _tensor(t, keep_packed)
        elif t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            by_layer.setdefault(int(idx), {})[rest] = _tensor(t, keep_packed)
        # other tensors (rope_freqs, ...) are derived from the config
    names = {**_LAYER_NAMES, **(_GPT2_LAYER_NAMES if config.arch == "gpt2" else {})}
    for i, parts in sorted(by_layer.items()):
        pre = f"layers.{i}."
        if "attn_q.weight" in parts:
            q, k = parts.pop("attn_q.weight"), parts.pop("attn_k.weight")
            if config.arch == "llama":
                q, k = _unpermute_rows(q, config.n_head), _unpermute_rows(k, config.n_kv_head)
            out[pre + "attn.qkv.weight"] = fuse_rows([q, k, parts.pop("attn_v.weight")])
            if "attn_q.bias" in parts:
                biases = [parts.pop(f"attn_{x}.bias") for x in "qkv"]
                if config.arch == "llama":
                    biases[0] = _unpermute_rows(biases[0][:, None], config.n_head)[:, 0]
                    biases[1] = _unpermute_rows(biases[1][:, None], config.n_kv_head)[:, 0]
                out[pre + "attn.qkv.bias"] = torch.cat(biases)
        if "ffn_gate.weight" in parts:
            out[pre + "mlp.gate_up.weight"] = fuse_rows([parts.pop("ffn_gate.weight"), parts.pop("ffn_up.weight")])
        for rest, w in parts.items():
            if rest not in names:
                raise CheckpointError(f"GGUF tensor blk.{i}.{rest} is not understood by Muse")
            out[pre + names[rest]] = w
    return out
