"""QuantLinear: lossless packing, quantization error bounds, kernels vs the PyTorch path."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from muse import quant
from muse.quant import QuantLinear, kernels_available, quantize_model
from tests.helpers import isas_to_test

GROUPS = [32, 64, 128, None]  # None: per-channel (group_size == in_features)


class Spy:
    """Wraps the compiled extension and counts calls, to prove which path ran."""

    def __init__(self, ext):
        self.ext, self.calls = ext, 0

    def linear(self, *args):
        self.calls += 1
        return self.ext.linear(*args)


@pytest.fixture
def kernels(monkeypatch):
    """The compiled kernels, spied on; skipped only where no C++ compiler exists."""
    monkeypatch.delenv("MUSE_NO_KERNELS", raising=False)
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here")
    assert kernels_available(), "a compiler exists but the quantized CPU kernels failed to build"
    spy = Spy(quant._ext)
    monkeypatch.setattr(quant, "_ext", spy)
    return spy


def fallback(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), layer.dequantize(), layer.bias).to(x.dtype)


def assert_close_scaled(y, ref, tol=1e-4):
    # fp32 tolerance relative to the output's scale: sums are reordered, not changed
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * ref.abs().max().item())


def random_codes(out_f, in_f, bits, G, gen):
    ng = in_f // G
    scales = (torch.rand(out_f, ng, generator=gen) * 0.1 + 1e-3).half()
    if bits == 8:
        codes = torch.randint(-128, 128, (out_f, in_f), generator=gen, dtype=torch.int8)
        return codes, scales, None
    codes = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
    mins = (torch.randn(out_f, ng, generator=gen) * 0.5).half()
    return codes, scales, mins


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("in_f", [96, 100, 64])  # 100: int4 packs a short last run of 4 codes
def test_from_codes_is_lossless(bits, in_f):
    gen = torch.Generator().manual_seed(0)
    codes, scales, mins = random_codes(7, in_f, bits, in_f // 2 if in_f != 96 else 32, gen)
    layer = QuantLinear.from_codes(codes, scales, mins, bits)
    G = layer.group_size
    expect = codes.float() * scales.float().repeat_interleave(G, 1)
    if mins is not None:
        expect += mins.float().repeat_interleave(G, 1)
    assert torch.equal(layer.dequantize(), expect)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    if bits == 8:
        assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (7, in_f)
        assert layer.mins is None
    else:
        assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (7, in_f // 2)
        assert torch.equal(layer.mins, mins)


def test_gguf_q4_0_blocks_are_exact():
    # Q4_0: w = d * (q - 8)  ->  codes q, scale d, min -8 d (exact in fp16 and fp32)
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (5, 64), generator=gen, dtype=torch.uint8)
    d = (torch.rand(5, 2, generator=gen) * 0.05).half()
    layer = QuantLinear.from_codes(q, d, -8 * d, bits=4)
    ggml = (q.float() - 8) * d.float().repeat_interleave(32, 1)
    assert torch.equal(layer.dequantize(), ggml)


def test_int4_layout_is_documented_nibble_order():
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).view(1, 32)
    codes[0, 16:] = 15 - codes[0, 16:]
    layer = QuantLinear.from_codes(codes, torch.ones(1, 1, dtype=torch.float16),
                                   torch.zeros(1, 1, dtype=torch.float16), bits=4)  # fmt: skip
    q = layer.qweight[0]
    assert torch.equal(q & 15, codes[0, :16]) and torch.equal(q >> 4, codes[0, 16:])


# ----------------------------------------------------------------------------- quantization


def test_from_float_int8_per_channel_error_bound():
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 64).unsqueeze(1)
    layer = QuantLinear.from_float(w, bits=8, group_size=256)
    err = (layer.dequantize() - w).abs()
    half_step = layer.scales.float() / 2  # (64, 1)
    assert (err <= half_step * (1 + 1e-5)).all()
    assert (layer.qweight.abs() <= 127).all()


@pytest.mark.parametrize("G", [32, 128])
def test_from_float_int4_groupwise_error_bound(G):
    w = torch.randn(48, 256) * 0.05 + torch.linspace(-1, 1, 48).unsqueeze(1)  # offset rows: asymmetric
    w[0, :G] = 0.3  # a constant group
    layer = QuantLinear.from_float(w, bits=4, group_size=G)
    err = (layer.dequantize() - w).abs().view(48, -1, G)
    half_step = layer.scales.float().unsqueeze(-1) / 2
    assert (err <= half_step * (1 + 1e-5) + 1e-7).all()
    codes = quant._unpack4(layer.qweight)
    assert codes.max() <= 15


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("M", [1, 37])
def test_kernel_matches_fallback(kernels, bits, G, M):
    gen = torch.Generator().manual_seed(bits * 1000 + (G or 0) + M)
    out_f, in_f = 83, 256  # odd number of output rows
    layer = QuantLinear.from_float(torch.randn(out_f, in_f, generator=gen), bits, G or in_f,
                                   bias=torch.randn(out_f, generator=gen))  # fmt: skip
    x = torch.randn(M, in_f, generator=gen)
    assert_close_scaled(layer(x), fallback(layer, x))
    layer.bias = None
    assert_close_scaled(layer(x), fallback(layer, x))
    assert kernels.calls == 2


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_fallback_on_gguf_style_codes(kernels, bits):
    # full code range (int8 -128 included), fp16 scales and mins as GGUF blocks give them
    gen = torch.Generator().manual_seed(bits)
    codes, scales, mins = random_codes(70, 320, bits, 32, gen)
    codes[0, 0] = -128 if bits == 8 else 15
    layer = QuantLinear.from_codes(codes, scales, mins, bits)
    x = torch.randn(2, 320, generator=gen)
    assert_close_scaled(layer(x), fallback(layer, x))
    assert kernels.calls == 1


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_input_shapes_and_dtypes(kernels, bits):
    gen = torch.Generator().manual_seed(3)
    layer = QuantLinear.from_float(torch.randn(40, 128, generator=gen), bits, 32, bias=torch.randn(40, generator=gen))
    x3 = torch.randn(3, 5, 128, generator=gen)  # (B, T, in)
    y = layer(x3)
    assert y.shape == (3, 5, 40)
    assert_close_scaled(y, fallback(layer, x3))
    xt = torch.randn(128, 6, generator=gen).t()  # non-contiguous (6, 128)
    assert not xt.is_contiguous()
    assert_close_scaled(layer(xt), fallback(layer, xt))
    xb = x3.bfloat16()
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, fallback(layer, xb.float()).bfloat16())
    assert kernels.calls == 3


@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_tiles_match_fallback(kernels, monkeypatch, bits):
    # the dequantize-a-tile + at::mm path, with a tile that does not divide out_features
    monkeypatch.setattr(quant, "PREFILL_MIN_M", 2)
    monkeypatch.setattr(quant, "PREFILL_MIN_K", 0)
    monkeypatch.setattr(quant, "PREFILL_TILE_N", 16)
    gen = torch.Generator().manual_seed(4)
    layer = QuantLinear.from_float(torch.randn(50, 192, generator=gen), bits, 64, bias=torch.randn(50, generator=gen))
    x = torch.randn(9, 192, generator=gen)
    assert_close_scaled(layer(x), fallback(layer, x))
    assert kernels.calls == 1


# ----------------------------------------------------------------------------- instruction sets, int8 activations


@pytest.fixture(scope="module", params=isas_to_test())
def isa_module(request):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here")
    module = quant.kernels(request.param)
    assert module.isa() == request.param
    return module


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act_bits", [32, 8])
@pytest.mark.parametrize("shape", [(1, 7, 96, 32), (2, 33, 128, 64), (3, 9, 256, 256), (5, 50, 320, 32),
                                   (7, 11, 96, 32), (13, 18, 64, 32), (14, 5, 64, 32)])
# (M, N, K, G): odd rows of W; x rows in one pass of 5-7 on AVX2, 8 + 4 + 1 and 8 + 6
def test_every_instruction_set_matches_the_pytorch_reference(isa_module, bits, act_bits, shape):
    M, N, K, G = shape
    gen = torch.Generator().manual_seed(M * 100 + N + bits)
    codes, scales, mins = random_codes(N, K, bits, G, gen)
    codes[0, :3] = torch.tensor([-128, 127, 0] if bits == 8 else [15, 0, 15])  # the ends of the range
    layer = QuantLinear.from_codes(codes, scales, mins, bits, bias=torch.randn(N, generator=gen))
    x = torch.randn(M, K, generator=gen) * torch.rand(M, K, generator=gen).pow(4) * 3  # spread block scales
    x[0, :32] = 0.0  # an all-zero activation block (scale 0)
    b = layer._buffers
    y = isa_module.linear(x, b["qweight"], b["scales"], b["mins"], b["bias"], bits, G, 1 << 62, 256, act_bits)
    xr = quant.quantize_activations(x) if act_bits == 8 else x
    assert_close_scaled(y, F.linear(xr, layer.dequantize(), layer.bias))


def test_int8_activations_round_half_to_even_in_blocks_of_32():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 2] = 127.0, 2.5, -3.5  # d = 1: 2.5 -> 2, -3.5 -> -4
    x[0, 32:] = torch.linspace(-0.5, 0.25, 32)  # its own block: d = 0.5 / 127
    q = quant.quantize_activations(x)
    assert q[0, :3].tolist() == [127.0, 2.0, -4.0]
    d = 0.5 / 127
    assert (q[0, 32:] - x[0, 32:]).abs().max() <= d / 2 + 1e-7
    assert q[0, 32] == -0.5  # the block's extreme is exact


def test_w4a8_layers_use_the_int8_kernel_and_stay_close_to_exact(kernels):
    gen = torch.Generator().manual_seed(9)
    layer = QuantLinear.from_float(torch.randn(64, 256, generator=gen), 4, 32)
    x = torch.randn(3, 256, generator=gen)
    exact = layer(x)
    layer.act_bits = 8
    y = layer(x)
    assert kernels.calls == 2
    assert_close_scaled(y, F.linear(quant.quantize_activations(x), layer.dequantize()))
    rel = (y - exact).norm() / exact.norm()
    assert 0 < rel < 0.02  # x moved by its rounding, not more
    assert "act_bits=8" in repr(layer)
    xp = torch.randn(quant.PREFILL_MIN_M, 256, generator=gen)  # prefill-sized: the exact tile GEMM
    layer.act_bits = 32
    exact_p = layer(xp)
    layer.act_bits = 8
    assert_close_scaled(layer(xp), exact_p)


def test_muse_cpu_forces_an_instruction_set_and_refuses_what_the_cpu_lacks(monkeypatch):
    monkeypatch.setenv("MUSE_CPU", "scalar")
    assert quant.kernel_isa() == "scalar"
    if "avx2" in quant.cpu_isas():
        monkeypatch.setenv("MUSE_CPU", "AVX2")
        assert quant.kernel_isa() == "avx2"
    monkeypatch.setenv("MUSE_CPU", "sse9")
    with pytest.warns(RuntimeWarning, match="not one of"):
        assert quant.kernel_isa() == quant.cpu_isas()[0]
    monkeypatch.setattr(quant, "cpu_isas", lambda: ("avx2", "scalar"))
    monkeypatch.setenv("MUSE_CPU", "avx512")
    with pytest.warns(RuntimeWarning, match="lacks"):
        assert quant.kernel_isa() == "avx2"
    with pytest.raises(ValueError, match="does not run"):
        quant.kernels("avx512")


def test_the_forced_isa_is_the_module_the_layers_run(monkeypatch):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here")
    monkeypatch.delenv("MUSE_NO_KERNELS", raising=False)
    monkeypatch.setenv("MUSE_CPU", "scalar")
    monkeypatch.setattr(quant, "_ext", None)
    monkeypatch.setattr(quant, "_ext_tried", False)
    assert kernels_available() and quant._ext.isa() == "scalar"
    spy = Spy(quant._ext)
    monkeypatch.setattr(quant, "_ext", spy)
    layer = QuantLinear.from_float(torch.randn(8, 64), 4, 32)
    x = torch.randn(2, 64)
    assert_close_scaled(layer(x), fallback(layer, x))
    assert spy.calls == 1


def test_no_kernels_env_uses_pytorch_path_with_same_numbers(kernels, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    layer = QuantLinear.from_float(torch.randn(64, 96, generator=gen), 4, 32, bias=torch.randn(64, generator=gen))
    x = torch.randn(4, 96, generator=gen)
    y_kernel = layer(x)
    monkeypatch.setenv("MUSE_NO_KERNELS", "1")
    assert not kernels_available()
    y_torch = layer(x)
    assert kernels.calls == 1  # the second call did not reach the extension
    assert_close_scaled(y_kernel, y_torch)


def test_group_size_not_multiple_of_32_uses_pytorch_path(kernels):
    layer = QuantLinear.from_float(torch.randn(8, 48), 8, 16)
    x = torch.randn(2, 48)
    assert_close_scaled(layer(x), fallback(layer, x))
    assert kernels.calls == 0


def test_autograd_flows_through_pytorch_path(kernels):
    layer = QuantLinear.from_float(torch.randn(8, 64), 8, 32)
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and kernels.calls == 0


def test_build_failure_warns_and_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.delenv("MUSE_NO_KERNELS", raising=False)
    monkeypatch.setattr(quant, "_build_extension", broken)
    monkeypatch.setattr(quant, "_ext", None)
    monkeypatch.setattr(quant, "_ext_tried", False)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert not kernels_available()
    layer = QuantLinear.from_float(torch.randn(8, 64), 8, 32)
    x = torch.randn(1, 64)
    assert_close_scaled(layer(x), fallback(layer, x))  # and no second warning or crash


def test_build_runs_once_across_threads(monkeypatch):
    builds = []
    started = threading.Event()

    def slow_build():
        started.wait(1)
        builds.append(1)
        return object()

    monkeypatch.delenv("MUSE_NO_KERNELS", raising=False)
    monkeypatch.setattr(quant, "_build_extension", slow_build)
    monkeypatch.setattr(quant, "_ext", None)
    monkeypatch.setattr(quant, "_ext_tried", False)
    results = []
    threads = [threading.Thread(target=lambda: results.append(kernels_available())) for _ in range(4)]
    for t in threads:
        t.start()
    started.set()
    for t in threads:
        t.join()
    assert builds == [1] and results == [True] * 4


def test_a_build_killed_midway_does_not_hang_the_next_start(kernels):
    """cpp_extension marks a build in progress with a file its builder deletes when done; a build
    killed midway (Ctrl-C during the first run's compile) left it, and every later start of Muse
    waited for it forever. The timeout only bounds the failure: without the guard it never ends."""
    isa = quant.kernel_isa()
    with quant.build_lock(quant.extension_name(isa)) as marker:
        marker.touch()  # what the killed build left behind
    code = f"from muse import quant; print(quant.kernels({isa!r}).isa())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == isa
    assert not marker.exists()


# ----------------------------------------------------------------------------- module API


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_rows_equal_dequantized_rows(bits):
    layer = QuantLinear.from_float(torch.randn(50, 64), bits, 32)
    idx = torch.tensor([[3, 0, 49], [7, 7, 1]])
    emb = layer.embedding(idx)
    assert emb.shape == (2, 3, 64) and emb.dtype == torch.float32
    assert torch.equal(emb, layer.dequantize()[idx])


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)
        self.head = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.head(self.down(F.gelu(self.up(x))))


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_round_trips_through_safetensors_into_meta_model(tmp_path, bits):
    torch.manual_seed(0)
    model = TwoLayer()
    config = quantize_model(model, bits, 32, skip={"head"})
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))

    with torch.device("meta"):
        fresh = TwoLayer()
        for name, opts in config.items():
            lin = fresh.get_submodule(name)
            setattr(fresh, name, QuantLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, **opts))
    assert fresh.up.qweight.is_meta
    fresh.load_state_dict(load_file(str(path)), assign=True)

    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))
    assert fresh.up.scales.dtype == torch.float16 and fresh.up.bias.dtype == torch.float32
    assert set(model.up.state_dict()) == ({"qweight", "scales", "bias"} | ({"mins"} if bits == 4 else set()))


@pytest.mark.parametrize("bits, tol", [(8, 0.01), (4, 0.15)])
def test_quantize_model_replaces_linears_and_stays_close(bits, tol):
    torch.manual_seed(0)
    model = TwoLayer()
    x = torch.randn(5, 64)
    ref = model(x)
    config = quantize_model(model, bits, 32, skip={"head"})
    assert config == {"up": {"bits": bits, "group_size": 32}, "down": {"bits": bits, "group_size": 32}}
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, QuantLinear)
    assert type(model.head) is nn.Linear
    rel = (model(x) - ref).norm() / ref.norm()
    assert rel < tol
    assert "bits=%d" % bits in repr(model.up) and "group_size=32" in repr(model.up)


def test_quant_linear_builds_under_meta_device():
    with torch.device("meta"):
        layer = QuantLinear(64, 16, bits=4, group_size=32, bias=True)
    assert layer.qweight.shape == (16, 32) and layer.qweight.dtype == torch.uint8
    assert layer.scales.shape == (16, 2) and layer.mins.shape == (16, 2) and layer.bias.shape == (16,)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(in_features=64, out_features=8, bits=3, group_size=32), "bits"),
        (dict(in_features=64, out_features=8, bits=8, group_size=24), "group_size"),
        (dict(in_features=64, out_features=8, bits=8, group_size=0), "group_size"),
        (dict(in_features=63, out_features=8, bits=4, group_size=63), "in_features"),
    ],
)
def test_bad_config_raises_value_error_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=name):
        QuantLinear(**kwargs)


def test_bad_arguments_to_constructors_raise_value_error():
    with pytest.raises(ValueError, match="bits"):
        QuantLinear.from_float(torch.randn(8, 64), bits=2, group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear.from_float(torch.randn(8, 64), bits=8, group_size=48)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        QuantLinear.from_codes(torch.full((2, 32), 16, dtype=torch.uint8), torch.ones(2, 1),
                               torch.zeros(2, 1), bits=4)  # fmt: skip
    with pytest.raises(ValueError, match="mins"):
        QuantLinear.from_codes(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 1), None, bits=4)
    model = TwoLayer()
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(model, 8, 48)
    assert type(model.up) is nn.Linear  # left intact
    layer = QuantLinear.from_float(torch.randn(8, 64), 8, 32)
    with pytest.raises(ValueError, match="64"):
        layer(torch.randn(2, 63))
