"""Moderation: which categories a text falls into, and what the policy says to do about it.

    >>> m = moderate("I will k1ll you")
    >>> m.flagged, m.action, m.flagged_categories
    (True, 'warn', ['violence'])

The lexicon (`muse.safety.lexicon`) works alone, offline, in Chinese and English. Pass `classifier=`
for a second opinion from a language model — `muse.apps.analysis.safety_classifier(model)` scores the
category names with the model: a category it picks with probability >= 0.5 is flagged even when no
term matched. Safety sits below the apps, so it takes the classifier as a callable.

The action is the most severe policy among the flagged categories, except that `block` needs a
strong lexicon match (or the model's opinion): two weak words ("bomb", "explosives" in a news story)
only ever warn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from muse.errors import MuseError
from muse.safety.config import ACTIONS, SafetyConfig, load_config
from muse.safety.lexicon import CATEGORIES, load_lexicon, scan
from muse.text import language

# (text, labels) -> {label: probability}, or {} when it cannot judge the text (its language, say).
Classifier = Callable[[str, list[str]], dict[str, float]]

# What the language model is asked to choose between (its second opinion).
MODEL_LABELS = {
    "safe": None, "violence": "violence", "self-harm": "self_harm", "sexual content involving minors": "sexual_minors",
    "hate speech": "hate", "weapons or illegal goods": "weapons", "sexual content": "sexual",
    "harassment": "harassment", "illegal drugs": "drugs",
}
HELPLINE = {
    "en": "If you are thinking about hurting yourself, you are not alone. Please talk to someone you trust, or "
          "call a crisis line: 988 in the US, 116 123 (Samaritans) in the UK, or find one near you at "
          "https://findahelpline.com.",
    "zh": "如果你有伤害自己的念头，你并不孤单。请和信任的人聊聊，或拨打心理援助热线："
          "全国心理援助热线 400-161-9995，北京心理危机研究与干预中心 010-82951332；紧急情况请拨打 120 或 110。",
}


@dataclass
class Moderation:
    """The verdict on one text.

    flagged: some category reached the threshold. action: allow | log | warn | block (from the policy).
    categories: every category's score in [0, 1]. matches: what fired ({"category", "kind", "lang", "text"};
    kind is strong/weak/combo, or "model" for the language model's opinion). message: what to tell the user
    (warnings, helpline, or why it was blocked); empty when there is nothing to say. actions: the action
    taken for each flagged category.
    """
    flagged: bool
    action: str
    categories: dict[str, float]
    matches: list[dict] = field(default_factory=list)
    flagged_categories: list[str] = field(default_factory=list)
    message: str = ""
    language: str = "en"
    actions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"flagged": self.flagged, "action": self.action, "categories": self.categories,
                "flagged_categories": self.flagged_categories, "actions": self.actions, "matches": self.matches,
                "message": self.message, "language": self.language}


def allowed(categories: dict[str, float] | None = None) -> Moderation:
    """The verdict of a check that did not run (safety off) or found nothing."""
    return Moderation(False, "allow", dict(categories or {}))


def describe(category: str, lang: str = "en") -> str:
    cat = load_lexicon()[category]
    return cat.description_zh if lang == "zh" else cat.description


def _message(category: str, action: str, lang: str, config: SafetyConfig) -> str:
    if category in config.messages:
        return config.messages[category]
    if category == "self_harm":
        return HELPLINE[lang]
    if action == "warn":
        return (f"提示：这段内容可能涉及{describe(category, 'zh')}。" if lang == "zh"
                else f"Note: this text looks like {describe(category)}.")
    return ""


def _model_opinion(classifier: Classifier, text: str) -> dict[str, float]:
    """Category -> probability from the classifier, {} when it cannot judge the text."""
    probs = classifier(text, list(MODEL_LABELS))
    return {MODEL_LABELS[label]: float(p) for label, p in probs.items() if MODEL_LABELS.get(label)}


def moderate(text: str, classifier: Classifier | None = None, config: SafetyConfig | None = None) -> Moderation:
    """Classify `text` into the moderation categories and apply the policy of `config` (default: config.toml).

    This runs whether or not safety is enabled (it is the classifier); `guard()` is the switch.
    classifier: an optional second opinion, (text, labels) -> {label: probability} (see the module docstring).
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    config = config or load_config()
    found = scan(text)
    scores, strong, matches = dict(found.scores), set(found.strong), list(found.matches)
    if classifier is not None:
        for cat, p in _model_opinion(classifier, text).items():
            if p >= 0.5 and p > scores[cat]:
                scores[cat] = round(p, 4)
                strong.add(cat)
                matches.append({"category": cat, "kind": "model", "lang": language(text), "text": f"p={p:.2f}"})
    flagged = [c for c in CATEGORIES if scores[c] >= config.threshold]
    lang = language(text)
    actions = {c: config.policy[c] for c in flagged}
    for cat in flagged:
        if actions[cat] == "block" and cat not in strong:
            actions[cat] = "warn"  # weak evidence alone never blocks
    action = max(actions.values(), key=ACTIONS.index, default="allow")
    notes = [_message(c, a, lang, config) for c, a in actions.items() if a in ("warn", "block")]
    return Moderation(bool(flagged), action, scores, matches, flagged, "\n".join(n for n in notes if n), lang, actions)


