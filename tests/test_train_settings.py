"""Training settings as users give them: what `muse train` / `muse finetune` (and the Python API) pass
to the loop. Settings derived from others (min_lr from learning_rate, lr_decay_iters from max_iters,
save_interval from eval_interval) follow the final values, and an unknown name is a clear error."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import muse
from muse.cli import app
from muse.training import TrainConfig, lr_at
from muse.training import loop
from muse.training.finetune import default_config
from tests.helpers import shakespeare_text

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def configs(monkeypatch) -> list[TrainConfig]:
    """The TrainConfig of each train() call; nothing trains (these tests check settings, not steps)."""
    seen = []

    def record(model, data, cfg, out_dir, **kwargs):
        seen.append(cfg)
        return SimpleNamespace(iter=0, best_val_loss=math.inf, best=None, metrics_file=out_dir)

    monkeypatch.setattr(loop, "train", record)
    return seen


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, model_cache):
    """A small random Llama with the default model's tokenizer and chat template, and 6 chats for it."""
    from muse.config import ModelConfig
    from muse.model import Transformer

    root = tmp_path_factory.mktemp("chat_model")
    tokenizer = muse.load().tokenizer
    config = ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
    model = muse.save_checkpoint(root / "tiny", Transformer(config).init_weights(seed=0), tokenizer)
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                      {"role": "assistant", "content": "Yes."}]}) + "\n"
                             for i in range(6)), encoding="utf-8")
    return model, chats


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A prepared character-level corpus for `muse train`."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "c.txt").write_text(shakespeare_text(20_000), encoding="utf-8")
    assert run("data", "prepare", root / "c.txt", "--char-level", "--out", root / "d").exit_code == 0
    return root / "d"


def finetune(chat_model, tmp_path, *args):
    model, chats = chat_model
    return run("finetune", model, "--data", chats, "--out", tmp_path / "run", *args)


def train(corpus, tmp_path, *args):
    return run("train", "--data", corpus, "--out", tmp_path / "run", "--preset", "tiny", "--no-progress", *args)


# ----------------------------------------------------------------------------- derived settings

def test_finetune_lr_alone_moves_min_lr_with_it(chat_model, tmp_path, configs):
    """`muse finetune --lr 5e-5` failed: "min_lr must be in [0, learning_rate=5e-05], got 0.0001"."""
    r = finetune(chat_model, tmp_path, "--lr", "5e-5")
    assert r.exit_code == 0, r.output
    (cfg,) = configs
    assert lr_at(cfg.max_iters, cfg) == pytest.approx(5e-6)  # the decay ends at learning_rate / 10


def test_finetune_max_iters_alone_stretches_the_decay(chat_model, tmp_path, configs):
    """`muse finetune --max-iters 1000` ended its cosine decay at step 100 (the default max_iters)."""
    r = finetune(chat_model, tmp_path, "--max-iters", "1000", "--method", "full")
    assert r.exit_code == 0, r.output
    (cfg,) = configs
    assert lr_at(100, cfg) > lr_at(500, cfg) > lr_at(900, cfg) > lr_at(1000, cfg) == pytest.approx(5e-6)


def test_train_max_iters_and_lr_alone_move_the_schedule(corpus, tmp_path, configs):
    r = train(corpus, tmp_path, "--max-iters", "1000", "--lr", "5e-5", "--set", "block_size=32")
    assert r.exit_code == 0, r.output
    (cfg,) = configs
    assert lr_at(500, cfg) > lr_at(900, cfg) > lr_at(1000, cfg) == pytest.approx(5e-6)


def test_derived_settings_follow_changes_made_after_creation():
    cfg = TrainConfig(max_iters=100, eval_interval=10)
    later = dataclasses.replace(cfg, learning_rate=5e-5, max_iters=1000, eval_interval=50)
    assert (later.min_lr, later.lr_decay_iters, later.save_interval) == (None, None, None)  # still "derive"
    resolved = later.resolved()
    assert (resolved.min_lr, resolved.lr_decay_iters, resolved.save_interval) == (pytest.approx(5e-6), 1000, 50)
    assert resolved.resolved() is resolved
    given = TrainConfig(min_lr=0.0, lr_decay_iters=7, save_interval=0).resolved()  # given values stay, 0 too
    assert (given.min_lr, given.lr_decay_iters, given.save_interval) == (0.0, 7, 0)
    with pytest.raises(ValueError, match=r"min_lr must be in \[0, learning_rate=5e-05\], got 0.0001"):
        dataclasses.replace(cfg, min_lr=1e-4, learning_rate=5e-5)  # a min_lr the user set is still checked


