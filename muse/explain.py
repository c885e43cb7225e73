"""Look inside a model: attention maps and next-token probabilities for a short text.

    att = muse.explain.attention(model, "The cat sat on the mat")   # Attention(tokens, weights (L, H, T, T))
    rows = muse.explain.next_token_table(model, "The cat sat", k=5)  # top-k next tokens at each position
    muse.explain.plot_attention(att, "out/")                         # one PNG per layer + the average

The model's attention runs inside `F.scaled_dot_product_attention`, which never materialises
the weights. So forward hooks catch each block's fused q/k/v projection (and the RoPE tables
the block is called with), and the weights are recomputed here the way the model uses them:
softmax(q k^T / sqrt(head_dim) + causal mask), RoPE applied with the model's own `apply_rope`,
grouped-query heads sharing their key head. Nothing in the model changes.

Token labels are UTF-8 safe: byte-level BPE can cut one Chinese character into several tokens,
each of which decodes alone to U+FFFD. Each such piece is labelled with the whole character and
its piece number (字₁, 字₂), and whitespace is made visible (␣ for a space, ↵ for a newline).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from muse.errors import ContextLengthError, MuseError

MAX_TOKENS = 512  # (L, H, T, T) weights and a readable heatmap: explain is for short texts
SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK JP", "Source Han Sans SC", "Source Han Sans CN",
             "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Microsoft YaHei", "SimHei", "PingFang SC",
             "Hiragino Sans GB", "Noto Serif CJK SC", "AR PL UMing CN", "Droid Sans Fallback")
CJK_FILE_HINTS = ("cjk", "wqy", "wenquanyi", "sourcehan", "simhei", "msyh", "pingfang", "hiragino", "uming",
                  "ukai", "droidsansfallback")


@dataclass
class Attention:
    """Attention weights of one text.

    tokens   label of each position (UTF-8 safe, whitespace visible), length T
    ids      the token ids, length T
    weights  (L, H, T, T) float32: weights[l, h, i, j] is how much position i attends to j (j <= i);
             every row sums to 1
    layers   the model layer each of the L entries comes from
    """

    tokens: list[str]
    ids: list[int]
    weights: torch.Tensor
    layers: list[int]

    def average(self) -> torch.Tensor:
        """(T, T): the mean over layers and heads."""
        return self.weights.mean(dim=(0, 1))


# ----------------------------------------------------------------------------- tokens


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """A readable label per token, never containing U+FFFD for a character split across tokens.

    Decodes growing prefixes: the characters a token completes are its label; a token that
    only starts (or continues) a multi-byte character is labelled with that character and its
    piece number once the character completes.
    """
    if tokenizer is None:
        return [str(i) for i in ids]
    labels = [""] * len(ids)
    pending: list[int] = []  # tokens holding pieces of a character not yet complete
    done = ""  # decoded text of complete characters so far
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1])
        complete = text.rstrip("\ufffd")  # trailing U+FFFD: bytes of an unfinished character
        new = complete[len(done):] if complete.startswith(done) else complete
        if pending and new:
            ch = new[0]
            for n, j in enumerate(pending, 1):
                labels[j] += ch + str(n).translate(SUBSCRIPTS)
            labels[i] += ch + str(len(pending) + 1).translate(SUBSCRIPTS) + new[1:]
            pending = []
        else:
            labels[i] += new
        if len(text) > len(complete):
            pending.append(i)
        done = complete
    for j in pending:  # bytes that never formed a character: show the replacement mark
        labels[j] += "\ufffd"
    return [label.translate(VISIBLE) for label in labels]


def _candidate_label(tokenizer, context: list[int], token_id: int) -> str:
    """Label for a candidate next token: the text it adds after `context` (the last few ids, enough
    to hold a character it would complete), or its raw bytes when it only starts a character."""
    if tokenizer is None:
        return str(token_id)
    raw_before = tokenizer.decode(context)
    before = raw_before.rstrip("\ufffd")
    after = tokenizer.decode([*context, token_id])
    added = after[len(before):] if after.startswith(before) else tokenizer.decode([token_id])
    broken = raw_before[len(before):]  # U+FFFD for a character the context leaves unfinished
    if broken and added.startswith(broken):  # ... and this token does not finish it
        added = added[len(broken):]
    if added and "\ufffd" not in added:
        return added.translate(VISIBLE)
    piece = tokenizer.piece_bytes(token_id)
    return "‹" + piece.hex(" ") + "›" if piece else (tokenizer.id_to_token(token_id) or "")


# ----------------------------------------------------------------------------- capture


def _ids(model, text_or_ids) -> list[int]:
    if isinstance(text_or_ids, str):
        if not text_or_ids.strip():
            raise ValueError("text is empty: give the text to explain, e.g. 'The cat sat on the mat'")
        if model.tokenizer is None:
            raise ValueError(f"{model.name} has no tokenizer; pass token ids instead of text")
        ids = model.tokenizer.encode(text_or_ids)
    else:
        ids = [int(i) for i in text_or_ids]
    if not ids:
        raise ValueError("text is empty: give the text to explain")
    if len(ids) > model.config.block_size:
        raise ContextLengthError(len(ids), model.config.block_size)
    if len(ids) > MAX_TOKENS:
        raise MuseError(f"The text is {len(ids)} tokens long; explain works on up to {MAX_TOKENS} tokens "
                        "(its heatmaps would be unreadable beyond that). Explain a shorter passage.")
    return ids


def _check_index(values, n: int, what: str) -> list[int]:
    """Indices into range(n) (negative counts from the end), validated, in the order given."""
    if values is None:
        return list(range(n))
    out = []
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not -n <= v < n:
            raise ValueError(f"{what} {v!r} does not exist: the model has {n} {what}s (0-{n - 1})")
        out.append(v % n)
    if not out:
        raise ValueError(f"choose at least one {what}")
    return list(dict.fromkeys(out))


def _attention_of(qkv: torch.Tensor, rope, nh: int, nkv: int, hd: int) -> torch.Tensor:
    """qkv (1, T, (nh + 2 nkv) * hd) as the block computed it -> weights (nh, T, T)."""
    from muse.model import apply_rope

    T = qkv.shape[1]
    qk = qkv.float().view(1, T, nh + 2 * nkv, hd)[:, :, : nh + nkv]  # heads: [q..., k..., v...]
    if rope is not None:
        qk = apply_rope(qk, rope[0].float(), rope[1].float())  # same rotation as the model
    q = qk[0, :, :nh].transpose(0, 1)  # (nh, T, hd)
    k = qk[0, :, nh:].transpose(0, 1).repeat_interleave(nh // nkv, dim=0)  # query head i uses kv head i // group
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)  # (nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@torch.inference_mode()
def _forward(model, ids: list[int], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: next-token logits (T, V) and attention weights (len(layers), H, T, T)."""
    net, cfg = model.model, model.config
    seen: dict[int, dict] = {i: {} for i in layers}
    hooks = []
    for i in layers:
        attn = net.layers[i].attn
        # Attention.forward(x, rope, cache, layer, start): keep the rope tables it is given,
        # and the fused projection's output.
        hooks.append(attn.register_forward_pre_hook(lambda mod, args, s=seen[i]: s.__setitem__("rope", args[1])))
        hooks.append(attn.qkv.register_forward_hook(lambda mod, args, out, s=seen[i]: s.__setitem__("qkv", out)))
    try:
        logits, _ = net(torch.tensor([ids], device=net.device))
    finally:
        for h in hooks:
            h.remove()
    weights = [_attention_of(seen[i]["qkv"], seen[i]["rope"], cfg.n_head, cfg.n_kv_head, cfg.head_dim).cpu()
               for i in layers]
    return logits[0].float(), torch.stack(weights) if weights else torch.empty(0)


