"""One home for every default: a command given no sampling option samples with its app's defaults
(`muse.apps.*`), options given go over them, and `muse write` samples as /api/write does."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import muse
from muse.api import Model
from muse.apps import creative, writer
from muse.cli import app
from muse.sampling import SamplingParams
from tests.helpers import RecordingLM


@pytest.fixture(scope="module")
def tok(default_gguf):
    import gguf

    from muse.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf.GGUFReader(str(default_gguf)))


def scripted(tok, reply: str, block_size: int) -> Model:
    ids = tok.encode(reply, add_special_tokens=False) + [min(tok.eos_ids)]
    return Model(RecordingLM(ids, tok.vocab_size, block_size=block_size), tok, {"name": "scripted"})


@pytest.fixture
def written(tok, monkeypatch):
    """Runs `muse write ARGS` on a scripted model (`block_size` tokens of context); returns the
    params the CLI handed to `writer.stream_write`."""

    def run(*args: str, block_size: int = 4096) -> SamplingParams:
        model = scripted(tok, "The cat sat on the mat.", block_size)
        monkeypatch.setattr(muse, "load", lambda *a, **k: model)
        seen = []
        real = writer.stream_write

        def spy(m, action, text, **options):
            seen.append(options["params"])
            return real(m, action, text, **options)

        monkeypatch.setattr(writer, "stream_write", spy)
        r = CliRunner().invoke(app, ["write", *args])
        assert r.exit_code == 0, r.output
        assert len(seen) == 1
        return seen[0]
    return run


def test_write_without_options_samples_with_the_writers_defaults(written):
    assert written("rewrite", "the cat sat on teh mat") == writer.DEFAULT_PARAMS
    # a small context caps max_new_tokens, as the writer does on its own (writer.default_params)
    small = written("rewrite", "the cat sat on teh mat", block_size=512)
    assert small == writer.DEFAULT_PARAMS.replace(max_new_tokens=128)


@pytest.mark.parametrize("cli, api", [
    ([], {}),
    (["-t", "0.7"], {"temperature": 0.7}),
    (["--temperature", "0.5", "--top-p", "0.8", "--top-k", "5", "-n", "100", "--seed", "3",
      "--repetition-penalty", "1.3"],
     {"temperature": 0.5, "top_p": 0.8, "top_k": 5, "max_tokens": 100, "seed": 3, "repetition_penalty": 1.3}),
])
def test_write_samples_as_the_api_does_for_the_same_options(written, cli, api):
    from muse.server.apps import WriteBody

    body = WriteBody(action="rewrite", text="the cat sat on teh mat", **api)
    assert written("rewrite", "the cat sat on teh mat", *cli) == body.params(writer.DEFAULT_PARAMS)


def test_write_help_shows_the_writers_defaults():
    r = CliRunner().invoke(app, ["write", "rewrite", "--help"], env={"COLUMNS": "200"})
    said = " ".join(r.output.split())
    assert f"0 = greedy; higher = more varied. Default: {writer.DEFAULT_PARAMS.temperature}." in said
    assert f"> 1 discourages repeating tokens. Default: {writer.DEFAULT_PARAMS.repetition_penalty}." in said


@pytest.fixture
def created(monkeypatch):
    """Runs `muse create ARGS` with the creative app replaced by a spy; returns the params it got."""
    monkeypatch.setattr(muse, "load", lambda *a, **k: object())
    seen = []

    def spy(model, kind, topic, form=None, params=None, attempts=4, guided=True):
        seen.append(params)
        return creative.Creation("A poem.", "free", True)

    monkeypatch.setattr(creative, "create", spy)

    def run(*args: str) -> SamplingParams:
        r = CliRunner().invoke(app, ["create", *args])
        assert r.exit_code == 0, r.output
        return seen[-1]
    return run


def test_create_samples_with_the_creative_defaults_and_keeps_them_under_given_options(created):
    assert created("poem", "rain") == creative.default_params("poem")
    assert created("story", "rain") == creative.default_params("story")
    # an option given replaces only itself: the presence penalty and the kind's length stay
    assert created("slogan", "rain", "-t", "0.3") == creative.default_params("slogan").replace(temperature=0.3)


def test_create_help_says_the_app_chooses():
    r = CliRunner().invoke(app, ["create", "--help"], env={"COLUMNS": "200"})
    said = " ".join(r.output.split())
    assert "0 = greedy; higher = more varied. Default: the app's." in said
    assert "Default: 0.8" not in said  # the old restated default


def test_generate_samples_with_the_models_recommended_settings_under_given_options(tok, monkeypatch):
    model = scripted(tok, "Hello.", 512)
    model.info["sampling"] = {"temperature": 0.7, "top_k": 20}  # as a checkpoint may recommend
    monkeypatch.setattr(muse, "load", lambda *a, **k: model)
    seen = []
    real = Model.stream

    def spy(self, prompt, params=None, **kwargs):
        seen.append(params)
        return real(self, prompt, params, **kwargs)

    monkeypatch.setattr(Model, "stream", spy)
    assert CliRunner().invoke(app, ["generate", "Once"]).exit_code == 0
    assert seen[-1] == SamplingParams(temperature=0.7, top_k=20)
    assert CliRunner().invoke(app, ["generate", "Once", "-t", "0", "--stop", "x"]).exit_code == 0
    assert seen[-1] == SamplingParams(temperature=0.0, top_k=20, stop=["x"])
    model.info["sampling"] = {}  # a checkpoint that recommends nothing: SamplingParams' own defaults
    assert CliRunner().invoke(app, ["generate", "Once"]).exit_code == 0
    assert seen[-1] == SamplingParams()
    r = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert f"Default: the model's recommended (`muse info` shows it), else {SamplingParams().temperature}." in r.output


def test_a_bad_option_is_one_clear_line_before_the_model_loads(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model must not load for a bad option")

    monkeypatch.setattr(muse, "load", no_load)
    r = CliRunner().invoke(app, ["create", "poem", "rain", "--temperature", "9"])
    assert r.exit_code == 2 and "temperature must be" in r.output and "Traceback" not in r.output
