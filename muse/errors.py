"""User-facing errors.

Every error a user can cause (a bad path, a corrupt file, a prompt too long, a bad
parameter) is raised as a `MuseError` whose message says what is wrong and how to fix
it. The CLI and the server turn these into clean messages / 4xx responses; tests see
them as-is. Out-of-range parameters are plain `ValueError`s naming the parameter.
"""

from __future__ import annotations


class MuseError(Exception):
    """Base class for errors caused by user input or the environment, not by bugs."""


class ModelNotFoundError(MuseError):
    """A model name or path that Muse cannot find."""


class CheckpointError(MuseError):
    """A checkpoint that exists but cannot be read (corrupt, incomplete, unsupported)."""


class ContextLengthError(MuseError, ValueError):
    """A prompt that does not fit the model's context window."""

    def __init__(self, prompt_tokens: int, limit: int, max_new_tokens: int = 0):
        self.prompt_tokens = prompt_tokens
        self.limit = limit
        self.max_new_tokens = max_new_tokens
        room = f" (leaving room for max_new_tokens={max_new_tokens})" if max_new_tokens else ""
        super().__init__(
            f"The prompt is {prompt_tokens} tokens long, but this model's context window "
            f"is {limit} tokens{room}. Shorten the prompt, lower max_new_tokens, or pass "
            f"truncate='left' to drop the oldest tokens explicitly."
        )
