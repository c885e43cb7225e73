"""muse.compress: quantize/prune → save → load, what pruning keeps, the sweep, and the CLI."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import muse
from muse import compress
from muse.api import Model
from muse.cli import app
from muse.config import ModelConfig
from muse.eval.divergence import kl_divergence
from muse.eval.perplexity import perplexity
from muse.model import Transformer
from muse.quant import QuantLinear

TEXT = ("The first lighthouses were fires lit on hilltops to guide ships into harbour. For centuries the light "
        "itself changed little: wood, then coal, then candles and oil lamps, whose weak and smoky flames could "
        "be seen only a few miles out to sea.")


def tiny(arch="llama", tokenizer=None, vocab=101, seed=0, **kw) -> Model:
    """A small random model (GQA 4/2 for llama; MHA with biases for gpt2)."""
    shape = dict(vocab_size=vocab, n_layer=2, n_head=4, n_embd=64, intermediate_size=128, block_size=128)
    if arch == "llama":
        shape["n_kv_head"] = 2
    net = Transformer(ModelConfig(arch=arch, **{**shape, **kw})).init_weights(seed=seed)
    if arch == "gpt2":  # non-zero biases, so slicing them is tested too
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.02)
    return Model(net.eval(), tokenizer, {"name": f"tiny-{arch}"})


def logits(m: Model, ids=None) -> torch.Tensor:
    ids = list(range(1, 40)) if ids is None else ids
    with torch.no_grad():
        return m.model(torch.tensor([ids]))[0][0]


@pytest.fixture(scope="module")
def fp32_default():
    return muse.load(precision="fp32")


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits,group,embeddings", [(8, None, "int8"), (4, 32, "int8"), (4, 32, "same"),
                                                   (8, 32, "fp32")])
def test_quantize_save_load_round_trip(tmp_path, bits, group, embeddings):
    m = tiny()
    q = compress.quantize(m, bits, group, out=tmp_path / "q", embeddings=embeddings)
    assert isinstance(m.model.layers[0].attn.qkv, torch.nn.Linear)  # the input model is left alone
    net = q.model
    want_group = group or 64  # int8 default: one scale per output channel (in_features = 64 here)
    assert isinstance(net.layers[0].attn.qkv, QuantLinear) and net.layers[0].attn.qkv.bits == bits
    assert net.layers[0].attn.qkv.group_size == want_group
    assert net.layers[0].mlp.down.group_size == (group or 128)
    if embeddings == "fp32":
        assert isinstance(net.wte, torch.nn.Embedding) and "wte" not in q.info["quantization"]
    else:
        assert isinstance(net.wte, QuantLinear) and net.wte.bits == (8 if embeddings == "int8" else bits)
    # each weight within half a quantization step of the original
    orig, layer = m.model.layers[1].mlp.gate_up.weight, net.layers[1].mlp.gate_up
    step = layer.scales.float().repeat_interleave(layer.group_size, 1)
    assert torch.all((layer.dequantize() - orig).abs() <= step / 2 + 1e-6)

    loaded = muse.load(tmp_path / "q")
    assert loaded.info["quantization"] == q.info["quantization"]
    assert torch.equal(logits(loaded), logits(q))  # same bytes, same numbers
    assert compress.weight_bytes(q) < compress.weight_bytes(m) / (2.5 if bits == 8 else 4.5)


def test_group_size_that_does_not_divide_falls_back_with_a_warning():
    with pytest.warns(UserWarning, match="group_size=128 does not divide"):
        q = compress.quantize(tiny(), 4, 128)
    groups = {n: spec["group_size"] for n, spec in q.info["quantization"].items()}
    assert groups["layers.0.mlp.down"] == 128  # in_features 128
    assert groups["layers.0.attn.qkv"] == 64  # in_features 64: the largest divisor below 128


def test_int8_close_to_fp32_on_the_default_model(fp32_default):
    q = compress.quantize(fp32_default, 8)
    assert q.info["quantization"]["layers.0.mlp.down"] == {"bits": 8, "group_size": 1536}  # per channel
    r = kl_divergence(fp32_default, q, TEXT)
    # bench/compress.py measures ~0.004 on 4k tokens of Shakespeare; this short text's first
    # positions (little context, flat distributions) weigh more: ~0.007
    assert r.mean < 0.01 and r.same_top1 > 90


def test_quantize_a_quantized_model_dequantizes_it_first():
    q4 = compress.quantize(tiny(), 4, 32, embeddings="same")
    q8 = compress.quantize(q4, 8)
    assert q4.model.layers[0].attn.qkv.bits == 4 and q4.model.wte.bits == 4  # the input is untouched
    for src, layer in ((q4.model.layers[0].attn.qkv, q8.model.layers[0].attn.qkv), (q4.model.wte, q8.model.wte)):
        assert layer.bits == 8 and layer.group_size == 64  # per channel
        step = layer.scales.float()  # (out, 1)
        assert torch.all((layer.dequantize() - src.dequantize()).abs() <= step / 2 + 1e-6)


def test_bad_quantize_input(tmp_path):
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        compress.quantize(tiny(), 3)
    with pytest.raises(ValueError, match="group_size"):
        compress.quantize(tiny(), 4, 0)
    with pytest.raises(ValueError, match="embeddings"):
        compress.quantize(tiny(), 4, embeddings="int2")
    with pytest.raises(muse.ModelNotFoundError):
        compress.quantize(tmp_path / "missing", 8)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(muse.MuseError, match="not a Muse checkpoint"):
        compress.quantize(tiny(), 8, out=tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"  # never replaced


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_pruning_reaches_the_sparsity_and_drops_the_smallest(scope):
    m = tiny()
    p = compress.prune(m, 0.3, "magnitude", scope=scope)
    assert compress.sparsity_of(m) == 0.0
    assert compress.sparsity_of(p) == pytest.approx(0.3, abs=1e-4)
    pairs = [(a.weight, b.weight) for (_, a), (_, b) in zip(compress._block_linears(m.model),
                                                             compress._block_linears(p.model))]
    if scope == "layer":
        for w, pw in pairs:
            assert (pw == 0).sum() == round(0.3 * w.numel())
    zeroed = torch.cat([w[pw == 0].abs() for w, pw in pairs])
    kept = torch.cat([w[pw != 0].abs() for w, pw in pairs])
    if scope == "global":
        assert zeroed.max() <= kept.min()  # one threshold over all layers
    for w, pw in pairs:
        assert torch.equal(pw[pw != 0], w[pw != 0])  # survivors unchanged
    assert torch.equal(p.model.wte.weight, m.model.wte.weight)  # the embedding is never pruned


def _zero_channels_and_heads(m: Model) -> None:
    """Make half the MLP channels and half the query heads exact zeros: structured pruning at
    0.5 must remove exactly those, so the output stays the same."""
    cfg = m.config
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    with torch.no_grad():
        for block in m.model.layers:
            mlp = block.mlp
            dead = torch.arange(1, cfg.intermediate_size, 2)  # odd channels
            if mlp.kind == "swiglu":
                mlp.gate_up.weight[dead] = 0
                mlp.gate_up.weight[cfg.intermediate_size + dead] = 0
                mlp.down.weight[:, dead] = 0
            else:
                mlp.fc.weight[dead] = 0
                mlp.fc.bias[dead] = 0
                mlp.proj.weight[:, dead] = 0
            # GQA: one query head per kv group; MHA: whole heads (q, k, v and their output columns)
            heads = [g * (nh // nkv) for g in range(nkv)] if nh != nkv else [1, 2]
            for h in heads:
                rows = [slice(h * hd, (h + 1) * hd)]
                if nh == nkv:
                    rows += [slice((nh + h) * hd, (nh + h + 1) * hd), slice((2 * nh + h) * hd, (2 * nh + h + 1) * hd)]
                for r in rows:
                    block.attn.qkv.weight[r] = 0
                    if block.attn.qkv.bias is not None:
                        block.attn.qkv.bias[r] = 0
                block.attn.proj.weight[:, h * hd:(h + 1) * hd] = 0


CALIB = list(range(3, 90))  # calibration token ids for the tokenizer-less tiny models


@pytest.mark.parametrize("arch,criterion", [("llama", "activation"), ("llama", "weight"), ("gpt2", "activation"),
                                            ("gpt2", "weight")])
def test_structured_pruning_removes_the_weakest_channels_and_heads(tmp_path, arch, criterion):
    m = tiny(arch)
    _zero_channels_and_heads(m)
    p = compress.prune(m, 0.5, "structured", criterion=criterion, calibration=CALIB, out=tmp_path / "p")
    c = p.config
    assert c.intermediate_size == 64 and c.n_head == 2
    assert c.n_kv_head == 2 and c.head_dim == m.config.head_dim  # GQA keeps its kv heads; MHA drops whole heads
    hidden = p.model.layers[0].mlp.down.weight if arch == "llama" else p.model.layers[0].mlp.proj.weight
    assert hidden.shape == (64, 64)
    assert p.model.layers[0].attn.qkv.weight.shape == ((c.n_head + 2 * c.n_kv_head) * c.head_dim, 64)
    assert compress.count_params(p) < compress.count_params(m)
    torch.testing.assert_close(logits(p), logits(m), rtol=1e-5, atol=1e-5)  # only zeros were removed
    loaded = muse.load(tmp_path / "p")
    assert loaded.config == c
    assert torch.equal(logits(loaded), logits(p))


def test_activation_criterion_sees_what_weight_norms_miss():
    """Channels with big up/down weights but a zero gate never fire: the activation criterion
    removes exactly them (output unchanged); the weight criterion keeps them and loses others."""
    m = tiny()
    I = m.config.intermediate_size
    with torch.no_grad():
        for block in m.model.layers:
            idle = torch.arange(0, I, 2)
            block.mlp.gate_up.weight[idle] = 0  # silu(0) = 0: these channels output nothing
            block.mlp.gate_up.weight[I + idle] *= 10
            block.mlp.down.weight[:, idle] *= 10
    by_act = compress.prune(m, 0.5, "structured", parts=["mlp"], calibration=CALIB)
    by_weight = compress.prune(m, 0.5, "structured", parts=["mlp"], criterion="weight")
    torch.testing.assert_close(logits(by_act), logits(m), rtol=1e-5, atol=1e-5)
    assert (logits(by_weight) - logits(m)).abs().max() > 1e-3


def test_structured_pruning_at_zero_is_the_original_and_parts_are_separate():
    m = tiny()
    p0 = compress.prune(m, 0.0, "structured", calibration=CALIB)
    assert p0.config == m.config and torch.equal(logits(p0), logits(m))
    mlp_only = compress.prune(m, 0.5, "structured", parts=["mlp"], criterion="weight")
    assert mlp_only.config.n_head == 4 and mlp_only.config.intermediate_size == 64
    heads_only = compress.prune(m, 0.5, "structured", parts=["heads"], calibration=CALIB)
    assert heads_only.config.n_head == 2 and heads_only.config.intermediate_size == 128
    assert torch.isfinite(logits(heads_only)).all()


def test_pruned_model_can_be_quantized(tmp_path):
    p = compress.prune(tiny(), 0.25, "structured", parts=["mlp"], calibration=CALIB)
    assert p.config.intermediate_size == 96  # 128 * 0.75, a multiple of 32: int4 groups of 32 fit
    q = compress.quantize(p, 4, 32, out=tmp_path / "pq")
    assert torch.equal(logits(muse.load(tmp_path / "pq")), logits(q))


def test_bad_prune_input():
    with pytest.raises(ValueError, match="sparsity must be a fraction"):
        compress.prune(tiny(), 1.5)
    with pytest.raises(ValueError, match="method"):
        compress.prune(tiny(), 0.3, "random")
    with pytest.raises(ValueError, match="scope must be 'layer'"):
        compress.prune(tiny(), 0.3, "structured", scope="global")
    with pytest.raises(ValueError, match="parts"):
        compress.prune(tiny(), 0.3, "structured", parts=["experts"])
    with pytest.raises(ValueError, match="criterion"):
        compress.prune(tiny(), 0.3, "structured", criterion="random")
    with pytest.raises(ValueError, match="no tokenizer: pass calibration token ids"):
        compress.prune(tiny(), 0.3, "structured")


# ----------------------------------------------------------------------------- the sweep


@pytest.fixture
def tiny_tok(default_model):
    """A tiny random model with the default model's tokenizer, so it reads text."""
    return tiny(tokenizer=default_model.tokenizer, vocab=default_model.config.vocab_size, n_embd=32)


