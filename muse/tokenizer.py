"""The tokenizer layer: a thin wrapper over Hugging Face `tokenizers` (the Rust library).

One `Tokenizer` class, loaded from a Hugging Face directory (`from_dir`) or from a GGUF file's
metadata (`from_gguf`), or trained on your own corpus as byte-level BPE (`train`), saved as
`tokenizer.json` + `tokenizer_config.json` (`save`). Chat templates are rendered with jinja2
the way transformers renders them, and `StreamDecoder` turns a stream of token ids into text
without ever emitting half a UTF-8 character.

    tok = Tokenizer.from_dir("path/to/hf_model")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    dec = tok.stream_decoder()
    text = "".join(dec.push(i) for i in ids) + dec.flush()

BOS is prepended by `encode` (never by the backend's post-processor), and only when `add_bos` is
set, so a prompt never gets two.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
import tokenizers.trainers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from muse.errors import CheckpointError, MuseError

if TYPE_CHECKING:
    import gguf


class ChatTemplateError(MuseError):
    """A chat template that refused the conversation (via `raise_exception`) or failed to render."""


# Used when a model ships no chat template. Plain ChatML: `<|im_start|>role\ncontent<|im_end|>\n`.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _read_fast_tokenizer(path: Path) -> "tokenizers.Tokenizer":
    """The `tokenizer.json` of a Hugging Face directory; CheckpointError saying how to get one if not."""
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        hint = ""
        if (path / "tokenizer.model").is_file() or (path / "vocab.json").is_file():
            hint = (
                " This directory has a slow (sentencepiece / vocab.json) tokenizer only; convert it once with "
                "`transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`."
            )
        raise CheckpointError(f"No tokenizer.json in {path}: Muse needs a Hugging Face 'fast' tokenizer file.{hint}")
    try:
        return tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON / unknown fields
        raise CheckpointError(
            f"Could not read {tok_file}: {e}. The file is corrupt or from an unsupported tokenizers version; "
            f"re-download or re-export it."
        ) from e


def _check_training_inputs(files_or_texts, vocab_size, specials: list, min_frequency) -> list:
    """`Tokenizer.train`'s arguments checked up front, before a long training run; the inputs as a list."""
    if any(not isinstance(t, str) or not t for t in specials):
        raise ValueError(f"special_tokens must be non-empty strings, got {specials!r}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least {minimum} "
            f"(256 byte symbols + {len(specials)} special tokens), and a few thousand is typical."
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    items = [files_or_texts] if isinstance(files_or_texts, (str, Path)) else list(files_or_texts)
    for item in items:
        if isinstance(item, Path) and not item.is_file():
            raise ValueError(f"files_or_texts: {item} is not a file")
        if not isinstance(item, (str, Path)):
            raise ValueError(f"files_or_texts must hold str (text) or pathlib.Path (file) items, got {item!r}")
    return items


class Tokenizer:
    """Text <-> token ids, chat templates, and streaming decode for one model.

    `backend` does the actual work; this class adds what a `tokenizer.json` does not say:
    which tokens are BOS/EOS/PAD, whether to prepend BOS, and the chat template.
    A model may have several EOS tokens (e.g. `<|im_end|>` and `<|endoftext|>`); generation
    should stop on any id in `eos_ids`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_tokens: list[str],
        pad_token: str | None,
        add_bos: bool,
        chat_template: str | None,
    ):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_tokens = list(dict.fromkeys(eos_tokens))  # dedupe, keep order: [0] is "the" EOS
        self.pad_token = pad_token
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_id = self._id_of(bos_token, "bos_token")
        self.pad_id = self._id_of(pad_token, "pad_token")
        self.eos_ids = {self._id_of(t, "eos_token") for t in self.eos_tokens}
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True needs a bos_token that is in the vocabulary")

    def _id_of(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"{what}={token!r} is not in the tokenizer's vocabulary")
        return i

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_tokens!r}, "
            f"pad={self.pad_token!r}, add_bos={self.add_bos})"
        )

    # ----------------------------------------------------------------------------- loading / saving

    @classmethod
    def from_dir(cls, path) -> Tokenizer:
        """Load a Hugging Face tokenizer directory.

        Reads `tokenizer.json` (required), `tokenizer_config.json`, `special_tokens_map.json`,
        `generation_config.json` (its `eos_token_id`, an int or a list, adds EOS tokens) and a
        chat template from `chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`,
        in that order of preference.
        """
        path = Path(path)
        backend = _read_fast_tokenizer(path)
        config = _read_json(path / "tokenizer_config.json")
        special = _read_json(path / "special_tokens_map.json")
        gen = _read_json(path / "generation_config.json")

        def token(name: str) -> str | None:
            value = config.get(name, special.get(name))
            return value.get("content") if isinstance(value, dict) else value

        eos_tokens = [t for t in [token("eos_token")] if t is not None]
        eos_tokens += config.get("muse_eos_tokens", [])
        gen_eos = gen.get("eos_token_id")
        for i in gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []:
            if (t := backend.id_to_token(i)) is not None:
                eos_tokens.append(t)

        pad_token = token("pad_token")
        if pad_token is None and isinstance(gen.get("pad_token_id"), int):
            pad_token = backend.id_to_token(gen["pad_token_id"])

        bos_token = token("bos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # No flag: do what the tokenizer.json's post-processor would do (Llama 3 adds BOS there).
            bos_id = backend.token_to_id(bos_token) if bos_token else None
            add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]

        try:
            return cls(
                backend,
                bos_token=bos_token,
                eos_tokens=eos_tokens,
                pad_token=pad_token,
                add_bos=bool(add_bos),
                chat_template=_read_chat_template(path, config),
            )
        except ValueError as e:  # a special token the vocabulary does not have
            raise CheckpointError(f"Inconsistent tokenizer files in {path}: {e}. Fix tokenizer_config.json.") from e

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its `tokenizer.*` metadata.

        Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE; `tokenizer.ggml.pre` picks the
        pre-tokenizer split) and "llama" (SentencePiece-style BPE with byte fallback). Tokens typed
        CONTROL become special tokens and USER_DEFINED ones added tokens, so `<|im_start|>` stays
        one token. EOS ids are eos/eot/eom plus, as llama.cpp does, well-known end-of-turn control
        tokens (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, ...).
        """
        meta = _GGUFMeta(reader)
        kind = meta.get("tokenizer.ggml.model")
        tokens: list[str] = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(
                "This GGUF file has no tokenizer (no tokenizer.ggml.tokens); use a GGUF that embeds one."
            )
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)

        if kind == "gpt2":
            merges, pre = meta.get("tokenizer.ggml.merges"), meta.get("tokenizer.ggml.pre")
            backend = _byte_level_backend(tokens, types, merges, pre)
            add_bos_default = False
        elif kind == "llama":
            backend = _sentencepiece_backend(
                tokens, types, meta.get("tokenizer.ggml.scores"), meta.get("tokenizer.ggml.merges"),
                meta.get("tokenizer.ggml.add_space_prefix", True),
            )
            add_bos_default = True  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
        else:
            raise CheckpointError(
                f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama'). "
                f"Use a Hugging Face directory with a tokenizer.json for this model instead."
            )

        # Added tokens live in the added vocabulary, not only in the BPE model, so tokens[i] is
        # still what the file calls id i.
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        backend.add_special_tokens(special)
        backend.add_tokens(user)

        def tok(key: str) -> str | None:
            i = meta.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        eos_tokens = [t for t in map(tok, ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                           "tokenizer.ggml.eom_token_id")) if t is not None]
        eos_tokens += [t for t, ty in zip(tokens, types) if ty == _CONTROL and t in _END_OF_TURN_TOKENS]
        bos_token = tok("tokenizer.ggml.bos_token_id")
        return cls(
            backend,
            bos_token=bos_token,
            eos_tokens=eos_tokens,
            pad_token=tok("tokenizer.ggml.padding_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos_token is not None,
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def train(
        cls,
        files_or_texts,
        vocab_size: int,
        *,
        special_tokens: Iterable[str] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"),
        min_frequency: int = 2,
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer on your own corpus.

        `files_or_texts`: paths (`pathlib.Path` objects, read as UTF-8 with invalid bytes
        replaced) and/or strings (the text itself), or a single one of either. The alphabet
        starts with all 256 byte symbols, so any input — emoji, rare CJK, binary junk decoded as
        text — encodes without an unknown token and decodes back exactly. English is split like
        GPT-2/Qwen2 (words, single digits, punctuation, whitespace); runs of Chinese characters
        are split off on their own in chunks of at most 8 (see `_TRAIN_SPLIT`).

        `vocab_size` counts everything: special tokens, the 256 byte symbols and the merges (a
        small corpus may run out of merges first, so the result can be smaller).
        `special_tokens` become single, never-split ids 0, 1, ...: the first is the document
        separator (EOS, and BOS for models that want one; it is never prepended by `encode`),
        `<|im_end|>` also ends a turn (EOS), `<|pad|>` is the PAD token, and with `<|im_start|>`
        and `<|im_end|>` present the ChatML chat template is set. `min_frequency`: a pair must
        occur this often to be merged.

            tok = Tokenizer.train([Path("corpus.txt"), "more text"], vocab_size=4096)
            tok.save("my_tokenizer")
        """
        specials = list(dict.fromkeys(special_tokens))
        files_or_texts = _check_training_inputs(files_or_texts, vocab_size, specials, min_frequency)
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_TRAIN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> alphabet only
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown tokens, ever
            show_progress=False,
        )
        backend.train_from_iterator(_training_texts(files_or_texts), trainer=trainer)

        eos_tokens = specials[:1] + [t for t in ("<|im_end|>",) if t in specials]
        chatml = "<|im_start|>" in specials and "<|im_end|>" in specials
        return cls(
            backend,
            bos_token=specials[0] if specials else None,
            eos_tokens=eos_tokens,
            pad_token="<|pad|>" if "<|pad|>" in specials else None,
            add_bos=False,
            chat_template=DEFAULT_CHAT_TEMPLATE if chatml else None,
        )

    def save(self, path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into directory `path`.

        The result loads back with `from_dir` (and with transformers' `AutoTokenizer`). EOS tokens
        beyond the first go under `muse_eos_tokens`, which `from_dir` reads.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_tokens[0] if self.eos_tokens else None,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos,
            "muse_eos_tokens": self.eos_tokens[1:],
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ----------------------------------------------------------------------------- encode / decode

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. BOS is prepended only if `add_special_tokens` and `self.add_bos`.

        Special tokens written in the text (e.g. `<|im_start|>` from a chat template) always
        encode as their single id.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(_as_int_list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, s: str) -> int | None:
        return self.backend.token_to_id(s)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def piece_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for, read from its spelling: a byte-level vocabulary's (GPT-2's byte
        alphabet) or SentencePiece's byte fallback (`<0xE4>`); b"" for any other spelling. Meant for
        tokens that hold part of a character (they decode to U+FFFD), whose text cannot say it."""
        raw = self.backend.id_to_token(i) or ""
        hexed = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", raw)
        if hexed:
            return bytes([int(hexed.group(1), 16)])
        to_byte = _byte_values()
        return bytes(to_byte[c] for c in raw) if raw and all(c in to_byte for c in raw) else b""

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` (dicts with "role" and "content") into the prompt string.

        Rendered as transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks,
        `raise_exception`, `strftime_now`, a non-HTML-escaping `tojson`), with `bos_token`,
        `eos_token` and `pad_token` visible to the template; `kwargs` (e.g. `tools=...`) are passed
        through. A model without a template gets plain ChatML (`DEFAULT_CHAT_TEMPLATE`).
        """
        template = _compile_template(self.chat_template if self.chat_template is not None else DEFAULT_CHAT_TEMPLATE)
        variables: dict[str, Any] = {"tools": None, "documents": None}
        eos_token = self.eos_tokens[0] if self.eos_tokens else None
        for name, value in (("bos_token", self.bos_token), ("eos_token", eos_token), ("pad_token", self.pad_token)):
            if value is not None:  # like transformers: an unset token is undefined, not the string "None"
                variables[name] = value
        variables.update(_plain(kwargs))
        variables["messages"] = _plain(messages)
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            return template.render(**variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"The chat template could not render this conversation: {e}") from e


class StreamDecoder:
    """Incremental, UTF-8-safe decoding of a stream of token ids.

    `push` returns only the text completed by that token. A multi-byte character split across
    tokens (common for CJK and emoji in byte-level BPE) is held back until its last byte arrives,
    so no chunk ever contains a U+FFFD from a split character, and joined chunks equal
    `decode(all_ids)`. Each push decodes only a short window (the tokens not yet emitted plus the
    previous chunk's as context), so it costs O(1) in the length of the stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._decode = functools.partial(tokenizer.backend.decode, skip_special_tokens=skip_special_tokens)
        # _ids = [tokens of the last emitted chunk (context) ..., tokens not emitted yet ...]
        self._ids: list[int] = []
        self._n_context = 0
        self._prefix = ""  # decode(_ids[:_n_context]): the part of decode(_ids) already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if text.endswith("\ufffd") or len(text) <= len(self._prefix):
            return ""  # an incomplete character (or nothing visible yet): wait for more bytes
        return self._emit(text)

    def flush(self) -> str:
        """Whatever is left; an invalid byte sequence comes out here as U+FFFD."""
        return self._emit(self._decode(self._ids))

    def _emit(self, text: str) -> str:
        new = text[len(self._prefix):]
        # The chunk just emitted becomes the context. A whole chunk, not just its last token:
        # decoders see context (SentencePiece strips a leading space at the start of a decode;
        # ByteFallback decodes a run of <0xNN> tokens all together), and a chunk decodes cleanly on its own.
        self._ids = self._ids[self._n_context:]
        self._n_context = len(self._ids)
        self._prefix = self._decode(self._ids)
        return new


# --------------------------------------------------------------------------------- chat templates

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body as-is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (a sandbox escape route), as transformers does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message):
    raise ChatTemplateError(f"The chat template rejected this conversation: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike jinja's own tojson, no HTML escaping; same signature as transformers' override.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"The model's chat template is not valid jinja2 (line {e.lineno}): {e.message}") from e


def _plain(value):
    """A copy of `value` made of plain JSON-like types only: the sandbox cannot see methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    for base in (str, bool, int, float):
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


def _read_chat_template(path: Path, config: dict) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); re-download or fix the file.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} should hold a JSON object, not {type(data).__name__}; re-download it.")
    return data


def _as_int_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # torch / numpy
        ids = ids.tolist()
    return [int(i) for i in ids]


# --------------------------------------------------------------------------------- training

# Pre-tokenizer for `Tokenizer.train`: Qwen2's split (English contractions, letters with one
# leading space or symbol, single digits, punctuation runs, whitespace) plus one rule for Chinese.
# Chinese has no spaces, so in the Qwen2 split a whole clause — or, in text without punctuation,
# a whole paragraph — would be one "word", and Latin letters glued to Han characters would ride
# along ("我用Python写代码" as one piece). Here Han characters form pieces of their own, at most 8
# characters long: long enough for BPE to learn multi-character words, idioms and whole 5- or
# 7-character poem lines, short enough that the trainer's word counts see repeats instead of
# millions of unique paragraphs. (A word cut by a chunk boundary is still encodable; it is just
# spelled with more tokens that time.)
_TRAIN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|\p{Han}{1,8}|[^\r\n\p{L}\p{N}]?[\p{L}&&[^\p{Han}]]+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _training_texts(files_or_texts) -> Iterable[str]:
    """Strings as they are; files read in ~1 MB pieces of whole lines (never all at once)."""
    for item in files_or_texts:
        if isinstance(item, str):
            yield item
            continue
        with open(item, encoding="utf-8", errors="replace", newline="") as f:
            while True:
                piece = f.read(1 << 20)
                if not piece:
                    break
                yield piece + f.readline()  # finish the line so no word is cut in two


# --------------------------------------------------------------------------------- GGUF

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Control tokens llama.cpp treats as end-of-generation whatever eos_token_id says.
_END_OF_TURN_TOKENS = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
    "<|end_of_text|>", "<|return|>", "<|call|>",
}

# Pre-tokenizer split regexes, by `tokenizer.ggml.pre` (see llama.cpp's llama-vocab.cpp).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Like Llama 3 but one digit at a time (so CJK runs and digits split the way Qwen's merges expect).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> (split regex, digits one by one before splitting, NFC-normalize, BPE ignore_merges)
_PRE_TOKENIZERS: dict[str, tuple[str, bool, bool, bool]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "phi-2", "jina-es", "jina-de", "roberta-bpe"),
                    (_GPT2_SPLIT, False, False, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    (_GPT2_SPLIT, True, False, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"),
                    (_LLAMA3_SPLIT, False, False, True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), (_QWEN2_SPLIT, False, True, False)),
    **dict.fromkeys(("gpt-4o", "llama4"), (_GPT4O_SPLIT, False, False, False)),
}


class _GGUFMeta:
    """Typed access to a GGUFReader's key/value fields."""

    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        return field.contents()  # str / int / bool / float, or a list of them (fast: one numpy pass)


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes_to_unicode)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@functools.lru_cache(maxsize=1)
def _byte_values() -> dict[str, int]:
    """GPT-2's byte alphabet read backwards: printable character -> byte."""
    return {c: b for b, c in _byte_alphabet().items()}


def _byte_level_backend(tokens: list[str], types: list[int], merges: list[str] | None, pre: str | None):
    if merges is None:
        raise CheckpointError("This byte-level (gpt2) GGUF has no tokenizer.ggml.merges; the file is incomplete.")
    if pre not in _PRE_TOKENIZERS:
        warnings.warn(
            f"Unknown GGUF pre-tokenizer {pre!r}; splitting text like GPT-2, which may not match the original model.",
            stacklevel=3,
        )
    split, digits, nfc, ignore_merges = _PRE_TOKENIZERS.get(pre, _PRE_TOKENIZERS["gpt2"])

    to_char = _byte_alphabet()
    alphabet = set(to_char.values())
    vocab = {}
    for i, t in enumerate(tokens):
        # Normal tokens are spelled in the byte alphabet; respell any that are not (control and
        # user-defined tokens are raw text and go to the added vocabulary as they are).
        if types[i] not in (_CONTROL, _USER_DEFINED) and not set(t) <= alphabet:
            t = "".join(to_char[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=ignore_merges)
    backend = tokenizers.Tokenizer(bpe)
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> alphabet only; split above
    ]
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.normalizer = normalizers.NFC() if nfc else None
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(tokens, types, scores, merges, add_space_prefix: bool) -> tokenizers.Tokenizer:
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if merges is not None:
        merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        if scores is None:
            raise CheckpointError("This sentencepiece GGUF has neither merges nor scores; the file is incomplete.")
        skip = {t for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED, _BYTE, _UNKNOWN)}
        merge_pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)), skip)
    unk = next((t for t, ty in zip(tokens, types) if ty == _UNKNOWN), None)
    backend = tokenizers.Tokenizer(models.BPE(vocab, merge_pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float], skip: set[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    best-scored merged token first (as transformers' `generate_merges` orders them)."""
    merges = []
    for piece, score in scores.items():
        if piece in skip:
            continue
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab and piece[:k] not in skip and piece[k:] not in skip]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
