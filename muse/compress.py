"""Make a model smaller: weight-only quantization and pruning, saved in Muse's format.

    m = muse.compress.quantize("smollm2-135m", bits=8, out="smol-int8")   # then muse.load("smol-int8")
    m = muse.compress.prune("smollm2-135m", 0.3, method="structured", out="smol-pruned")
    rows = muse.compress.sweep("smollm2-135m", [0.1, 0.3], "magnitude", text)  # perplexity per sparsity

Quantization replaces every linear layer by a `muse.quant.QuantLinear`: int8 symmetric with one
scale per output channel (or per group, if a group size is given), int4 asymmetric in groups of
32 weights. The token embedding is quantized too, to int8 per row by default even when the
layers get int4: with tied embeddings it is also the output head (a fifth of the default
model's weights, and its most sensitive layer); the embedding lookup dequantizes only the rows
it reads. `embeddings="same"` gives it the layers' format, `"fp32"` keeps it float.

Pruning works on the linear layers of the Transformer blocks (never the embedding or head):
  magnitude   zero the fraction `sparsity` of weights with the smallest |w|, in each layer
              ("layer" scope) or over all layers together ("global"). Shapes stay, so the
              file stays the same size: this is for studying sparsity, not for saving space.
  structured  remove whole MLP channels and attention heads, the same number in every layer,
              least important first: the L2 norm of their output on a calibration text times
              the L2 norm of their output weights (or, criterion="weight", of their weights
              alone). Shapes shrink and the config says so (intermediate_size, n_head, n_kv_head).

Every function takes a loaded `muse.api.Model` (left unchanged: the result is a new model) or a
name / path, which is loaded in fp32. A quantized model is dequantized first.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import torch
from torch import nn

from muse.errors import MuseError

METHODS = ("magnitude", "structured")
SCOPES = ("layer", "global")
PARTS = ("mlp", "heads")
EMBEDDINGS = ("int8", "same", "fp32")
CRITERIA = ("activation", "weight")
CALIBRATION_TOKENS = 2048  # the calibration text's first tokens that structured pruning looks at
KERNEL_STEP = 32  # QuantLinear's fast kernels need group sizes (and so widths) in multiples of 32


# ----------------------------------------------------------------------------- shared helpers


def _float_model(model_or_name):
    """A fresh fp32 `Model` with plain nn.Linear / nn.Embedding layers (the input is not touched)."""
    from muse.api import Model, load
    from muse.quant import QuantLinear

    if not isinstance(model_or_name, Model):
        return load(model_or_name, precision="fp32")
    m = model_or_name
    net = copy.deepcopy(m.model)
    for name, mod in list(net.named_modules()):
        if isinstance(mod, QuantLinear):
            w = mod.dequantize()  # (out, in)
            if name == "wte":
                new = nn.Embedding(w.shape[0], w.shape[1], _weight=w)
            else:
                new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                new.weight = nn.Parameter(w)
                if mod.bias is not None:
                    new.bias = nn.Parameter(mod.bias.float().clone())
            _set_module(net, name, new)
    info = {**m.info, "precision": "fp32", "quantization": {}}
    return Model(net.float().eval(), m.tokenizer, info)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def weight_bytes(model) -> int:
    """Bytes of a model's saved tensors (its checkpoint size, give or take the header)."""
    net = getattr(model, "model", model)
    tensors = {t.data_ptr(): t for t in net.state_dict().values()}  # tied tensors once
    return sum(t.nbytes for t in tensors.values())


def count_params(model, nonzero: bool = False) -> int:
    """Parameters of a model (quantized layers count their weights), or only the non-zero ones."""
    from muse.quant import QuantLinear

    net = getattr(model, "model", model)
    total = 0
    for mod in net.modules():
        if isinstance(mod, QuantLinear):
            w = mod.dequantize() if nonzero else None
            total += int(w.count_nonzero()) if nonzero else mod.in_features * mod.out_features
            tensors = [mod.bias] if mod.bias is not None else []
        else:
            tensors = list(mod.parameters(recurse=False))
        total += sum(int(t.count_nonzero()) if nonzero else t.numel() for t in tensors)
    return total


