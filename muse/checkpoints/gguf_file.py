"""Read GGUF files (llama.cpp's format); the `gguf` package supplies its constants and
the dequantization of block types Muse does not repack.

Architectures: llama (incl. SmolLM2, Mistral-style), qwen2, gpt2. Q8_0, Q4_0, Q4_1 and
Q5_0 blocks are repacked losslessly into integer codes + fp16 scales (group 32) for
Muse's quantized kernels (Q5_0's 5-bit codes as int8); every other type `gguf.quants`
knows is dequantized — float types (F32, F16, BF16) to fp32, quantized ones (Q5_1,
K-quants, ...) and then re-quantized to int8 in groups of 32 unless fp32 is asked for.

A GGUF may be broken or hostile, so `GGUFFile` reads the header with bounds (counts,
string and array lengths, tensor extents inside the file) and memory-maps the tensor
data; every tensor's name, shape and type is checked against the config before any is
read. (It replaces `gguf.GGUFReader`, which builds a numpy view per array element: 15 s
for a 151k-token vocabulary.)
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from muse.checkpoints.files import Fields, check_specs
from muse.checkpoints.weights import Packed, fuse_rows
from muse.config import ModelConfig
from muse.errors import CheckpointError

SUPPORTED_ARCHS = ("llama", "qwen2", "gpt2")

# Bounds on what a header may declare (real files: ~300-1,200 tensors, ~40 keys, vocabularies
# up to ~260k tokens). The gguf package builds a numpy view per array element, so arrays are
# bounded in elements, not only in bytes.
MAX_TENSORS = 1 << 16
MAX_KEYS = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 16 << 20
MAX_ARRAY = 1 << 20
MAX_ARRAY_TOTAL = 1 << 23
MAX_NAME_BYTES = 1024
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType → bytes
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def _corrupt(path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable GGUF file ({why}). It may be truncated or corrupt: "
                           "download or copy it again.")


class _Header:
    """A bounds-checked cursor over a GGUF header (no value is materialised but keys and names)."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)
        self.order = "<"

    def take(self, n: int, what: str) -> int:
        if n > self.end - self.pos:
            raise _corrupt(self.path, f"{what} at byte {self.pos:,} runs past the end of the file")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from(self.order + "I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from(self.order + "Q", self.buf, self.take(8, what))[0]

    def string(self, what: str, limit: int) -> tuple[int, int]:
        """(start, length) of a length-prefixed string, skipped over."""
        n = self.u64(what)
        if n > limit:
            raise _corrupt(self.path, f"{what} claims {n:,} bytes (at most {limit:,})")
        return self.take(n, what), n

    def text(self, what: str, limit: int) -> str:
        start, n = self.string(what, limit)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _corrupt(self.path, f"{what} at byte {start:,} is not UTF-8") from None


_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _value(h: _Header, kind: int, key: str, budget: list[int], keep: bool):
    """Read (keep) or step over one metadata value; `budget[0]` counts down the array
    elements still allowed. Arrays of numbers come back as lists, of strings as list[str]."""
    if kind in _SCALAR_SIZES:
        start = h.take(_SCALAR_SIZES[kind], f"the value of {key}")
        return struct.unpack_from(h.order + _SCALAR_FORMATS[kind], h.buf, start)[0] if keep else None
    if kind == _STRING:
        if keep:
            return h.text(f"the value of {key}", MAX_STRING_BYTES)
        h.string(f"the value of {key}", MAX_STRING_BYTES)
        return None
    if kind != _ARRAY:
        raise _corrupt(h.path, f"{key} has value type {kind}, which GGUF does not define")
    item = h.u32(f"the array type of {key}")
    count = h.u64(f"the array length of {key}")
    if count > MAX_ARRAY:
        raise _corrupt(h.path, f"the array {key} claims {count:,} elements (at most {MAX_ARRAY:,})")
    budget[0] -= count
    if budget[0] < 0:
        raise _corrupt(h.path, f"the metadata arrays hold more than {MAX_ARRAY_TOTAL:,} elements in all")
    if item in _SCALAR_SIZES:
        start = h.take(count * _SCALAR_SIZES[item], f"the array {key}")
        if not keep:
            return None
        dtype = np.dtype(_SCALAR_FORMATS[item]).newbyteorder(h.order)
        return np.frombuffer(h.buf, dtype=dtype, count=count, offset=start).tolist()
    if item == _STRING:
        if not keep:
            for _ in range(count):
                h.string(f"a string in {key}", MAX_STRING_BYTES)
            return None
        return [h.text(f"a string in {key}", MAX_STRING_BYTES) for _ in range(count)]
    if item == _ARRAY:
        raise _corrupt(h.path, f"the array {key} nests arrays, which Muse does not read")
    raise _corrupt(h.path, f"the array {key} has element type {item}, which GGUF does not define")


def _mapped(path: str | Path) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) < 24:
                raise _corrupt(path, "shorter than a GGUF header")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e}).") from e


