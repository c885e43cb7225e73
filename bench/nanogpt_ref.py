"""The baseline for bench/train.py --anchor: nanoGPT's CPU shakespeare_char run in plain PyTorch.

A re-implementation of what nanoGPT's model.py and train.py do for

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

GPT-2 blocks (pre-LayerNorm without bias, learned positions, exact GELU, tied embeddings),
nanoGPT's initialisation (normal 0.02, residual projections 0.02/sqrt(2·n_layer)), AdamW
(betas 0.9/0.99, weight decay 0.1 on ≥2-D tensors), linear warmup 100 then cosine 1e-3 → 1e-4,
gradient clipping 1.0, loss.item() logged every step, an eval of 20 train + 20 val batches every
250 steps. With nanoGPT's batch sampling (torch.randint after torch.manual_seed(1337)) it
reproduces the anchor's val loss of 1.886 exactly; with `batches=` and `init=` it takes Muse's
batches and initial weights, so the two loops can be compared step for step.

Run alone: python bench/nanogpt_ref.py [--seed 1337]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH, ITERS = 4, 4, 128, 64, 12, 2000
LR, MIN_LR, WARMUP, EVAL_INTERVAL, EVAL_ITERS = 1e-3, 1e-4, 100, 250, 20


class Block(nn.Module):
    def __init__(self, gelu: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(N_EMBD, bias=False)
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.attn_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.ln_2 = nn.LayerNorm(N_EMBD, bias=False)
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.mlp_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)
        self.gelu = gelu

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(N_EMBD, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate=self.gelu))


class GPT(nn.Module):
    def __init__(self, vocab: int, gelu: str = "none"):
        super().__init__()
        self.wte = nn.Embedding(vocab, N_EMBD)
        self.wpe = nn.Embedding(BLOCK, N_EMBD)
        self.h = nn.ModuleList(Block(gelu) for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD, bias=False)
        self.lm_head = nn.Linear(N_EMBD, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * N_LAYER))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def load_muse(self, state: dict[str, torch.Tensor]) -> None:
        """Take the weights of a Muse `Transformer` with the same shapes (its state_dict)."""
        names = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "norm_f.weight"}
        for i in range(N_LAYER):
            for mine, theirs in (("ln_1", "norm1"), ("c_attn", "attn.qkv"), ("attn_proj", "attn.proj"),
                                 ("ln_2", "norm2"), ("c_fc", "mlp.fc"), ("mlp_proj", "mlp.proj")):
                names[f"h.{i}.{mine}.weight"] = f"layers.{i}.{theirs}.weight"
        with torch.no_grad():
            for mine, theirs in names.items():
                self.get_parameter(mine).copy_(state[theirs])


def lr_at(it: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (ITERS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def run(train_ids: np.ndarray, val_ids: np.ndarray, vocab: int, seed: int = 1337, batches=None, init=None,
        gelu: str = "none") -> dict:
    """Train as nanoGPT does; returns the losses and timings. batches(split, step) -> (x, y) replaces
    nanoGPT's sampling (then eval uses val batches 0..19, as Muse does); init: a Muse state_dict."""
    torch.manual_seed(seed)
    data = {"train": train_ids, "val": val_ids}

    def get_batch(split, step=0):
        if batches is not None:
            return batches(split, step)
        ix = torch.randint(len(data[split]) - BLOCK, (BATCH,))
        x = torch.stack([torch.from_numpy(data[split][i:i + BLOCK].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[split][i + 1:i + 1 + BLOCK].astype(np.int64)) for i in ix])
        return x, y

    model = GPT(vocab, gelu)
    if init is not None:
        model.load_muse(init)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.99))

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {}
        for split in ("train", "val"):
            out[split] = float(np.mean([model(*get_batch(split, k)).item() for k in range(EVAL_ITERS)]))
        model.train()
        return out

    t0 = time.perf_counter()
    x, y = get_batch("train", 0)
    train_losses, evals = [], []
    for it in range(ITERS + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        if it % EVAL_INTERVAL == 0:
            evals.append((it, estimate_loss()))
        if it == ITERS:
            break
        loss = model(x, y)
        x, y = get_batch("train", it + 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_losses.append(loss.item())  # log_interval=1
    return {"train_losses": train_losses, "evals": evals, "val_loss": evals[-1][1]["val"],
            "train_wall_s": time.perf_counter() - t0, "model": model}


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train import char_data  # noqa: E402  (bench/train.py: nanoGPT's shakespeare_char split)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    train_ids, val_ids, chars = char_data()
    r = run(train_ids, val_ids, len(chars), args.seed)
    for it, e in r["evals"]:
        print(f"step {it}: train loss {e['train']:.4f}, val loss {e['val']:.4f}")
    print(f"val loss {r['val_loss']:.4f} in {r['train_wall_s']:.1f} s")


if __name__ == "__main__":
    main()
