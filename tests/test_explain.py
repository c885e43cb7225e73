"""muse.explain: attention weights against transformers, UTF-8-safe labels, the PNG/JSON files, the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import muse
from muse import explain
from muse.cli import app

transformers = pytest.importorskip("transformers")


def _tiny_hf(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":  # learned positions, MHA, biases on q/k/v
        cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        return transformers.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":  # RoPE, grouped-query attention
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=5000.0, **common))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=20000.0, **common))  # + qkv bias


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    out = {}
    for kind in ("gpt2", "llama", "qwen2"):
        hf = _tiny_hf(kind).eval()
        path = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(path)
        out[kind] = path
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_attention_matches_transformers(tiny_dirs, kind):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[kind], attn_implementation="eager").eval()
    m = muse.load(tiny_dirs[kind], precision="fp32")
    ids = torch.randint(0, 101, (19,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = torch.stack(hf(torch.tensor([ids]), output_attentions=True).attentions)[:, 0]  # (L, H, T, T)
    att = explain.attention(m, ids)
    assert att.weights.shape == ref.shape and att.layers == list(range(ref.shape[0]))
    torch.testing.assert_close(att.weights, ref, rtol=1e-4, atol=1e-5)
    assert att.tokens == [str(i) for i in ids]  # no tokenizer: ids as labels
    sub = explain.attention(m, ids, layers=[-1, 0])  # a selection, negative counts from the end
    assert sub.layers == [ref.shape[0] - 1, 0]
    torch.testing.assert_close(sub.weights, ref[[ref.shape[0] - 1, 0]], rtol=1e-4, atol=1e-5)


def test_attention_on_a_quantized_model_follows_its_logits(default_model):
    """The default model (Q4_1 kernels, GQA 9/3, RoPE): rows are causal distributions, and the
    next-token table's probabilities are the softmax of the model's own logits."""
    text = "The cat sat on the mat because it was warm."
    att = explain.attention(default_model, text, layers=[0, 29])
    L, H, T, _ = att.weights.shape
    assert (L, H) == (2, 9) and T == len(default_model.tokenizer.encode(text))
    torch.testing.assert_close(att.weights.sum(-1), torch.ones(L, H, T))
    assert torch.all(att.weights.triu(1) == 0)  # no position attends to a later one
    rows = explain.next_token_table(default_model, text, k=3)
    probs = default_model.logits(text).softmax(-1)
    for r in rows:
        top = probs[r["position"]].topk(3)
        assert [c["id"] for c in r["top"]] == top.indices.tolist()
        assert [c["p"] for c in r["top"]] == pytest.approx(top.values.tolist(), rel=1e-4)
        if "next_id" in r:
            p = probs[r["position"], r["next_id"]]
            assert r["p_next"] == pytest.approx(float(p), rel=1e-4)
            assert r["rank_next"] == int((probs[r["position"]] > p).sum()) + 1
    assert "next" not in rows[-1]


def test_labels_merge_split_chinese_characters(default_model):
    tok = default_model.tokenizer
    text = "我爱北京天安门。Hello world\n"
    ids = tok.encode(text)
    labels = explain.token_labels(tok, ids)
    assert len(labels) == len(ids) and len(ids) > len(text.split())  # byte-level BPE splits these characters
    assert not any("\ufffd" in label for label in labels)
    assert "爱₁" in labels and "爱₂" in labels  # one character over several tokens: numbered pieces
    # with the piece marks removed and whitespace restored, each character is shown once
    plain = [label.translate({ord(c): None for c in "₁₂₃₄"}) for label in labels]
    shown = "".join(p if not labels[i].endswith(("₂", "₃", "₄")) else "" for i, p in enumerate(plain))
    assert shown.replace("␣", " ").replace("↵", "\n") == text


def test_explain_writes_pngs_and_json_for_chinese(default_model, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = explain.explain(default_model, "今天天气很好。", tmp_path, layers=[0, 1], heads=[0, 4], k=3)
    names = sorted(p.name for p in result["files"])
    assert names == ["attention.json", "attention.safetensors", "average.png", "layer_00.png", "layer_01.png",
                     "next_tokens.json", "next_tokens.png"]
    for p in result["files"]:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))
    missing = [str(w.message) for w in caught if "missing from" in str(w.message) or "font" in str(w.message)]
    if explain.cjk_font() is not None:
        assert not missing, missing  # every CJK glyph found a font
    else:
        assert any("fonts-noto-cjk" in m for m in missing)  # graceful: a warning that says what to install
    data = json.loads((tmp_path / "attention.json").read_text(encoding="utf-8"))
    assert data["layers"] == [0, 1] and data["heads"] == [0, 4]
    assert "天₁" in data["tokens"] and not any("\ufffd" in t for t in data["tokens"])
    avg = torch.tensor(data["average"])
    torch.testing.assert_close(avg, result["attention"].weights[:, [0, 4]].mean((0, 1)), atol=1e-5, rtol=0)
    stored = load_file(str(tmp_path / "attention.safetensors"))["weights"]
    assert torch.equal(stored, result["attention"].weights)
    rows = json.loads((tmp_path / "next_tokens.json").read_text(encoding="utf-8"))["rows"]
    assert len(rows) == len(data["ids"]) and len(rows[0]["top"]) == 3


def test_bad_input(default_model):
    with pytest.raises(ValueError, match="layer 30 does not exist"):
        explain.attention(default_model, "Hi there", layers=[30])
    with pytest.raises(ValueError, match="empty"):
        explain.attention(default_model, "   ")
    with pytest.raises(ValueError, match="k must be"):
        explain.next_token_table(default_model, "Hi", k=0)
    with pytest.raises(muse.MuseError, match="up to 512 tokens"):
        explain.attention(default_model, list(range(600)))


runner = CliRunner()


def test_cli_explain(tiny_dirs, tmp_path):
    res = runner.invoke(app, ["explain", "1 2 3", "--model", str(tiny_dirs["llama"])])
    assert res.exit_code == 2 and "tokenizer" in res.output  # a model without a tokenizer needs --ids
    out = tmp_path / "exp"
    res = runner.invoke(app, ["explain", "5,17,3,99,42,8", "--ids", "--model", str(tiny_dirs["llama"]),
                              "-o", str(out), "--layers", "0,2", "--heads", "1,3", "-k", "2"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.glob("*.png")} == {"layer_00.png", "layer_02.png", "average.png", "next_tokens.png"}
    assert "17" in res.output and str(out) in res.output  # the table and where the files are
    res = runner.invoke(app, ["explain", "5,6", "--ids", "--model", str(tiny_dirs["llama"]), "--layers", "7"])
    assert res.exit_code == 2 and "layer 7 does not exist" in res.output
    res = runner.invoke(app, ["explain", "hello", "--model", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "No model found" in res.output