def _check_out(out) -> Path | None:
    """Refuse to overwrite anything but a previous Muse checkpoint (the save replaces the directory)."""
    if out is None:
        return None
    from muse.checkpoints.native import is_muse_dir

    path = Path(out).expanduser()
    if path.exists() and not (path.is_dir() and (is_muse_dir(path) or not any(path.iterdir()))):
        raise MuseError(f"{path} exists and is not a Muse checkpoint; choose a new output directory.")
    return path


def _save(m, out: Path | None, quant: dict, **source) -> None:
    if out is not None:
        from muse.checkpoints import save_checkpoint

        save_checkpoint(out, m.model, m.tokenizer, quant, **source)
        m.info.update(path=str(out), format="muse")


# ----------------------------------------------------------------------------- quantization


def _group_for(in_features: int, bits: int, group_size: int | None) -> int:
    """The group size one layer gets: the asked one, or the largest divisor of in_features below it.

    None means int8 per channel (group = in_features) and int4 groups of 32. When the asked
    size does not divide in_features (e.g. 128 and 576), the largest divisor <= it is used,
    preferring multiples of 32 (the fast kernels need them).
    """
    want = (in_features if bits == 8 else 32) if group_size is None else group_size
    if in_features % want == 0:
        return want
    divisors = [d for d in range(1, min(want, in_features) + 1) if in_features % d == 0]
    fast = [d for d in divisors if d % KERNEL_STEP == 0]
    return (fast or divisors)[-1]


def quantize(model_or_name=None, bits: int = 8, group_size: int | None = None, out=None,
             embeddings: str = "int8"):
    """Quantize every linear layer (and the embedding) to int8 or int4; save to `out` if given.

    bits: 8 (symmetric; one scale per output channel unless group_size is given) or 4
    (asymmetric; groups of group_size weights along each row, 32 by default). A group size
    that does not divide a layer's width falls back to the largest divisor below it, with a
    warning; `info["quantization"]` records each layer's bits and group size.
    embeddings: "int8" (default: the embedding, which is also the head when tied, in int8 per
    row whatever `bits` is: the head is the most sensitive layer, and int4 there costs the
    default model ~70x the KL of int8), "same" (the layers' bits and group size) or "fp32".
    Returns a new `muse.api.Model`; `muse.load(out)` gives back the same model.
    """
    from muse.quant import QuantLinear, quantize_model

    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r} (int8 per channel, int4 in groups)")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 2):
        raise ValueError(f"group_size must be an integer >= 2 (e.g. 32 or 128), got {group_size!r}")
    if embeddings not in EMBEDDINGS:
        raise ValueError(f"embeddings must be one of {', '.join(EMBEDDINGS)}, got {embeddings!r}")
    out = _check_out(out)
    m = _float_model(model_or_name)
    net = m.model
    linears = {n: mod for n, mod in net.named_modules() if isinstance(mod, nn.Linear)}
    groups = {n: _group_for(mod.in_features, bits, group_size) for n, mod in linears.items()}
    emb_bits = {"int8": 8, "same": bits, "fp32": None}[embeddings]
    if emb_bits == bits:
        groups["wte"] = _group_for(net.config.n_embd, bits, group_size)
    _warn_fallback(groups, group_size)
    quant = {}
    for g in sorted(set(v for n, v in groups.items() if n != "wte")):
        quant.update(quantize_model(net, bits, g, skip={n for n, v in groups.items() if v != g}))
    if emb_bits is not None:
        # (vocab, n_embd), read row-wise by `Transformer.embed` and used as the head when tied
        group = groups.get("wte", net.config.n_embd)
        net.wte = QuantLinear.from_float(net.wte.weight, emb_bits, group)
        quant["wte"] = {"bits": emb_bits, "group_size": group}
    m.info.update(precision=f"int{bits}", quantization=quant)
    _save(m, out, quant, quantized_from=m.name, bits=bits, group_size=group_size, embeddings=embeddings)
    return m


