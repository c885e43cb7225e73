"""Which languages a model reads, and the clear error when a request is in one it does not.

    check_language(model, "今天天气很好")   # "zh", or LanguageError naming the bilingual model to install
"""

from __future__ import annotations

from muse.checkpoints.registry import BUNDLED
from muse.errors import MuseError
from muse.text import language


class LanguageError(MuseError):
    """A request in a language the loaded model cannot handle."""


def supports_chinese(model) -> bool:
    """Whether `model` was trained for Chinese.

    Bundled models say so in the registry; for any other model the tokenizer tells: a vocabulary
    built for Chinese spends about one token per character or less, an English-only byte-level BPE
    two or more (each character is 3 UTF-8 bytes).
    """
    bundled = BUNDLED.get(model.info.get("name", ""))
    if bundled is not None:
        return "zh" in bundled.languages
    sample = "我们今天在北京学习中文，天气很好。"
    ids = model.tokenizer.encode(sample, add_special_tokens=False)
    return len(ids) / len(sample) <= 1.5


def model_languages(model) -> tuple[str, ...]:
    """The languages `model` reads: ("en", "zh") for a bilingual model, else ("en",)."""
    return ("en", "zh") if supports_chinese(model) else ("en",)


def check_language(model, text: str) -> str:
    """The language of `text`; raises LanguageError when it is Chinese and the model is not."""
    lang = language(text)
    if lang == "zh" and not supports_chinese(model):
        raise LanguageError(
            f"This looks like Chinese, but {model.name} is an English-only model. Use the bilingual "
            "model: `muse models install qwen2.5-0.5b`, then pass `--model qwen2.5-0.5b`.")
    return lang


# Bundled model → the family the apps' measured method tables stand for; a model loaded another way (a
# path, a fine-tune) by its architecture where that names one family (Qwen2 models share the tokenizer and
# chat format; "llama" covers too many unrelated models to stand for smollm2).
FAMILIES = {"smollm2-135m": "smollm2", "qwen2.5-0.5b": "qwen2.5"}
ARCH_FAMILIES = {"qwen2": "qwen2.5"}


def family(model) -> str | None:
    """The model family the method tables know `model` by (FAMILIES, else ARCH_FAMILIES), or None."""
    config = getattr(model, "config", None)
    return FAMILIES.get(model.info.get("name", "")) or ARCH_FAMILIES.get(getattr(config, "arch", None))


def writes_cjk(code: str) -> bool:
    """Whether a language (writer.LANGUAGES code) is written in CJK characters: zh, zh-tw, ja, ko."""
    return code.split("-")[0] in ("zh", "ja", "ko")