def eval_path() -> Path:
    return Path(str(resources.files("muse") / "safety_data" / "moderation_eval.jsonl"))


def evaluate(path: "str | Path | None" = None, classifier: Classifier | None = None) -> dict:
    """Precision and recall of `moderate` on a labelled JSONL set ({"text", "labels": [categories], "lang"}).

    Returns {"items", "overall": {precision, recall, f1, tp, fp, fn}, "by_category": {...},
    "by_lang": {...}, "benign_false_alarms": n, "errors": [items the lexicon got wrong]}.
    Counted per (item, category); benign items (labels []) count only as possible false positives.
    """
    rows = _read_eval(Path(path) if path else eval_path())
    config = SafetyConfig()
    counts = {c: [0, 0, 0] for c in CATEGORIES}       # tp, fp, fn
    langs: dict[str, list[int]] = {}
    errors, benign_alarms = [], 0
    for row in rows:
        got = set(moderate(row["text"], classifier, config).flagged_categories)
        want = set(row["labels"])
        per_lang = langs.setdefault(row.get("lang", "?"), [0, 0, 0])
        for cat in CATEGORIES:
            k = 0 if (cat in got and cat in want) else 1 if cat in got else 2 if cat in want else None
            if k is not None:
                counts[cat][k] += 1
                per_lang[k] += 1
        if got != want:
            errors.append({"text": row["text"], "want": sorted(want), "got": sorted(got)})
        benign_alarms += bool(not want and got)
    return {"items": len(rows), "overall": _prf(*map(sum, zip(*counts.values()))),
            "by_category": {c: _prf(*v) for c, v in counts.items()},
            "by_lang": {k: _prf(*v) for k, v in sorted(langs.items())},
            "benign_items": sum(1 for r in rows if not r["labels"]), "benign_false_alarms": benign_alarms,
            "errors": errors}


def _prf(tp: int, fp: int, fn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 3), "recall": round(r, 3), "f1": round(f1, 3), "tp": tp, "fp": fp, "fn": fn}


def _read_eval(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MuseError(f"Cannot read the evaluation set {path}: {e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MuseError(f"{path}:{i}: not JSON ({e.msg})") from None
        ok = isinstance(row, dict) and isinstance(row.get("text"), str) and isinstance(row.get("labels"), list)
        if not ok or any(c not in CATEGORIES for c in row["labels"]):
            raise MuseError(f"{path}:{i}: each line needs \"text\" and \"labels\" (a list of {', '.join(CATEGORIES)})")
        rows.append(row)
    return rows
