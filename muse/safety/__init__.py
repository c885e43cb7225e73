"""Safety: moderation, personal-data redaction, a bias probe, an audit log, and one switch.

    from muse import safety
    safety.moderate("I will k1ll you")              # Moderation(flagged=True, action='warn', categories={...})
    r = safety.redact("电话13800138000")            # Redaction(text='电话[PHONE_1]', mapping={...})
    safety.restore("已记下 [PHONE_1]", r.mapping)    # '已记下 13800138000'
    safety.guard(text, "input", source="chat")     # the switch apps and the server call: a no-op unless
                                                   # [safety] enabled = true or MUSE_SAFETY=1
    safety.bias_probe(score_fn)                     # he/she, John/Mary, 他/她 … sentiment gaps

Modules: `normalize` (evasion-proof text folding), `lexicon` (the zh+en word lists in
muse/safety_data/lexicon.toml and the scanner), `moderation` (categories → policy → verdict,
precision/recall on muse/safety_data/moderation_eval.jsonl), `pii` (regex + checksum recognizers,
reversible placeholders), `config` (MUSE_HOME/config.toml [safety]), `audit` (logs/safety.jsonl),
`guard` (the switch), `bias` (the counterfactual probe).
"""

from muse.safety.bias import BiasReport, bias_probe
from muse.safety.config import ACTIONS, DEFAULT_POLICY, PII_KINDS, SafetyConfig, SafetyConfigError, enabled, load_config
from muse.safety.guard import SafetyBlocked, guard, guard_redact, guard_stream
from muse.safety.lexicon import CATEGORIES
from muse.safety.moderation import Moderation, evaluate, moderate
from muse.safety.normalize import normalize
from muse.safety.pii import Entity, Redaction, find_pii, redact, restore

__all__ = [
    "ACTIONS", "CATEGORIES", "DEFAULT_POLICY", "PII_KINDS", "BiasReport", "Entity", "Moderation", "Redaction",
    "SafetyBlocked", "SafetyConfig", "SafetyConfigError", "bias_probe", "enabled", "evaluate", "find_pii", "guard",
    "guard_redact", "guard_stream", "load_config", "moderate", "normalize", "redact", "restore",
]
