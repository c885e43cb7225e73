"""Safety settings: the `[safety]` table of `MUSE_HOME/config.toml`, and the one on/off switch.

    [safety]
    enabled = true        # guard() checks texts; MUSE_SAFETY=1 / MUSE_SAFETY=0 override this either way
    redact_pii = true     # guard_redact() replaces e-mails, phones, IDs, cards, IPs before the model sees them
    pii_kinds = ["email", "phone", "id", "card", "ip"]    # which kinds redact_pii replaces (default: all)
    threshold = 0.5       # a category is flagged at this score (0-1)

    [safety.policy]       # per category: block | warn | log | allow   (defaults: DEFAULT_POLICY)
    violence = "block"

    [safety.messages]     # replace the warning shown for a category
    self_harm = "..."

Every key is checked: a typo ("enable = true") is an error naming the key, not a silently ignored
setting. The file is parsed again only when its content changes, so `guard()` per message is cheap.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from muse.errors import MuseError
from muse.safety.lexicon import CATEGORIES

ACTIONS = ("allow", "log", "warn", "block")          # in rising severity
PII_KINDS = ("email", "phone", "id", "card", "ip")
# Sexual content involving minors and instructions for weapons are refused outright; self-harm gets a
# helpline message; adult sexual content (legal, and the user's own business on a local tool) is only logged.
DEFAULT_POLICY = {
    "violence": "warn", "self_harm": "warn", "sexual_minors": "block", "hate": "warn",
    "weapons": "block", "sexual": "log", "harassment": "warn", "drugs": "warn",
}
_KEYS = {"enabled", "redact_pii", "pii_kinds", "threshold", "policy", "messages"}


class SafetyConfigError(MuseError):
    """config.toml has a [safety] setting Muse cannot use."""


@dataclass
class SafetyConfig:
    enabled: bool = False
    redact_pii: bool = False
    pii_kinds: tuple[str, ...] = PII_KINDS
    threshold: float = 0.5
    policy: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_POLICY))
    messages: dict[str, str] = field(default_factory=dict)
    path: Path | None = None


def config_path() -> Path:
    from muse.paths import muse_home

    return muse_home() / "config.toml"


_cache: dict[tuple, SafetyConfig] = {}


def load_config(path: "str | Path | None" = None) -> SafetyConfig:
    """The [safety] settings (defaults where the file or a key is missing)."""
    path = Path(path) if path else config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return SafetyConfig(path=path)
    except OSError as e:
        raise SafetyConfigError(f"Cannot read {path} ({e.strerror}).") from None
    key = (str(path), raw)  # keyed on the content: an edit is seen at once, an unchanged file is parsed once
    if key not in _cache:
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise SafetyConfigError(f"Cannot read {path}: {e}. Fix the file (it is TOML) or move it aside.") from None
        _cache.clear()
        _cache[key] = parse_config(data.get("safety", {}), path)
    return _cache[key]


def parse_config(table: dict, path: "Path | None" = None) -> SafetyConfig:
    """Validate a [safety] table (as parsed from TOML) into a SafetyConfig."""
    where = f"{path or 'config.toml'} [safety]"

    def bad(msg: str) -> SafetyConfigError:
        return SafetyConfigError(f"{where}: {msg}")

    if not isinstance(table, dict):
        raise bad("must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise bad(f"unknown setting {', '.join(sorted(unknown))}; the settings are {', '.join(sorted(_KEYS))}")
    cfg = SafetyConfig(path=path)
    for name in ("enabled", "redact_pii"):
        if name in table:
            if not isinstance(table[name], bool):
                raise bad(f"{name} must be true or false, got {table[name]!r}")
            setattr(cfg, name, table[name])
    if "threshold" in table:
        t = table["threshold"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise bad(f"threshold must be a number in (0, 1], got {t!r}")
        cfg.threshold = float(t)
    if "pii_kinds" in table:
        kinds = table["pii_kinds"]
        if not isinstance(kinds, list) or not kinds or any(k not in PII_KINDS for k in kinds):
            raise bad(f"pii_kinds must be a non-empty list of {', '.join(PII_KINDS)}; got {kinds!r}")
        cfg.pii_kinds = tuple(kinds)
    cfg.policy.update(_check_map(table.get("policy", {}), "policy", ACTIONS, bad))
    cfg.messages.update(_check_map(table.get("messages", {}), "messages", None, bad))
    return cfg


def _check_map(table, name: str, allowed, bad) -> dict[str, str]:
    if not isinstance(table, dict):
        raise bad(f"{name} must be a table ([safety.{name}])")
    for cat, value in table.items():
        if cat not in CATEGORIES:
            raise bad(f"{name}.{cat}: unknown category; the categories are {', '.join(CATEGORIES)}")
        if not isinstance(value, str) or (allowed and value not in allowed):
            want = f"one of {', '.join(allowed)}" if allowed else "a string"
            raise bad(f"{name}.{cat} must be {want}, got {value!r}")
    return dict(table)


def enabled(config: SafetyConfig | None = None) -> bool:
    """Whether guard() is on: MUSE_SAFETY=1/0 wins, else `[safety] enabled` (default off)."""
    env = os.environ.get("MUSE_SAFETY", "").strip().lower()
    if env in ("1", "true", "on", "yes"):
        return True
    if env in ("0", "false", "off", "no"):
        return False
    if env:
        raise MuseError(f"MUSE_SAFETY={os.environ['MUSE_SAFETY']!r} is not understood: use MUSE_SAFETY=1 to turn "
                        "safety checks on or MUSE_SAFETY=0 to turn them off.")
    return (config or load_config()).enabled