def attention(model, text: "str | list[int]", layers: list[int] | None = None) -> Attention:
    """Attention weights of every (or the chosen) layer and head for `text` (a string or token ids)."""
    ids = _ids(model, text)
    layers = _check_index(layers, model.config.n_layer, "layer")
    _, weights = _forward(model, ids, layers)
    return Attention(token_labels(model.tokenizer, ids), ids, weights, layers)


def _top_rows(model, ids: list[int], labels: list[str], logits: torch.Tensor, k: int) -> list[dict]:
    probs = logits.softmax(-1)  # (T, V)
    top_p, top_i = probs.topk(k, dim=-1)
    rows = []
    for t in range(len(ids)):
        row = {"position": t, "token": labels[t], "id": ids[t],
               "top": [{"token": _candidate_label(model.tokenizer, ids[max(0, t - 7):t + 1], int(i)),
                        "id": int(i), "p": float(p)} for p, i in zip(top_p[t], top_i[t])]}
        if t + 1 < len(ids):  # how likely the model found the token that actually came next
            nxt = ids[t + 1]
            row.update(next=labels[t + 1], next_id=nxt, p_next=float(probs[t, nxt]),
                       rank_next=int((probs[t] > probs[t, nxt]).sum()) + 1)
        rows.append(row)
    return rows