def _warn_fallback(groups: dict[str, int], group_size: int | None) -> None:
    changed = sorted({g for g in groups.values() if group_size is not None and g != group_size})
    if changed:
        n = sum(g != group_size for g in groups.values())
        warnings.warn(f"group_size={group_size} does not divide the width of {n} layers; they use "
                      f"group size {', '.join(map(str, changed))} instead", UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------- pruning


def _block_linears(net) -> list[tuple[str, nn.Linear]]:
    """The prunable layers: every nn.Linear inside the Transformer blocks."""
    return [(f"layers.{n}", mod) for n, mod in net.layers.named_modules() if isinstance(mod, nn.Linear)]


def sparsity_of(model) -> float:
    """Fraction of zero weights in the linear layers of the blocks."""
    net = getattr(model, "model", model)
    ws = [mod.weight for _, mod in _block_linears(net)]
    return 1.0 - sum(int(w.count_nonzero()) for w in ws) / sum(w.numel() for w in ws)


def _check_prune(amount: float, method: str, scope: str, parts, criterion: str = "activation") -> tuple[str, ...]:
    if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 <= amount < 1:
        raise ValueError(f"sparsity must be a fraction in [0, 1), e.g. 0.3, got {amount!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if method == "structured" and scope != "layer":
        raise ValueError("structured pruning keeps every layer the same shape, so scope must be 'layer'")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"parts must be a non-empty selection of {', '.join(PARTS)}, got {', '.join(parts) or '[]'}")
    return parts


def prune(model_or_name=None, sparsity: float = 0.3, method: str = "magnitude", *, scope: str = "layer",
          parts=PARTS, criterion: str = "activation", calibration=None, out=None):
    """Prune a model to the given sparsity; save to `out` if given. Returns a new `Model`.

    method="magnitude": zero the smallest-|w| fraction `sparsity` of the block weights, per
    layer or over all of them together (scope="global").
    method="structured": remove that fraction of MLP channels (and/or attention heads, see
    `parts`) in every layer, the least important first by an L2 norm (`criterion`):
      "activation"  the L2 norm of the channel's (head's) output over a calibration text times
                    the L2 norm of the weights that write it back to the residual stream, i.e.
                    how much it changes the model's state on real text. `calibration` is a
                    text or token ids (default: a built-in English + Chinese passage).
      "weight"      the L2 norm of the channel's own weights only (no data). Cheaper, but blind
                    to channels that carry huge activations through small weights: on the
                    default model, 10% of MLP channels by this criterion multiply perplexity
                    by ~100, by "activation" by ~1.25 (tinyshakespeare).
    Kept widths are rounded to a multiple of 32 when the original is one, so the result can
    still be quantized in groups of 32; `count_params` gives the size actually reached.
    """
    parts = _check_prune(sparsity, method, scope, parts, criterion)
    out = _check_out(out)
    m = _float_model(model_or_name)
    with torch.no_grad():
        if method == "magnitude":
            _magnitude(m.model, sparsity, scope)
        else:
            norms = _activation_norms(m, calibration) if criterion == "activation" else None
            m.model = _structured(m.model, sparsity, parts, norms)
    m.info.update(precision="fp32", quantization={})
    _save(m, out, {}, pruned_from=m.name, method=method, sparsity=sparsity, scope=scope, parts=list(parts),
          criterion=criterion if method == "structured" else None)
    return m


def _magnitude(net, amount: float, scope: str) -> None:
    weights = [mod.weight for _, mod in _block_linears(net)]
    if scope == "layer":
        for w in weights:
            _zero_smallest([w], round(amount * w.numel()))
        return
    _zero_smallest(weights, round(amount * sum(w.numel() for w in weights)))


def _zero_smallest(weights: list[torch.Tensor], k: int) -> None:
    """Zero exactly k of the smallest-|w| entries over all of `weights` together, in place."""
    if k <= 0:
        return
    mags = torch.cat([w.detach().abs().flatten() for w in weights])
    threshold = mags.kthvalue(k).values  # the k-th smallest |w|
    del mags
    ties = k - sum(int((w.abs() < threshold).sum()) for w in weights)  # entries == threshold to zero too
    for w in weights:
        mag = w.abs()
        mask = mag < threshold
        if ties > 0:
            equal = (mag == threshold).flatten().nonzero().flatten()[:ties]
            mask.view(-1)[equal] = True
            ties -= len(equal)
        w.masked_fill_(mask, 0.0)


def _calibration_ids(m, calibration) -> list[int]:
    if calibration is None:
        calibration = CALIBRATION
    if isinstance(calibration, str):
        if m.tokenizer is None:
            raise ValueError(f"{m.name} has no tokenizer: pass calibration token ids, or criterion='weight'")
        ids = m.tokenizer.encode(calibration)
    else:
        ids = [int(i) for i in calibration]
    if len(ids) < 2:
        raise ValueError("the calibration text is too short: give at least a few sentences")
    return ids[: min(CALIBRATION_TOKENS, m.config.block_size)]


def _activation_norms(m, calibration) -> list[dict[str, torch.Tensor]]:
    """Per block: L2 norm over the calibration tokens of each MLP channel's activation (the
    input of down / proj, (hidden,)) and of each head's attention output (the input of
    attn.proj, (n_head,)) — one forward pass with hooks."""
    net, cfg = m.model, m.config
    ids = _calibration_ids(m, calibration)
    norms: list[dict[str, torch.Tensor]] = [{} for _ in net.layers]
    hooks = []
    for block, seen in zip(net.layers, norms):
        out = block.mlp.down if block.mlp.kind == "swiglu" else block.mlp.proj

        def mlp_hook(mod, args, output, seen=seen):
            seen["mlp"] = args[0].float().pow(2).sum((0, 1)).sqrt()  # (B, T, hidden) -> (hidden,)

        def head_hook(mod, args, output, seen=seen):
            x = args[0].float()  # (B, T, nh * hd)
            seen["heads"] = x.view(*x.shape[:2], cfg.n_head, cfg.head_dim).pow(2).sum((0, 1, 3)).sqrt()

        hooks += [out.register_forward_hook(mlp_hook), block.attn.proj.register_forward_hook(head_hook)]
    try:
        net(torch.tensor([ids], device=net.device))
    finally:
        for h in hooks:
            h.remove()
    return norms


def _keep_count(n: int, amount: float) -> int:
    """How many of n channels survive pruning `amount`, as a multiple of 32 when n is one."""
    keep = n - round(amount * n)
    if n % KERNEL_STEP == 0:
        keep = round(keep / KERNEL_STEP) * KERNEL_STEP
    return max(keep, KERNEL_STEP if n % KERNEL_STEP == 0 else 1)


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


def _structured(net, amount: float, parts: tuple[str, ...], norms: list[dict] | None):
    """A smaller Transformer: the same number of MLP channels / heads kept in every layer."""
    from muse.checkpoints.weights import assemble

    cfg = net.config
    state = {k: v.detach() for k, v in net.state_dict().items()}
    new = {}
    if "mlp" in parts:
        new["intermediate_size"] = _keep_count(cfg.intermediate_size, amount)
    if "heads" in parts:
        new.update(_head_counts(cfg, amount))
    config = dataclasses.replace(cfg, **new)
    for i, block in enumerate(net.layers):
        prefix = f"layers.{i}."
        act = norms[i] if norms is not None else {}
        if "mlp" in parts:
            state.update(_slice_mlp(block.mlp, prefix + "mlp.", config.intermediate_size, act.get("mlp")))
        if "heads" in parts:
            state.update(_slice_heads(block.attn, prefix + "attn.", cfg, config, act.get("heads")))
    return assemble(config, state, {})


# MLP channel j is row j of fc / gate / up and column j of proj / down.


def _mlp_rows(mlp) -> tuple[str, nn.Linear, int]:
    """(name, layer, stacked blocks) of the input side; gate_up holds [gate; up]."""
    return ("gate_up", mlp.gate_up, 2) if mlp.kind == "swiglu" else ("fc", mlp.fc, 1)


def _slice_mlp(mlp, prefix: str, keep: int, act: torch.Tensor | None) -> dict[str, torch.Tensor]:
    name, inp, blocks = _mlp_rows(mlp)
    out = mlp.down if mlp.kind == "swiglu" else mlp.proj
    hidden = out.in_features
    rows = inp.weight.view(blocks, hidden, -1)  # (blocks, hidden, n_embd)
    if act is None:  # squared L2 norm of all the weights of each channel, (hidden,)
        score = rows.pow(2).sum((0, 2)) + out.weight.pow(2).sum(0)
    else:  # activation norm x norm of the column that writes it to the residual stream
        score = act * out.weight.norm(dim=0)
    idx = _top(score, keep)
    state = {f"{prefix}{name}.weight": rows[:, idx].reshape(blocks * keep, -1)}
    if inp.bias is not None:
        state[f"{prefix}{name}.bias"] = inp.bias.view(blocks, hidden)[:, idx].reshape(-1)
    out_name = "down" if mlp.kind == "swiglu" else "proj"
    state[f"{prefix}{out_name}.weight"] = out.weight[:, idx]
    return state


def _head_counts(cfg, amount: float) -> dict[str, int]:
    """New n_head / n_kv_head. GQA keeps every kv head and drops query heads evenly per group;
    plain multi-head attention drops whole heads."""
    group = cfg.n_head // cfg.n_kv_head
    if group > 1:
        per_group = max(1, group - round(amount * group))
        return {"n_head": per_group * cfg.n_kv_head, "head_dim": cfg.head_dim}
    keep = max(1, cfg.n_head - round(amount * cfg.n_head))
    return {"n_head": keep, "n_kv_head": keep, "head_dim": cfg.head_dim}


def _slice_heads(attn, prefix: str, old, new, act: torch.Tensor | None) -> dict[str, torch.Tensor]:
    nh, nkv, hd = old.n_head, old.n_kv_head, old.head_dim
    group, new_group = nh // nkv, new.n_head // new.n_kv_head
    w = attn.qkv.weight.view(nh + 2 * nkv, hd, -1)  # heads [q..., k..., v...], (heads, hd, n_embd)
    n_embd = attn.proj.out_features
    proj = attn.proj.weight.view(n_embd, nh, hd)  # (n_embd, nh, hd)
    if act is None:  # squared L2 norm of each query head's weights (+ its kv head's for MHA), (nh,)
        score = w[:nh].pow(2).sum((1, 2)) + proj.pow(2).sum((0, 2))
        if group == 1:
            score = score + w[nh:nh + nkv].pow(2).sum((1, 2)) + w[nh + nkv:].pow(2).sum((1, 2))
    else:  # output norm x norm of its proj columns
        score = act * proj.pow(2).sum((0, 2)).sqrt()
    if group > 1:  # the best new_group query heads of each kv group; all kv heads stay
        per = score.view(nkv, group)
        q_idx = torch.cat([g * group + _top(per[g], new_group) for g in range(nkv)])
        kv_idx = torch.arange(nkv)
    else:  # whole heads: query, key and value together
        q_idx = kv_idx = _top(score, new.n_head)
    rows = torch.cat([q_idx, nh + kv_idx, nh + nkv + kv_idx])
    state = {f"{prefix}qkv.weight": w[rows].reshape(len(rows) * hd, -1),
             f"{prefix}proj.weight": proj[:, q_idx].reshape(n_embd, -1)}
    if attn.qkv.bias is not None:
        state[f"{prefix}qkv.bias"] = attn.qkv.bias.view(nh + 2 * nkv, hd)[rows].reshape(-1)
    return state


# ----------------------------------------------------------------------------- choosing a sparsity


def sweep(model_or_name=None, sparsities=(0.1, 0.2, 0.3, 0.5), method: str = "magnitude", text: str = "", *,
          scope: str = "layer", parts=PARTS, criterion: str = "activation", calibration=None,
          window: int | None = None, max_tokens: int | None = None) -> list[dict]:
    """Perplexity on `text` at each sparsity, so you can pick one. The first row is the original.

    The pruning options are `prune`'s. Calibrate on other text than you evaluate on.

    max_tokens scores only the text's first max_tokens tokens (None: all of it).
    Rows: {"sparsity", "params" (non-zero), "bytes" (checkpoint size), "tokens" (scored),
    "perplexity", "delta" (perplexity minus the original's)}.
    """
    from muse.eval.perplexity import perplexity, start_ids

    levels = [float(s) for s in sparsities]
    if not levels:
        raise ValueError("give at least one sparsity to sweep, e.g. 0.1,0.2,0.3")
    for s in levels:
        _check_prune(s, method, scope, parts, criterion)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the sweep needs an evaluation text to measure perplexity on")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens!r}")
    base = _float_model(model_or_name)
    source = text
    if max_tokens is not None and base.tokenizer is not None:
        ids, _ = start_ids(base.tokenizer, text)
        source = ids[: max_tokens + 1]  # ids[0] is the start token, context only
    rows = []
    for s in [0.0, *levels]:
        m = base if s == 0.0 else prune(base, s, method, scope=scope, parts=parts, criterion=criterion,
                                        calibration=calibration)
        r = perplexity(m, source, window=window)
        rows.append({"sparsity": s, "params": count_params(m, nonzero=True), "bytes": weight_bytes(m),
                     "tokens": r.tokens, "perplexity": r.perplexity,
                     "delta": r.perplexity - (rows[0]["perplexity"] if rows else r.perplexity)})
    return rows