@pytest.mark.parametrize("method", ["magnitude", "structured"])
def test_sweep_rows(tiny_tok, method):
    rows = compress.sweep(tiny_tok, [0.25, 0.5], method, TEXT, parts=["mlp"])
    assert [r["sparsity"] for r in rows] == [0.0, 0.25, 0.5]
    assert rows[0]["perplexity"] == pytest.approx(perplexity(tiny_tok, TEXT).perplexity)
    assert rows[0]["delta"] == 0
    p = compress.prune(tiny_tok, 0.5, method, parts=["mlp"])
    assert rows[2]["perplexity"] == pytest.approx(perplexity(p, TEXT).perplexity)
    assert rows[2]["delta"] == pytest.approx(rows[2]["perplexity"] - rows[0]["perplexity"])
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    sizes = [r["bytes"] for r in rows]
    assert (sizes[0] > sizes[1] > sizes[2]) if method == "structured" else len(set(sizes)) == 1
    short = compress.sweep(tiny_tok, [0.5], method, TEXT, parts=["mlp"], max_tokens=20)
    assert short[0]["tokens"] == 20


# ----------------------------------------------------------------------------- CLI

runner = CliRunner()


@pytest.fixture
def tiny_dir(tmp_path, tiny_tok):
    return muse.save_checkpoint(tmp_path / "tiny", tiny_tok.model, tiny_tok.tokenizer)


