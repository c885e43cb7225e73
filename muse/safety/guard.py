"""The one switch apps and the server call: `guard()` on every text in or out, `guard_redact()` before
a text reaches the model.

    from muse.safety import guard, guard_redact, restore
    guard(user_text, "input", source="chat")          # raises SafetyBlocked, or returns a Moderation
    red = guard_redact(user_text, source="chat")      # red.text goes to the model
    answer = restore(model_answer, red.mapping)       # the user sees their own data again
    guard(answer, "output", source="chat")

Both do nothing (no check, no log) unless safety is enabled: `[safety] enabled = true` in
MUSE_HOME/config.toml or MUSE_SAFETY=1 (MUSE_SAFETY=0 forces it off). When on, every decision is
written to the audit log, and a `block` raises `SafetyBlocked`, a MuseError whose message names the
category, so the CLI prints one line and the server answers 4xx.
"""

from __future__ import annotations

from muse.errors import MuseError
from muse.safety import audit
from muse.safety.config import enabled, load_config
from muse.safety.moderation import Classifier, Moderation, allowed, describe, moderate
from muse.safety.pii import Redaction, redact

DIRECTIONS = ("input", "output")


class SafetyBlocked(MuseError):
    """A text the safety policy refuses. `.category`, `.moderation` and `.direction` say why."""

    def __init__(self, moderation: Moderation, direction: str, category: str):
        self.moderation, self.direction, self.category = moderation, direction, category
        super().__init__(_blocked_message(moderation.language, direction, category))


def _blocked_message(lang: str, direction: str, category: str) -> str:
    path = load_config().path
    if lang == "zh":
        what = "输入" if direction == "input" else "回复"
        hint = "" if category == "sexual_minors" else \
            f"如属误判，可在 {path} 的 [safety.policy] 中调整 {category}。"
        return (f"已被 Muse 安全策略拦截：这段{what}可能涉及{describe(category, 'zh')}（{category}）。"
                f"请换一种说法。{hint}")
    what = "request" if direction == "input" else "response"
    hint = "" if category == "sexual_minors" else (
        f" If this is a mistake, set {category} = \"warn\" under [safety.policy] in {path}.")
    return f"Blocked by Muse's safety policy: this {what} looks like {describe(category)} ({category}). " \
           f"Please rephrase it.{hint}"


def _check(text, direction: str, source) -> None:
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'input' or 'output', got {direction!r}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string naming the caller (e.g. 'chat'), got {source!r}")


def guard(text: str, direction: str = "input", source: str = "chat", classifier: Classifier | None = None) -> Moderation:
    """Check `text` against the policy when safety is on; a no-op returning an allow verdict when off.

    Logs the decision (never the text), returns the Moderation (show `.message` to the user when it
    is not empty: warnings, the self-harm helpline), raises SafetyBlocked when the action is block.
    """
    _check(text, direction, source)
    config = load_config()
    if not enabled(config):
        return allowed()
    verdict = moderate(text, classifier, config)
    audit.write({
        "event": "moderation", "source": source, "direction": direction, "action": verdict.action,
        "flagged": verdict.flagged_categories, "scores": {c: s for c, s in verdict.categories.items() if s},
        "language": verdict.language, "chars": len(text), "text_hmac": audit.fingerprint(text),
    })
    if verdict.action == "block":
        blocked = next(c for c, a in verdict.actions.items() if a == "block")
        raise SafetyBlocked(verdict, direction, blocked)
    return verdict


def guard_redact(text: str, source: str = "chat") -> Redaction:
    """Personal data replaced by placeholders when safety is on and `[safety] redact_pii = true`;
    otherwise the text unchanged with an empty mapping. Restore the answer with `restore(answer, r.mapping)`."""
    _check(text, "input", source)
    config = load_config()
    if not (config.redact_pii and enabled(config)):
        return Redaction(text)
    red = redact(text, kinds=config.pii_kinds)
    if red.entities:
        kinds: dict[str, int] = {}
        for e in red.entities:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        audit.write({"event": "redaction", "source": source, "direction": "input", "kinds": kinds,
                     "chars": len(text), "text_hmac": audit.fingerprint(text)})
    return red


_SENTENCE_END = frozenset(".!?。！？；;\n")


def guard_stream(chunks, source: str = "chat"):
    """Pass a stream of `GenerationChunk`s through, checking the text so far at each sentence end and
    at the end of the stream when safety is on (a no-op wrapper when off).

    Raises SafetyBlocked as soon as the output so far is blocked, and closes the underlying stream
    (so generation stops and its batch slot is freed). Only the final check is written to the audit
    log; the checks along the way are silent unless they block.
    """
    if not enabled(load_config()):
        yield from chunks
        return
    text = ""
    try:
        for chunk in chunks:
            text += chunk.text
            if chunk.finish_reason is None and _SENTENCE_END.intersection(chunk.text):
                verdict = moderate(text)
                if verdict.action == "block":
                    guard(text, "output", source)  # logs and raises
            yield chunk
        guard(text, "output", source)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
