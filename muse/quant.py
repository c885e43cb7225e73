"""Weight-only quantized linear layers (int8 / int4) with fast CPU kernels.

Batch-1 decoding on CPU is bound by memory bandwidth: every token streams every weight
once. Storing weights as 8- or 4-bit codes plus fp16 group scales cuts the bytes per
weight from 4 to ~1.06 (int8, G=32) or ~0.63 (int4, G=32), and the C++ kernels in
`muse/kernels/quant_cpu.cpp` turn codes into fp32 in registers, so the saving becomes
speed. The kernels are built on first use with `torch.utils.cpp_extension.load` into
torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and
reused by later processes. When they cannot be built, or MUSE_NO_KERNELS=1, a pure
PyTorch path (dequantize + F.linear) gives the same numbers, more slowly.

Instruction set: the kernels are compiled for the best one the CPU runs (avx512-vnni,
avx512, avx2-vnni, avx2 or scalar), one module per instruction set, so one installation
serves any CPU it is copied to. MUSE_CPU=avx2 (or another) forces a lower one, e.g. to
measure the path a laptop without AVX-512 takes.

Int8 activations (`act_bits=8`, the "w4a8" precision): x is rounded to int8 in blocks of
32 (one fp32 scale each) and meets W's codes in integer dot products. The weights stay
exact; the output moves by about the rounding of x, in exchange for fewer instructions
per weight, which is what bounds decode on AVX2.

    layer = QuantLinear.from_float(linear.weight, bits=4, group_size=32)
    y = layer(x)                      # x (..., in) -> (..., out)
    quantize_model(model, bits=8, group_size=32, skip={"lm_head"})
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

try:
    import fcntl  # POSIX; Windows builds without the stale-lock guard
except ImportError:  # pragma: no cover
    fcntl = None

import torch
import torch.nn.functional as F
from torch import nn

_KERNELS = Path(__file__).parent / "kernels"
# One module per instruction set from these sources (quantized linears and the fused decode
# step; training's GELU and attention), which share the vector helpers of vec.h.
_SOURCES = (_KERNELS / "quant_cpu.cpp", _KERNELS / "train_cpu.cpp")
_HEADERS = (_KERNELS / "vec.h",)
_CHUNK = 32  # int4 packing run, and the kernels' inner step: they need group_size % 32 == 0

# Dispatch. The fused kernel streams W once and multiplies it with 4 rows of x at a time (AVX2: 8):
# the path for decode and the server's batches. From PREFILL_MIN_M rows of x (prefill),
# tiles of PREFILL_TILE_N rows of W are dequantized and multiplied with at::mm (oneDNN /
# MKL GEMM), which reuses each weight across many rows from registers. Measured whole-model
# prefill on a 2-core Xeon, 2 threads (tok/s, fused -> tiles): SmolLM2 AVX2 128 tokens
# 368 -> 1037, 512: 352 -> 1105, M=16 300 -> 293 (so the switch sits at 32); AVX-512 128
# 528 -> 1035; Qwen2.5-0.5B AVX2 128 114 -> 311, 512 109 -> 396 (1024-row tiles beat
# 256 and whole matrices at 512 tokens). An earlier measurement had the tiles 4-6x slower
# on two threads; it no longer holds.
PREFILL_MIN_M: int | None = 32
PREFILL_MIN_K = 0
PREFILL_TILE_N = 1024  # rows of W dequantized per at::mm call (scratch: TILE_N * in_features floats)

# Instruction sets the kernels are built for, best first. "-vnni" adds the VNNI integer dot
# product (dpbusd) to the int8-activation path; "avx2" is the path of most laptops.
ISAS = ("avx512-vnni", "avx512", "avx2-vnni", "avx2", "scalar")
_ISA_CFLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx512-vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2", "-mfma",
                    "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx2-vnni": ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
    "scalar": [],
}

_ext = None
_ext_tried = False
_ext_lock = threading.Lock()
_modules: dict[str, object] = {}  # isa -> built module, for kernels(isa)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_isas() -> tuple[str, ...]:
    """The kernel instruction sets this CPU runs, best first (always ending in "scalar")."""
    cap = torch.backends.cpu.get_cpu_capability().upper()  # AVX512 / AVX2 / DEFAULT / ...
    flags = _cpu_flags()
    if flags and "f16c" not in flags:  # every AVX2 CPU has F16C; trust torch where flags are unknown
        cap = "DEFAULT"
    runs = {"avx512": cap == "AVX512", "avx2": cap in ("AVX512", "AVX2")}
    runs["avx512-vnni"] = runs["avx512"] and "avx512_vnni" in flags
    runs["avx2-vnni"] = runs["avx2"] and "avx_vnni" in flags
    return tuple(isa for isa in ISAS if isa == "scalar" or runs[isa])


def kernel_isa() -> str:
    """The instruction set Muse's kernels use here: the CPU's best, or MUSE_CPU's.

    MUSE_CPU=avx2 (avx512, avx2-vnni, scalar, ...) forces exactly that path, e.g. to measure
    what a laptop without AVX-512 or VNNI runs; one this CPU lacks falls back, with a warning."""
    have = cpu_isas()
    want = os.environ.get("MUSE_CPU", "auto").strip().lower() or "auto"
    if want == "auto":
        return have[0]
    if want not in ISAS:
        warnings.warn(f"MUSE_CPU={want!r} is not one of auto, {', '.join(ISAS)}; using {have[0]}.",
                      RuntimeWarning, stacklevel=2)
        return have[0]
    if want not in have:
        warnings.warn(f"MUSE_CPU={want} asks for instructions this CPU lacks; using {have[0]}.",
                      RuntimeWarning, stacklevel=2)
        return have[0]
    return want


def env_flag(name: str) -> bool:
    """Whether the environment variable `name` is set to 1, true or yes."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _kernels_disabled() -> bool:
    return env_flag("MUSE_NO_KERNELS")