def _check_k(k, vocab: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size ({vocab}), got {k!r}")
    return k


def next_token_table(model, text: "str | list[int]", k: int = 5) -> list[dict]:
    """At each position: the token, the k most likely next tokens with probabilities, and the
    probability and rank of the token that actually follows.

    Rows: {"position", "token", "id", "top": [{"token", "id", "p"}, ...], and except for the
    last position "next", "next_id", "p_next", "rank_next" (1 = the model's first choice)}.
    """
    k = _check_k(k, model.config.vocab_size)
    ids = _ids(model, text)
    logits, _ = _forward(model, ids, [])
    return _top_rows(model, ids, token_labels(model.tokenizer, ids), logits, k)


# ----------------------------------------------------------------------------- plots


@functools.lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The name of an installed font with Chinese glyphs, or None.

    matplotlib's font cache may predate the font's installation, so on a miss the system font
    files that look like CJK fonts are registered once and the search repeated.
    """
    from matplotlib import font_manager

    def find():
        names = {f.name for f in font_manager.fontManager.ttflist}
        return next((n for n in CJK_FONTS if n in names), None)

    if find() is None:
        for path in font_manager.findSystemFonts():
            if any(h in Path(path).name.lower() for h in CJK_FILE_HINTS):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue  # unreadable font file: skip it
    return find()


def _has_cjk(labels) -> bool:
    return any("\u2e80" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" or "\uff00" <= ch <= "\uffef"
               for label in labels for ch in label)


def _font_context(labels):
    """rc settings whose font list falls back to a CJK font glyph by glyph (warns if none is found)."""
    import matplotlib

    families = ["DejaVu Sans"]
    if _has_cjk(labels):
        font = cjk_font()
        if font is None:
            warnings.warn("No font with Chinese characters was found, so they may show as boxes in the PNGs; "
                          "install one (e.g. Debian/Ubuntu: apt install fonts-noto-cjk).", UserWarning, stacklevel=3)
        else:
            families.append(font)
    return matplotlib.rc_context({"font.family": families, "axes.unicode_minus": False})


def _ticks(ax, labels: list[str]) -> None:
    """Token labels on both axes; every n-th one for long texts."""
    T = len(labels)
    step = max(1, math.ceil(T / 64))
    pos = list(range(0, T, step))
    ax.set_xticks(pos, [labels[i] for i in pos], rotation=90, fontsize=7)
    ax.set_yticks(pos, [labels[i] for i in pos], fontsize=7)


def _heatmap(ax, w: torch.Tensor, labels: list[str], title: str, ticks: bool = True):
    im = ax.imshow(w.numpy(), cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    if ticks:
        _ticks(ax, labels)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return im


def _new_figure(rows: int, cols: int, T: int):
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    cell = max(2.5, min(0.16 * T + 1.2, 12.0))  # inches per panel, grows with the text
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False)
    return plt, fig, axes


def plot_attention(att: Attention, out_dir, heads: list[int] | None = None) -> list[Path]:
    """Write layer_NN.png (one panel per head) for each layer in `att`, and average.png
    (the mean over those layers and heads). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L, H, T, _ = att.weights.shape
    heads = _check_index(heads, H, "head")
    paths = []
    with _font_context(att.tokens):
        for li, layer in enumerate(att.layers):
            cols = min(len(heads), 3 if T > 24 else 4)
            rows = math.ceil(len(heads) / cols)
            plt, fig, axes = _new_figure(rows, cols, T)
            for n, ax in enumerate(axes.flat):
                if n < len(heads):
                    _heatmap(ax, att.weights[li, heads[n]], att.tokens, f"layer {layer} · head {heads[n]}",
                             ticks=T <= 64 or n == 0)
                else:
                    ax.axis("off")
            paths.append(_save(plt, fig, out / f"layer_{layer:02d}.png"))
        plt, fig, axes = _new_figure(1, 1, T)
        mean = att.weights[:, heads].mean(dim=(0, 1))
        im = _heatmap(axes[0, 0], mean, att.tokens, f"mean over {L} layers × {len(heads)} heads")
        fig.colorbar(im, ax=axes[0, 0], fraction=0.046)
        paths.append(_save(plt, fig, out / "average.png"))
    return paths


def plot_next_tokens(rows: list[dict], path) -> Path:
    """A PNG of the next-token table: one row per position, the top-k candidates coloured by probability."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = len(rows[0]["top"])
    labels = [r["token"] for r in rows] + [c["token"] for r in rows for c in r["top"]]
    with _font_context(labels):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.6 * k + 2.5, 0.32 * len(rows) + 1.2))
        probs = torch.tensor([[c["p"] for c in r["top"]] for r in rows])  # (T, k)
        ax.imshow(probs.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
        for t, r in enumerate(rows):
            for j, c in enumerate(r["top"]):
                color = "white" if c["p"] > 0.6 else "black"
                ax.text(j, t, f"{c['token']}  {c['p']:.2f}", ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(k), [f"#{j + 1}" for j in range(k)], fontsize=8)
        ax.set_yticks(range(len(rows)), [f"{r['position']}: {r['token']}" for r in rows], fontsize=7)
        ax.xaxis.tick_top()
        ax.set_title("most likely next tokens after each position", fontsize=9, pad=18)
        return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")  # then rename: never a half-written PNG
    plt.close(fig)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- everything at once


def explain(model, text: "str | list[int]", out_dir, layers: list[int] | None = None,
            heads: list[int] | None = None, k: int = 5) -> dict:
    """Attention heatmaps, the next-token table (PNG + JSON) and the raw weights for one text.

    Writes into out_dir: layer_NN.png, average.png, next_tokens.png, next_tokens.json,
    attention.json (tokens, ids, layers, the averaged map) and attention.safetensors (the
    (L, H, T, T) weights). Returns {"attention": Attention, "rows": [...], "files": [Path, ...]}.
    """
    k = _check_k(k, model.config.vocab_size)
    ids = _ids(model, text)
    layers = _check_index(layers, model.config.n_layer, "layer")
    heads = _check_index(heads, model.config.n_head, "head")
    logits, weights = _forward(model, ids, layers)
    labels = token_labels(model.tokenizer, ids)
    att = Attention(labels, ids, weights, layers)
    rows = _top_rows(model, ids, labels, logits, k)
    out = Path(out_dir)
    files = plot_attention(att, out, heads)
    files.append(plot_next_tokens(rows, out / "next_tokens.png"))
    files.append(_write_json(out / "next_tokens.json", {"model": model.name, "rows": rows}))
    files.append(_write_json(out / "attention.json", {
        "model": model.name, "tokens": labels, "ids": ids, "layers": layers, "heads": heads,
        "average": [[round(x, 6) for x in row] for row in weights[:, heads].mean(dim=(0, 1)).tolist()]}))
    files.append(_write_weights(out / "attention.safetensors", weights, layers))
    return {"attention": att, "rows": rows, "files": files}


def _write_json(path: Path, data: dict) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


def _write_weights(path: Path, weights: torch.Tensor, layers: list[int]) -> Path:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"weights": weights.contiguous()}, str(tmp), metadata={"layers": json.dumps(layers)})
    tmp.replace(path)
    return path


__all__ = ["Attention", "attention", "cjk_font", "explain", "next_token_table", "plot_attention",
           "plot_next_tokens", "token_labels"]