def test_cli_quantize_then_use_the_directory(tiny_dir, tmp_path):
    out = tmp_path / "q4"
    res = runner.invoke(app, ["quantize", str(tiny_dir), "--bits", "4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "int4 g32" in res.output and "Saved" in res.output
    res = runner.invoke(app, ["info", "--model", str(out)])
    assert res.exit_code == 0 and "int4 g32" in res.output
    res = runner.invoke(app, ["generate", "Hello", "--model", str(out), "-n", "3", "-t", "0"])
    assert res.exit_code == 0, res.output


def test_cli_prune_and_sweep(tiny_dir, tmp_path):
    out = tmp_path / "p"
    text = tmp_path / "eval.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    res = runner.invoke(app, ["prune", str(tiny_dir), "--sparsity", "0.5", "--method", "structured",
                              "--parts", "mlp", "--calibration", str(text), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert muse.load(out).config.intermediate_size == 64
    res = runner.invoke(app, ["prune", str(tiny_dir), "--sparsity", "0.5", "--method", "structured",
                              "--calibration", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "p2")])
    assert res.exit_code == 1 and "No file at" in res.output and not (tmp_path / "p2").exists()
    res = runner.invoke(app, ["prune", str(tiny_dir), "--sweep", "0.25,0.5", "--method", "magnitude",
                              "--eval-text", str(text), "--eval-tokens", "64"])
    assert res.exit_code == 0, res.output
    assert "original" in res.output and "0.25" in res.output and "64 tokens" in res.output


def test_cli_bad_input(tiny_dir, tmp_path):
    res = runner.invoke(app, ["quantize", str(tiny_dir), "--bits", "3", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "bits must be 8 or 4" in res.output and not (tmp_path / "x").exists()
    res = runner.invoke(app, ["prune", str(tiny_dir), "--sparsity", "1.5", "-o", str(tmp_path / "y")])
    assert res.exit_code == 2 and "sparsity must be a fraction" in res.output and not (tmp_path / "y").exists()
    res = runner.invoke(app, ["quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "z")])
    assert res.exit_code == 1 and "No model found" in res.output
    res = runner.invoke(app, ["prune", str(tiny_dir), "--sweep", "0.2"])
    assert res.exit_code == 2 and "--eval-text" in res.output
    res = runner.invoke(app, ["prune", str(tiny_dir), "--sparsity", "0.2"])
    assert res.exit_code == 2 and "-o DIR" in res.output
    res = runner.invoke(app, ["prune", str(tiny_dir), "--sweep", "0.2,x", "--eval-text", "f"])
    assert res.exit_code == 2 and "--sweep takes sparsities" in res.output