def _build_extension(isa: str | None = None):
    from torch.utils.cpp_extension import load

    # cpp_extension runs `ninja`; from an un-activated venv it is not on PATH.
    if shutil.which("ninja") is None:
        try:
            import ninja

            bin_dir = ninja.BIN_DIR
        except (ImportError, AttributeError):
            bin_dir = os.path.dirname(sys.executable)
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    # Explicit ISA flags, never -march=native: the module name says what it needs, so a
    # build cache shared with another CPU (a home directory on NFS) cannot hand it code
    # it cannot run.
    isa = isa or kernel_isa()
    # cpp_extension rebuilds when the sources or flags change, not a header: its digest is a flag.
    headers = hashlib.sha256(b"".join(h.read_bytes() for h in _HEADERS)).hexdigest()[:16]
    name = extension_name(isa)
    with build_lock(name) as stale:
        stale.unlink(missing_ok=True)
        return load(
            name=name,
            sources=[str(s) for s in _SOURCES],
            extra_cflags=["-O3", "-fopenmp", *_ISA_CFLAGS[isa], f"-DMUSE_HEADERS={headers}"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )


def extension_name(isa: str) -> str:
    """The name of the kernels' module built for `isa`: one per instruction set."""
    return f"muse_quant_cpu_{isa.replace('-', '_')}"


@contextlib.contextmanager
def build_lock(name: str):
    """Hold Muse's lock on the build directory of extension `name`; yields the path of
    cpp_extension's own lock file there, which is stale while this lock is held.

    cpp_extension marks a build in progress with a plain file (`lock`) that the builder deletes
    when done. A build that is killed (Ctrl-C during the first run's minute of compiling, an
    out-of-memory kill) leaves it behind, and every later `load` waits for it forever: Muse
    hung at start-up. Every Muse build takes this lock (flock: the OS releases it when its holder
    dies, however it dies) before touching the build, so whoever holds it may delete that file."""
    from torch.utils import cpp_extension

    folder = Path(cpp_extension._get_build_directory(name, verbose=False))  # where `load` builds
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "muse.lock", "a+b") as handle:  # closing it releases the lock
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another Muse process builds
        yield folder / "lock"


def kernels(isa: str):
    """The kernels built for `isa` (one of cpu_isas()), building them if needed; for tests
    and benchmarks that compare instruction sets in one process. Raises if they cannot be built."""
    if isa not in cpu_isas():
        raise ValueError(f"this CPU does not run {isa!r} code; it runs {', '.join(cpu_isas())}")
    with _ext_lock:
        if isa not in _modules:
            same = _ext is not None and _ext.isa() == isa  # the module this process already uses
            _modules[isa] = _ext if same else _build_extension(isa)
    return _modules[isa]


