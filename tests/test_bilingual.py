"""Chinese with the bilingual model (Qwen2.5-Coder-0.5B-Instruct GGUF) against transformers."""

from __future__ import annotations

import pytest
import torch

import muse

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(qwen_gguf):
    transformers = pytest.importorskip("transformers")
    d, f = str(qwen_gguf.parent), qwen_gguf.name
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


def test_qwen_logits_close_to_transformers(qwen, reference):
    """Muse's default precision re-packs Q5_0/K-quant weights as int8: near-identical distributions."""
    text = "北京是中国的首都，也是一座历史悠久的城市。Beijing is the capital."
    ids = qwen.tokenizer.encode(text)
    assert ids == reference[0](text).input_ids
    with torch.no_grad():
        ref = reference[1](torch.tensor([ids])).logits[0]
    ours = qwen.logits(ids)
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert kl < 0.01
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_qwen_answers_in_chinese(qwen):
    reply = qwen.chat([{"role": "user", "content": "用一句话介绍一下北京。"}], temperature=0, max_new_tokens=60)
    han = sum("\u4e00" <= ch <= "\u9fff" for ch in reply)
    assert han >= 8 and "北京" in reply


def test_qwen_translates_en_to_zh_and_back(qwen):
    zh = qwen.chat([{"role": "user", "content": "Translate into Chinese. Reply with the translation only: "
                                                "The weather is nice today."}], temperature=0, max_new_tokens=30)
    assert "天气" in zh
    en = qwen.chat([{"role": "user", "content": "把这句话翻译成英文，只回复译文：我喜欢喝茶。"}],
                   temperature=0, max_new_tokens=30)
    assert "tea" in en.lower()


def test_qwen_stream_is_utf8_clean(qwen):
    chunks = list(qwen.stream_chat([{"role": "user", "content": "写两句关于春天的诗。"}], temperature=0,
                                   max_new_tokens=40))
    text = "".join(c.text for c in chunks)
    assert all("\ufffd" not in c.text for c in chunks) and sum("\u4e00" <= ch <= "\u9fff" for ch in text) >= 6