def check_header(path: str | Path) -> None:
    """Walk a GGUF header with bounds, materialising nothing; raise CheckpointError."""
    with _mapped(path) as buf:
        h = _Header(buf, path)
        n_tensors, n_keys = _preamble(h)
        alignment, _ = _metadata(h, n_keys, keep=False)
        tensors = _tensor_infos(h, n_tensors)
        _check_tensor_data(h, tensors, alignment)


@dataclass
class Field:
    """One metadata value: `types` as gguf's GGUFValueType list ([ARRAY, item] for arrays)."""

    types: list
    value: Any

    def contents(self):
        return self.value

    @property
    def data(self) -> list:
        return self.value if isinstance(self.value, list) else [self.value]


@dataclass
class Tensor:
    """A tensor's header entry and its data, memory-mapped: float types as (..., ne0) of their
    dtype, block types as (..., bytes per row) uint8, as `gguf.quants.dequantize` takes them."""

    name: str
    shape: tuple[int, ...]  # GGUF order: innermost (ne0) first
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray


class GGUFFile:
    """A GGUF file read with bounds: `fields` (key → Field) and `tensors` (in file order)."""

    def __init__(self, path: str | Path):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

        buf = _mapped(path)
        h = _Header(buf, path)
        n_tensors, n_keys = _preamble(h)
        alignment, values = _metadata(h, n_keys, keep=True)
        infos = _tensor_infos(h, n_tensors)
        _check_tensor_data(h, infos, alignment)
        self.fields = {key: Field([GGUFValueType(t) for t in types], v) for key, (types, v) in values.items()}
        data_start = -(-h.pos // alignment) * alignment
        self.tensors = []
        floats = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                  GGMLQuantizationType.F64: np.float64}
        for name, offset, n_bytes, dims, raw_type in infos:
            kind = GGMLQuantizationType(raw_type)
            rows = tuple(reversed(dims[1:]))
            if kind in floats:
                dtype = np.dtype(floats[kind]).newbyteorder(h.order)
                arr = np.frombuffer(buf, dtype=dtype, count=n_bytes // dtype.itemsize, offset=data_start + offset)
                arr = arr.reshape(*rows, dims[0])
            else:
                block, type_size = GGML_QUANT_SIZES[kind]
                arr = np.frombuffer(buf, dtype=np.uint8, count=n_bytes, offset=data_start + offset)
                arr = arr.reshape(*rows, dims[0] // block * type_size)
            self.tensors.append(Tensor(name, tuple(dims), kind, arr))


def _preamble(h: _Header) -> tuple[int, int]:
    """Magic, version (and byte order) and the two counts: (tensors, metadata keys)."""
    if bytes(h.buf[:4]) != b"GGUF":
        raise _corrupt(h.path, "bad magic")
    h.pos = 4
    version = h.u32("the version")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        h.order = ">"
        version = struct.unpack(">I", bytes(h.buf[4:8]))[0]
    if version not in (2, 3):
        raise _corrupt(h.path, f"GGUF version {version}; Muse reads versions 2 and 3")
    n_tensors, n_keys = h.u64("the tensor count"), h.u64("the key count")
    if n_tensors > MAX_TENSORS or n_keys > MAX_KEYS:
        raise _corrupt(h.path, f"it claims {n_tensors:,} tensors and {n_keys:,} metadata keys "
                       f"(at most {MAX_TENSORS:,} and {MAX_KEYS:,})")
    return n_tensors, n_keys


def _metadata(h: _Header, n_keys: int, keep: bool) -> tuple[int, dict]:
    """Read or skip the metadata with bounds: the tensor data alignment it sets (default 32),
    and with `keep` {key: (value types, value)}."""
    keys, budget, alignment, values = set(), [MAX_ARRAY_TOTAL], 32, {}
    for _ in range(n_keys):
        key = h.text("a metadata key", MAX_KEY_BYTES)
        if key in keys:
            raise _corrupt(h.path, f"the metadata key {key!r:.80} appears twice")
        keys.add(key)
        kind = h.u32(f"the type of {key}")
        if key == "general.alignment":
            if kind != _UINT32:
                raise _corrupt(h.path, "general.alignment must be a uint32")
            alignment = struct.unpack_from(h.order + "I", h.buf, h.pos)[0] if h.pos + 4 <= h.end else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise _corrupt(h.path, f"general.alignment {alignment} is not a power of two")
        start = h.pos
        value = _value(h, kind, key, budget, keep)
        if keep:
            item = struct.unpack_from(h.order + "I", h.buf, start)[0] if kind == _ARRAY else None
            values[key] = ([kind] if item is None else [kind, item], value)
    return alignment, values


def _tensor_infos(h: _Header, n_tensors: int) -> list[tuple[str, int, int, list[int], int]]:
    """(name, offset, bytes, dims, type) of every tensor, each name, rank, shape and type checked."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors, names = [], set()
    for _ in range(n_tensors):
        name = h.text("a tensor name", MAX_NAME_BYTES)
        if name in names:
            raise _corrupt(h.path, f"the tensor {name!r} appears twice")
        names.add(name)
        n_dims = h.u32(f"the rank of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _corrupt(h.path, f"the tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [h.u64(f"the shape of {name}") for _ in range(n_dims)]
        raw_type = h.u32(f"the type of {name}")
        offset = h.u64(f"the offset of {name}")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise _corrupt(h.path, f"the tensor {name} has type {raw_type}, which GGUF does not define") from None
        if 0 in dims or dims[0] % block:
            raise _corrupt(h.path, f"the tensor {name} has shape {dims}, impossible for its type")
        tensors.append((name, offset, int(np.prod(dims, dtype=object)) // block * type_size, dims, raw_type))
    return tensors


def _check_tensor_data(h: _Header, tensors: list[tuple[str, int, int]], alignment: int) -> None:
    """Every tensor's data is aligned and lies inside the file."""
    data_start = -(-h.pos // alignment) * alignment
    for name, offset, n_bytes, *_ in tensors:
        if offset % alignment:
            raise _corrupt(h.path, f"the data of tensor {name} starts at offset {offset:,}, not a multiple of "
                           f"the alignment {alignment}")
        if data_start + offset + n_bytes > h.end:
            raise _corrupt(h.path, f"the data of tensor {name} ({n_bytes:,} bytes at offset {offset:,}) "
                           f"lies outside the file's {h.end - data_start:,} bytes of tensor data")


def open_reader(path: str | Path) -> GGUFFile:
    return GGUFFile(path)


def _scalars(reader, path) -> dict:
    """Every non-array metadata value as a Python value; arrays as a short placeholder."""
    from gguf.constants import GGUFValueType as V

    out = {}
    for key, f in reader.fields.items():
        if not f.types:
            continue
        if f.types[0] == V.ARRAY:
            out[key] = _ArrayValue(key, len(f.data))
            continue
        try:
            out[key] = f.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise _corrupt(path, f"the metadata value {key} is unreadable: {e}") from e
    return out


class _ArrayValue:
    def __init__(self, key: str, n: int):
        self.key, self.n = key, n

    def __repr__(self) -> str:
        return f"an array of {self.n} values"


# llama.cpp's `general.sampling.*` keys → SamplingParams fields.
GGUF_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                 "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
                 "general.sampling.penalty_repeat": "repetition_penalty"}


def read_gguf_sampling(reader) -> dict:
    """The sampling a GGUF file recommends (its `general.sampling.*` keys), as `SamplingParams`
    fields; {} when it carries none. Values of the wrong type or out of range are left out."""
    from muse.sampling import recommendation

    values = {}
    for key, name in GGUF_SAMPLING.items():
        f = reader.fields.get(key)
        if f is not None and f.types and len(f.types) == 1:
            try:
                values[name] = f.contents()
            except (ValueError, IndexError, UnicodeDecodeError):
                continue
    return recommendation(values)


def read_gguf_config(reader, path: str | Path = "") -> ModelConfig:
    meta = _scalars(reader, path)
    f = Fields(meta, f"{path} (GGUF metadata)")
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r:.60} is not supported; Muse runs {', '.join(SUPPORTED_ARCHS)}."
        )
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r:.60} is not supported yet.")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: the GGUF has no token_embd.weight tensor; it is not a language model.")
    n_head = f.integer(f"{arch}.attention.head_count", "n_head")
    eps_key = f"{arch}.attention.layer_norm_rms_epsilon"
    if eps_key not in meta:
        eps_key = f"{arch}.attention.layer_norm_epsilon"
    kw = dict(
        arch=arch,
        vocab_size=f.integer(f"{arch}.vocab_size", "vocab_size", int(tensors["token_embd.weight"].shape[-1])),
        n_layer=f.integer(f"{arch}.block_count", "n_layer"),
        n_head=n_head,
        n_kv_head=f.integer(f"{arch}.attention.head_count_kv", "n_kv_head", n_head),
        n_embd=f.integer(f"{arch}.embedding_length", "n_embd"),
        intermediate_size=f.integer(f"{arch}.feed_forward_length", "intermediate_size"),
        block_size=f.integer(f"{arch}.context_length", "block_size"),
        norm_eps=f.number(eps_key),
        tie_embeddings="output.weight" not in tensors,
    )
    if arch != "gpt2":
        kw["rope_theta"] = f.number(f"{arch}.rope.freq_base", 10000.0)
        kw["head_dim"] = f.integer(f"{arch}.attention.key_length", "head_dim", None)
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
    """Lossless codes/scales for Q8_0, Q4_0, Q4_1, Q5_0 tensors; None for other types."""
    from gguf import GGMLQuantizationType as Q

    kind = t.tensor_type
    if kind not in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0):
        return None
    raw = np.asarray(t.data)
    rows = raw.shape[0]
    block = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22}[kind]
    blocks = raw.reshape(rows, -1, block)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # (rows, nb)
    if kind == Q.Q8_0:
        codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)
        return Packed(8, torch.from_numpy(codes), torch.from_numpy(d.copy()), None)
    if kind == Q.Q5_0:  # d:f16, qh:u32 (bit j: the fifth bit of element j), q:u4[32]; w = d * (q - 16)
        # bit j of the little-endian u32 is bit j % 8 of its byte j // 8
        high = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")  # (rows, nb, 32) of 0/1
        codes = np.concatenate([blocks[..., 6:] & 0x0F, blocks[..., 6:] >> 4], axis=-1)  # (rows, nb, 32)
        codes |= high << 4
        codes = codes.view(np.int8)
        codes -= 16
        return Packed(8, torch.from_numpy(codes.reshape(rows, -1)), torch.from_numpy(d.copy()), None)
    if kind == Q.Q4_0:
        codes = _unpack_nibbles(blocks[..., 2:])
        mins = (d.astype(np.float32) * -8).astype(np.float16)  # exact: power-of-two multiple
        return Packed(4, torch.from_numpy(codes), torch.from_numpy(d.copy()), torch.from_numpy(mins))
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    codes = _unpack_nibbles(blocks[..., 4:])
    return Packed(4, torch.from_numpy(codes), torch.from_numpy(d.copy()), torch.from_numpy(m.copy()))


