"""What changed between two texts, word by word (and character by character in Chinese).

    >>> [(o["op"], o["text"]) for o in word_diff("The cat sat.", "The dog sat.")["ops"]]
    [('equal', 'The '), ('delete', 'cat'), ('insert', 'dog'), ('equal', ' sat.')]

The edit operations are what the web app's writing desk shows (kept, deleted and inserted runs:
kept + deleted text is the old text, kept + inserted the new one); the unified line diff is for tools.
"""

from __future__ import annotations

import difflib
import re

# Latin words and numbers, runs of white space, and any other single character (so each Chinese
# character is a token of its own: Chinese has no spaces between words).
_TOKEN = re.compile(r"\s+|[0-9A-Za-z\u00c0-\u024f]+|.", re.S)


def diff_tokens(text: str) -> list[str]:
    """The pieces a diff compares: words, numbers, white space runs, single other characters."""
    return _TOKEN.findall(text)


def word_diff(old: str, new: str) -> dict:
    """{"ops": [{"op": equal | delete | insert, "text"}], "unified": a unified line diff ("before" → "after")}."""
    a, b = diff_tokens(old), diff_tokens(new)
    ops = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            ops.append({"op": "equal", "text": "".join(a[i1:i2])})
            continue
        if i2 > i1:
            ops.append({"op": "delete", "text": "".join(a[i1:i2])})
        if j2 > j1:
            ops.append({"op": "insert", "text": "".join(b[j1:j2])})
    unified = "\n".join(difflib.unified_diff(old.splitlines(), new.splitlines(), "before", "after", lineterm=""))
    return {"ops": ops, "unified": unified}