def _extension():
    """The compiled kernels, building them on first call; None if they cannot be built."""
    global _ext, _ext_tried
    if _ext_tried:
        return _ext
    with _ext_lock:
        if not _ext_tried:
            try:
                _ext = _build_extension()
            except Exception as e:  # no compiler, no ninja, compile error, ...
                warnings.warn(
                    f"Muse could not build its quantized CPU kernels ({type(e).__name__}: {e}); "
                    "falling back to the slower pure-PyTorch path.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _ext = None
            _ext_tried = True
    return _ext


def kernels_available() -> bool:
    """True if the C++ kernels are (or can now be) built and are not disabled by MUSE_NO_KERNELS."""
    if _kernels_disabled():
        return False
    return _ext is not None if _ext_tried else _extension() is not None


# ----------------------------------------------------------------------------------------
# fp16 rounding in a chosen direction (so that quantization error bounds hold for the
# stored fp16 scales, not just the fp32 ones they were computed from)
# ----------------------------------------------------------------------------------------


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """Largest float16 <= x (x float32, finite, within fp16 range)."""
    h = x.to(torch.float16)
    too_big = h.float() > x
    bits = h.view(torch.int16)
    # one ulp down: positive -> bits - 1, negative -> bits + 1, zero -> -smallest subnormal
    step = torch.where(bits > 0, bits - 1, bits + 1)
    step = torch.where(h == 0, torch.full_like(bits, -32767), step)  # 0x8001
    return torch.where(too_big, step.view(torch.float16), h)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    return -_fp16_down(-x)


# ----------------------------------------------------------------------------------------
# int4 packing: runs of 32 codes along in_features -> 16 bytes; byte j holds code j (low
# nibble) and code j + 16 (high nibble). A last, shorter run of length t does the same
# with t/2 in place of 16.
# ----------------------------------------------------------------------------------------


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """(R, K) uint8 codes in 0..15 -> (R, K // 2) uint8."""
    R, K = codes.shape
    main = K - K % _CHUNK
    parts = []
    if main:
        c = codes[:, :main].reshape(R, main // _CHUNK, 2, _CHUNK // 2)
        parts.append((c[:, :, 0] | (c[:, :, 1] << 4)).reshape(R, main // 2))
    if K % _CHUNK:
        c = codes[:, main:].reshape(R, 2, (K - main) // 2)
        parts.append(c[:, 0] | (c[:, 1] << 4))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0].contiguous()


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    """(R, K // 2) uint8 -> (R, K) uint8 codes in 0..15."""
    R, K = packed.shape[0], packed.shape[1] * 2
    main = K - K % _CHUNK
    lo, hi = packed & 15, packed >> 4
    parts = []
    if main:
        shape = (R, main // _CHUNK, 1, _CHUNK // 2)
        c = torch.cat([lo[:, : main // 2].reshape(shape), hi[:, : main // 2].reshape(shape)], 2)
        parts.append(c.reshape(R, main))
    if K % _CHUNK:
        parts.append(torch.cat([lo[:, main // 2 :], hi[:, main // 2 :]], 1))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) rounded as the int8-activation kernels round it, returned in fp32: blocks of
    32 along K, d = absmax / 127, x ~ d * round(x * (1 / d)) (half to even). K % 32 == 0."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // _CHUNK, _CHUNK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv) * d).reshape(x.shape)


def _prefill_min_m(in_features: int) -> int:
    on = PREFILL_MIN_M is not None and in_features >= PREFILL_MIN_K
    return PREFILL_MIN_M if on else 1 << 62


def _check_config(in_features: int, out_features: int, bits: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got bits={bits!r}")
    if in_features <= 0 or out_features <= 0:
        raise ValueError(
            f"in_features and out_features must be positive, got in_features={in_features}, "
            f"out_features={out_features}"
        )
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group_size={group_size} must be a positive divisor of in_features={in_features} "
            f"(use group_size={in_features} for one scale per output channel)"
        )
    if bits == 4 and in_features % 2:
        raise ValueError(f"bits=4 packs two codes per byte, so in_features must be even, got {in_features}")


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W (out_features, in_features) stored as integer codes + fp16 scales.

    bits=8: symmetric, w = scale[g] * code, code int8 in [-127, 127] (-128 accepted, GGUF Q8_0).
    bits=4: asymmetric, w = scale[g] * code + min[g], code in 0..15.
    A group is `group_size` consecutive weights of one row: g = k // group_size;
    group_size == in_features means one scale per output channel.

    Buffers (all in state_dict):
      qweight  bits=8: int8 (out, in), the codes, row-major.
               bits=4: uint8 (out, in // 2). Each run of 32 codes along `in` is 16 bytes;
                       byte j holds code j in its low nibble and code j + 16 in its high
                       nibble, so one 16-byte load unpacks (and, shift) into 32 consecutive
                       codes. A shorter last run of t codes uses t/2 in place of 16.
      scales   float16 (out, in // group_size)
      mins     float16 (out, in // group_size), bits=4 only
      bias     float32 (out,), optional
    Dequantization is exact in fp32: scale.float() * code (+ min.float()).

    The fast kernels need group_size % 32 == 0; other group sizes use the PyTorch path.
    They compute no gradients: with autograd recording and x requiring grad, forward
    uses the PyTorch path too.

    act_bits (attribute, not saved): 32 computes with x as given; 8 rounds x to int8
    blocks first (see quantize_activations) and uses the integer-dot kernels, for fewer
    than PREFILL_MIN_M rows of x (decode, batches); prefill-sized inputs take the exact
    tile GEMM, which is faster. It needs group_size % 32 == 0 and is ignored otherwise.
    """

    act_bits = 32

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__()
        _check_config(in_features, out_features, bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        ng = in_features // group_size
        if bits == 8:
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        else:
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, ng, dtype=torch.float16))
        mins = torch.empty(out_features, ng, dtype=torch.float16) if bits == 4 else None
        self.register_buffer("mins", mins)
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32) if bias else None)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor | None,
        bits: int,
        bias: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Pack integer codes (out, in) and per-group scales / mins (out, in // G) losslessly."""
        if codes.dim() != 2 or scales.dim() != 2 or scales.shape[0] != codes.shape[0]:
            raise ValueError(
                f"codes must be (out, in) and scales (out, in // group_size), got codes "
                f"{tuple(codes.shape)} and scales {tuple(scales.shape)}"
            )
        out_features, in_features = codes.shape
        ng = scales.shape[1]
        if ng == 0 or in_features % ng:
            raise ValueError(
                f"scales has {ng} columns, which does not divide in_features={in_features}"
            )
        group_size = in_features // ng
        _check_config(in_features, out_features, bits, group_size)
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype={codes.dtype}")
        lo, hi = (-128, 127) if bits == 8 else (0, 15)
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise ValueError(f"codes for bits={bits} must lie in [{lo}, {hi}]")
        if (bits == 4) != (mins is not None):
            raise ValueError(f"mins must be given for bits=4 and only for bits=4 (bits={bits})")
        if mins is not None and mins.shape != scales.shape:
            raise ValueError(f"mins must have the shape of scales {tuple(scales.shape)}, got {tuple(mins.shape)}")

        with torch.device("meta"):  # shapes only; every buffer is replaced below
            layer = cls(in_features, out_features, bits, group_size, bias=bias is not None)
        if bits == 8:
            layer.qweight = codes.to(torch.int8).contiguous()
        else:
            layer.qweight = _pack4(codes.to(torch.uint8))
            layer.mins = mins.detach().to(torch.float16).contiguous()
        layer.scales = scales.detach().to(torch.float16).contiguous()
        if bias is not None:
            layer.bias = bias.detach().to(torch.float32).contiguous()
        return layer

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int, bias=None) -> "QuantLinear":
        """Round-to-nearest quantization: int8 symmetric absmax, int4 asymmetric min/max.

        Scales (and int4 mins) are rounded to fp16 outward, so every weight lies in the
        range its group can represent and the error is at most half a step (scale / 2).
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        _check_config(in_features, out_features, bits, group_size)
        w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        if not torch.isfinite(w).all():
            raise ValueError("weight contains inf or nan and cannot be quantized")
        if bits == 8:
            scale = _fp16_up(w.abs().amax(-1) / 127)
            mins = None
            safe = torch.where(scale == 0, 1.0, scale.float()).unsqueeze(-1)
            codes = torch.round(w / safe).clamp_(-127, 127).to(torch.int8)
        else:
            mins = _fp16_down(w.amin(-1))
            scale = _fp16_up((w.amax(-1) - mins.float()) / 15)
            safe = torch.where(scale == 0, 1.0, scale.float()).unsqueeze(-1)
            codes = torch.round((w - mins.float().unsqueeze(-1)) / safe).clamp_(0, 15).to(torch.uint8)
        return cls.from_codes(codes.reshape(out_features, in_features), scale, mins, bits, bias=bias)

    # ------------------------------------------------------------------ dequantization

    def _dequantize_rows(self, qweight, scales, mins) -> torch.Tensor:
        """Rows of W in fp32 from their packed codes / scales / mins."""
        R, G = qweight.shape[0], self.group_size
        codes = qweight if self.bits == 8 else _unpack4(qweight)
        w = codes.float().view(R, -1, G) * scales.float().unsqueeze(-1)
        if mins is not None:
            w += mins.float().unsqueeze(-1)
        return w.view(R, self.in_features)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W as a dense (out_features, in_features) tensor."""
        return self._dequantize_rows(self.qweight, self.scales, self.mins).to(dtype)

    def embedding(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx of W in fp32, (...,) -> (..., in_features); for an embedding tied to this layer."""
        flat = idx.reshape(-1)
        mins = self.mins[flat] if self.mins is not None else None
        rows = self._dequantize_rows(self.qweight[flat], self.scales[flat], mins)
        return rows.view(*idx.shape, self.in_features)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this per layer per token, in µs: keep the Python here lean.
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(f"expected x (..., {self.in_features}), got shape {tuple(shape)}")
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        buf = self._buffers
        fits = self.group_size % _CHUNK == 0
        act_bits = self.act_bits if fits else 32
        if (
            fits
            and x2.device.type == "cpu"
            and not (x2.requires_grad and torch.is_grad_enabled())
            and kernels_available()
        ):
            y = _ext.linear(
                x2.contiguous(), buf["qweight"], buf["scales"], buf["mins"], buf["bias"],
                self.bits, self.group_size,
                _prefill_min_m(self.in_features), PREFILL_TILE_N, act_bits,
            )  # fmt: skip
        else:
            if act_bits == 8 and x2.shape[0] < _prefill_min_m(self.in_features):  # as the kernels do
                x2 = quantize_activations(x2)
            y = F.linear(x2, self.dequantize(), buf["bias"])
        y = y.view(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
            + (f", act_bits={self.act_bits}" if self.act_bits != 32 else "")
        )


def quantize_model(model: nn.Module, bits: int, group_size: int, skip=()) -> dict:
    """Replace every nn.Linear whose qualified name is not in `skip` by a QuantLinear, in place.

    Returns {module_name: {"bits": bits, "group_size": group_size}} for the layers replaced,
    which is what a loader needs to rebuild the model (under torch.device('meta')) before
    load_state_dict(..., assign=True). A Linear whose weight is shared with an embedding
    (tied lm_head) gets its own quantized copy; the embedding is left alone, so to save the
    memory use QuantLinear.embedding for the lookup instead.
    """
    skip = set(skip)
    targets = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name and name not in skip
    ]
    for name, lin in targets:  # validate first, so that a bad option leaves the model intact
        _check_config(lin.in_features, lin.out_features, bits, group_size)
    replaced = {}
    for name, lin in targets:
        q = QuantLinear.from_float(lin.weight, bits, group_size, bias=lin.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, q)
        replaced[name] = {"bits": bits, "group_size": group_size}
    return replaced


def set_activation_bits(model: nn.Module, bits: int) -> int:
    """Set act_bits (8: int8 activations, 32: as given) on every QuantLinear; return how many."""
    if bits not in (8, 32):
        raise ValueError(f"activation bits must be 8 or 32, got {bits!r}")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.act_bits = bits
    return len(layers)