# What structured pruning measures activations on when no calibration text is given: varied
# everyday English and Chinese prose (a narrative, an explanation, a dialogue, a list).
CALIBRATION = """\
The morning train was late again, so Maria walked the last two miles to the office. She did not
mind: the river was bright, the cafés were opening, and a man on a bicycle was delivering bread.
By nine o'clock she had answered her email, fixed a bug in the billing report, and written a
short note to her team about next week's release.

How does a refrigerator keep food cold? A liquid called a refrigerant flows through pipes at the
back. When it evaporates inside the cabinet it absorbs heat; a compressor then squeezes the vapour,
which releases that heat into the room as it turns back into a liquid. The cycle repeats all day.

"Can you help me plan a trip to Kyoto in April?" asked the customer.
"Of course. Cherry blossoms usually peak in early April, so book a hotel soon. Spend one day in
Arashiyama, one at the temples of the eastern hills, and keep an evening free for Gion."

Shopping list: 2 kg of potatoes, 6 eggs, olive oil, a lemon, fresh basil, and 500 g of rice.
def mean(xs): return sum(xs) / len(xs)  # the average of a list of numbers

今天早上下了一场小雨，空气格外清新。小王骑车去图书馆，路上看见几个孩子在公园里放风筝。
他想起小时候和爷爷一起做风筝的日子：竹条要削得又薄又匀，纸要选结实的，线要缠得整整齐齐。
为什么天空是蓝色的？阳光穿过大气层时，波长较短的蓝光更容易被空气分子散射，所以我们看到的天空是蓝色的。
“请问去火车站怎么走？”“一直往前走，到第二个路口右转，大约十分钟就到了。”
会议纪要：第一，下周五之前完成测试；第二，整理用户反馈；第三，准备季度报告。
"""


__all__ = ["CALIBRATION", "CRITERIA", "METHODS", "PARTS", "SCOPES", "count_params", "prune", "quantize", "sparsity_of",
           "sweep", "weight_bytes"]
