"""The Python API: `muse.load()` gives a `Model` that generates, streams and chats.

The CLI and the server are thin layers over exactly these calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from muse.checkpoints import load_checkpoint
from muse.generation import GenerationChunk, SamplingParams, generate, score, stream_generate


class Model:
    """A loaded model with its tokenizer.

    >>> m = muse.load()                      # the embedded default (SmolLM2-135M-Instruct)
    >>> m.generate("The capital of France is", max_new_tokens=8, temperature=0)
    >>> for chunk in m.stream("Once upon a time"): print(chunk.text, end="")
    >>> m.chat([{"role": "user", "content": "Hi!"}])
    """

    def __init__(self, model, tokenizer, info: dict):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info

    @property
    def config(self):
        return self.model.config

    @property
    def name(self) -> str:
        return self.info.get("name", "model")

    @property
    def recommended(self) -> dict:
        """The sampling the checkpoint recommends, as `SamplingParams` fields: its
        generation_config.json or GGUF `general.sampling.*` keys, else (a bundled model) its
        publisher's settings; {} when there are none."""
        return dict(self.info.get("sampling") or {})

    def params(self, params: SamplingParams | None = None, **kwargs) -> SamplingParams:
        """The settings a call runs with: `params` as given, else `SamplingParams` defaults under the
        model's recommended sampling; keyword arguments (the values a user set) override either.
        `temperature=0` stays greedy."""
        base = params if params is not None else SamplingParams(**self.recommended)
        return base.replace(**kwargs) if kwargs else base

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer; use token ids with Model.logits()")
        return self.tokenizer

    # -- generation ---------------------------------------------------------------

    def stream(self, prompt: "str | list[int]", params: SamplingParams | None = None,
               **kwargs) -> Iterator[GenerationChunk]:
        """Yield `GenerationChunk`s (text delta, token, finish reason, speeds)."""
        return stream_generate(self.model, self.tokenizer, prompt, self.params(params, **kwargs))

    def generate(self, prompt: "str | list[int]", params: SamplingParams | None = None, **kwargs) -> str:
        """Complete `prompt`; keyword arguments are `SamplingParams` fields."""
        return generate(self.model, self.tokenizer, prompt, self.params(params, **kwargs))

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template renders for `messages`."""
        _check_messages(messages)
        return self._need_tokenizer().apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None,
                    **kwargs) -> Iterator[GenerationChunk]:
        prompt = self.chat_prompt(messages)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return self.stream(ids, params, **kwargs)

    def chat(self, messages: list[dict], params: SamplingParams | None = None, **kwargs) -> str:
        """The assistant's reply to an OpenAI-style list of {"role", "content"} messages."""
        return "".join(c.text for c in self.stream_chat(messages, params, **kwargs))

    def score(self, prompt: "str | list[int]", continuations: "list[str]") -> list[float]:
        """Total log-probability of each continuation right after `prompt` (text or ids; text gets
        the tokenizer's BOS as `generate` does). A continuation's tokens are those of the whole
        text prompt + continuation past the prompt's, so a word that merges with the prompt's
        last characters is scored as the model would really see it."""
        tok = self._need_tokenizer()
        prefix = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        conts = []
        for c in continuations:
            if not isinstance(c, str) or not c:
                raise ValueError("continuations must be non-empty strings")
            full = tok.encode(prompt + c) if isinstance(prompt, str) else None
            ids = full[len(prefix):] if full and full[:len(prefix)] == prefix else tok.encode(c, add_special_tokens=False)
            conts.append(ids or tok.encode(c, add_special_tokens=False))
        return [sum(lp) for lp in self.score_ids(prefix, conts)]

    def score_ids(self, prefix: list[int], continuations: list[list[int]]) -> list[list[float]]:
        """Each continuation's per-token log-probabilities after `prefix` (`generation.score`)."""
        return score(self.model, prefix, continuations)

    # -- inspection ---------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, prompt: "str | list[int]") -> torch.Tensor:
        """Next-token logits at every position: (T, vocab) float32."""
        ids = self._need_tokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) > self.config.block_size:
            from muse.errors import ContextLengthError

            raise ContextLengthError(len(ids), self.config.block_size)
        out, _ = self.model(torch.tensor([ids], device=self.model.device))
        return out[0]

    def describe(self) -> dict:
        """Architecture, size, context and quantization, for `muse info`."""
        c = self.config
        quant = self.info.get("quantization", {})
        kinds = sorted({f"int{q['bits']} g{q['group_size']}" for q in quant.values()})
        return {
            "name": self.name,
            "path": self.info.get("path"),
            "format": self.info.get("format"),
            "architecture": c.arch,
            "parameters": c.num_params(),
            "layers": c.n_layer,
            "heads": f"{c.n_head} (kv {c.n_kv_head})",
            "width": c.n_embd,
            "mlp": f"{c.mlp} ({c.intermediate_size})",
            "positions": f"rope θ={c.rope_theta:g}" if c.pos == "rope" else "learned",
            "norm": c.norm,
            "context": c.block_size,
            "vocabulary": c.vocab_size,
            "tied embeddings": c.tie_embeddings,
            "precision": self.info.get("precision"),
            "quantization": ", ".join(kinds) + f" on {len(quant)} layers" if quant else "none (float)",
            "chat template": bool(self.tokenizer and self.tokenizer.chat_template),
            "recommended sampling": ", ".join(f"{k} {v:g}" for k, v in self.recommended.items())
            or "none (Muse's defaults)",
        }


def _check_messages(messages) -> None:
    """OpenAI-style messages: string content, except an assistant message that makes tool calls
    (`tool_calls`, a non-empty list), whose content may be None; `tool` messages carry results."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list) \
            and bool(m["tool_calls"])
        if not isinstance(m, dict) or not (isinstance(m.get("content"), str) or (calls and m.get("content") is None)) \
                or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}] must be a dict with role system|user|assistant|tool and string content "
                             "(None only on an assistant message with tool_calls)")


def load(name_or_path: "str | Path | None" = None, precision: str = "auto") -> Model:
    """Load a model: a bundled name (default: SmolLM2-135M-Instruct), a GGUF file, or a
    Hugging Face / Muse directory. precision: auto (keep the file's quantization),
    fp32, bf16, int8 or int4."""
    ckpt = load_checkpoint(name_or_path, precision)
    return Model(ckpt.model, ckpt.tokenizer, ckpt.info)