def _tensor(t, keep_packed: bool, path) -> "torch.Tensor | Packed":
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    if keep_packed and len(t.shape) == 2:
        packed = _packed(t)
        if packed is not None:
            return packed
    float_type = t.tensor_type in (Q.F32, Q.F16, Q.BF16, Q.F64)
    if t.tensor_type in (Q.F32, Q.F16, Q.F64):
        arr = np.asarray(t.data).astype(np.float32)
    else:
        try:
            arr = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which Muse cannot "
                                  "decode yet; use a GGUF quantized as Q8_0, Q4_K_M or F16.") from None
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


# Tensors GGUF files carry that Muse derives from the config instead.
_DERIVED = frozenset({"rope_freqs.weight"})


def _weight_types() -> tuple[str, ...]:
    """Tensor types a weight may have: every float and block format GGUF defines, not I8..I64
    (a block format `gguf.quants` cannot decode is refused when its tensor is read)."""
    from gguf.constants import GGML_QUANT_SIZES

    return tuple(t.name for t in GGML_QUANT_SIZES if t.name not in ("I8", "I16", "I32", "I64"))


def expected_gguf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """llama.cpp tensor name → shape (rows first, as numpy reads it) for a model of `config`."""
    from muse.model import Transformer

    with torch.device("meta"):
        state = Transformer(config).state_dict()
    gpt2 = config.arch == "gpt2"
    top = {v: k for k, v in _TOP_NAMES.items()}
    layer = {v: k for k, v in {**_LAYER_NAMES, **(_GPT2_LAYER_NAMES if gpt2 else {})}.items()}
    rows = {"q": config.n_head * config.head_dim, "k": config.n_kv_head * config.head_dim,
            "v": config.n_kv_head * config.head_dim}
    out: dict[str, tuple[int, ...]] = {}
    for name, t in state.items():
        shape = tuple(t.shape)
        if name in top:
            out[top[name]] = shape
            continue
        _, i, rest = name.split(".", 2)
        kind = rest.rsplit(".", 1)[1]
        if not gpt2 and rest.startswith("attn.qkv."):  # stored as attn_q, attn_k, attn_v
            for x, n in rows.items():
                out[f"blk.{i}.attn_{x}.{kind}"] = (n, *shape[1:])
        elif not gpt2 and rest.startswith("mlp.gate_up."):  # stored as ffn_gate, ffn_up
            for x in ("gate", "up"):
                out[f"blk.{i}.ffn_{x}.{kind}"] = (shape[0] // 2, *shape[1:])
        else:
            out[f"blk.{i}.{layer[rest]}"] = shape
    return out


def read_gguf_weights(reader, config: ModelConfig, keep_packed: bool = True, path: str | Path = "GGUF",
                      progress: "Callable[[str, int, int], None] | None" = None) -> dict:
    """All tensors under Muse's names: q/k/v and gate/up fused, llama q/k un-permuted.

    Every tensor's name, shape and type is checked against `config` before any is read.
    `progress(what, done, total)` is called before the first tensor and after each one."""
    found = {t.name: (tuple(int(x) for x in reversed(t.shape)), t.tensor_type.name)
             for t in reader.tensors if t.name not in _DERIVED}
    check_specs(str(path), found, expected_gguf_shapes(config), dtypes=_weight_types())
    by_layer: dict[int, dict[str, object]] = {}
    out: dict[str, object] = {}
    report = progress or (lambda what, done, total: None)
    total = len(reader.tensors)
    report("Reading tensors", 0, total)
    for done, t in enumerate(reader.tensors, 1):
        if t.name in _TOP_NAMES:
            out[_TOP_NAMES[t.name]] = _tensor(t, keep_packed, path)
        elif t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            by_layer.setdefault(int(idx), {})[rest] = _tensor(t, keep_packed, path)
        report("Reading tensors", done, total)
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
            out[pre + names[rest]] = w
    return out