def test_finetune_api_and_cli_derive_the_same_config(chat_model, tmp_path, configs):
    """One place derives fine-tuning settings: the CLI passes what the user gave, nothing more."""
    model, chats = chat_model
    assert finetune(chat_model, tmp_path / "cli", "--lr", "5e-5", "--method", "full").exit_code == 0
    muse.training.finetune.finetune(model, chats, tmp_path / "api", method="full",
                                    settings={"learning_rate": 5e-5})
    cli, api = configs
    assert cli == api and cli.eval_iters == 2  # 6 validation chats, 4 a batch: 2 batches cover them
    assert default_config("full", learning_rate=5e-5).resolved().min_lr == pytest.approx(5e-6)
    with pytest.raises(ValueError, match="cfg or settings"):
        muse.training.finetune.finetune(model, chats, tmp_path / "both", cfg=default_config("lora"),
                                        settings={"max_iters": 3})


# ----------------------------------------------------------------------------- unknown names

def test_a_misspelt_finetune_setting_is_a_clear_error(chat_model, tmp_path, configs):
    r = finetune(chat_model, tmp_path, "--set", "max_iter=3")
    assert r.exit_code == 2 and not configs
    assert "max_iter (did you mean max_iters?)" in r.output and "weight_decay" in r.output  # the known names
    assert "Traceback" not in r.output
    r = finetune(chat_model, tmp_path, "--set", "weight_decay=0.01", "--set", "grad_clip=0.5")
    assert r.exit_code == 0, r.output
    assert (configs[-1].weight_decay, configs[-1].grad_clip) == (0.01, 0.5)
    r = finetune(chat_model, tmp_path, "--lr", "1e-4", "--set", "learning_rate=2e-4")
    assert r.exit_code == 2 and "learning_rate is given twice" in r.output


def test_a_misspelt_train_setting_is_a_clear_error(corpus, tmp_path, configs):
    """`muse train --set n_layr=1` ended in a TypeError traceback."""
    for key, hint in (("n_layr", "n_layer"), ("max_iter", "max_iters")):
        r = train(corpus, tmp_path, "--set", f"{key}=1")
        assert r.exit_code == 2 and f"{key} (did you mean {hint}?)" in r.output, r.output
        assert "model:" in r.output and "training:" in r.output and "n_embd" in r.output and "beta1" in r.output
    # --set takes model fields and training settings alike
    r = train(corpus, tmp_path, "--set", "block_size=32", "--set", "beta1=0.8", "--max-iters", "3")
    assert r.exit_code == 0, r.output
    assert configs[-1].beta1 == 0.8 and configs[-1].max_iters == 3


def test_unknown_settings_in_the_python_api_name_themselves():
    with pytest.raises(ValueError, match=r"max_iter \(did you mean max_iters\?\).*weight_decay"):
        default_config("lora", max_iter=10)
    with pytest.raises(ValueError, match=r"max_iter \(did you mean max_iters\?\)"):
        TrainConfig.for_preset("tiny", max_iter=10)
    with pytest.raises(ValueError, match=r"unknown model setting: n_layr \(did you mean n_layer\?\).*n_embd"):
        loop.pretrain("nowhere", "out", "tiny", {"n_layr": 1})


def test_finetune_help_states_the_real_default_learning_rates():
    from muse.training.finetune import default_settings

    import re

    text = " ".join(run("finetune", "--help").output.replace("│", " ").split())
    lora, full = re.search(r"Default (\S+) for lora, (\S+) for full", text).groups()
    assert (float(lora), float(full)) == (default_settings("lora")["learning_rate"],
                                          default_settings("full")["learning_rate"])
