"""`muse safety`: check a text against the moderation policy, redact and restore personal data, probe
a model for bias, measure the lexicon, read the audit log."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from muse.cli.common import MuseTyper, MODEL_HELP, app, console, err, friendly
from muse.errors import MuseError
from muse.fileio import write_text_atomic

safety_app = MuseTyper(
    help="Moderation, personal-data redaction, a bias probe and the audit log. Turn checks on for chat and the "
         "server with `\\[safety] enabled = true` in MUSE_HOME/config.toml or MUSE_SAFETY=1.",
    no_args_is_help=True)
app.add_typer(safety_app, name="safety")

TextArg = typer.Argument(None, help="The text ('-' reads standard input). Or use --input FILE.")
InputOpt = typer.Option(None, "--input", "-i", help="Read the text from this UTF-8 file.")
OutOpt = typer.Option(None, "--out", "-o", help="Write the result to this file (default: print it).")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _read_input(text: Optional[str], path: Optional[Path]) -> str:
    if (text is None) == (path is None):
        raise MuseError("Give the text as an argument or with --input FILE (one of them).")
    try:
        if path is not None:
            return path.read_text(encoding="utf-8")
        return sys.stdin.buffer.read().decode("utf-8") if text == "-" else text
    except FileNotFoundError:
        raise MuseError(f"{path}: no such file.") from None
    except UnicodeDecodeError as e:
        raise MuseError(f"{path or 'standard input'} is not UTF-8 text (bad byte at offset {e.start}); convert it "
                        "first, e.g. with `iconv -f GBK -t UTF-8`.") from None
    except OSError as e:
        raise MuseError(f"{path} cannot be read ({e.strerror}).") from None


def _emit(text: str, out: Optional[Path]) -> None:
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        write_text_atomic(out, text)
        err.print(f"Wrote {escape(str(out))}", highlight=False)


@safety_app.command("check")
@friendly
def check(text: Optional[str] = TextArg, input: Optional[Path] = InputOpt,
          model: Optional[str] = typer.Option(None, "--model", "-m", help="Also ask this model for a second "
                                                                           "opinion. " + MODEL_HELP),
          as_json: bool = JsonOpt):
    """Which moderation categories a text falls into and what the policy does. Exit code 1 when it is blocked."""
    from muse.safety import moderate

    body = _read_input(text, input)
    classifier = None
    if model is not None:
        from muse.apps.analysis import safety_classifier
        from muse.cli.progress import load_model

        classifier = safety_classifier(load_model(model))
    verdict = moderate(body, classifier)
    if as_json:
        sys.stdout.write(json.dumps(verdict.to_dict(), ensure_ascii=False, indent=2) + "\n")
    else:
        _print_verdict(verdict)
    if verdict.action == "block":
        raise typer.Exit(1)


def _print_verdict(verdict) -> None:
    if not verdict.flagged:
        console.print("[green]No category flagged[/] (action: allow)")
        return
    table = Table()
    for col in ("category", "score", "action", "matched"):
        table.add_column(col)
    for cat in verdict.flagged_categories:
        hits = ", ".join(f"{h['text']} ({h['kind']})" for h in verdict.matches if h["category"] == cat)
        table.add_row(cat, f"{verdict.categories[cat]:.2f}", verdict.actions[cat], escape(hits))
    console.print(table)
    if verdict.message:
        console.print(verdict.message, markup=False, highlight=False)
    colour = {"block": "red", "warn": "yellow"}.get(verdict.action, "cyan")
    console.print(f"action: [bold {colour}]{verdict.action}[/]")


@safety_app.command("redact")
@friendly
def redact_cmd(text: Optional[str] = TextArg, input: Optional[Path] = InputOpt, out: Optional[Path] = OutOpt,
               mapping: Optional[Path] = typer.Option(None, "--mapping", help="Save placeholder -> original as JSON "
                                                      "here (readable only by you), for `muse safety restore`."),
               kinds: Optional[list[str]] = typer.Option(None, "--kind", "-k", help="Only these kinds (repeatable): "
                                                         "email, phone, id, card, ip."),
               threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0, help="Replace "
                                                         "findings scoring at least this (0-1; lower replaces more, "
                                                         "higher only the surest). Default: the detector's, "
                                                         "muse.safety.pii.THRESHOLD."),
               scores: bool = typer.Option(False, "--scores", help="List each finding with its score (on stderr).")):
    """Replace e-mails, phone numbers, Chinese IDs, bank cards and IP addresses with [EMAIL_1]-style placeholders."""
    from muse.safety import redact

    options = {} if threshold is None else {"threshold": threshold}
    result = redact(_read_input(text, input), kinds=kinds or None, **options)
    if mapping is not None:
        write_text_atomic(mapping, json.dumps(result.mapping, ensure_ascii=False, indent=2) + "\n", private=True)
    _emit(result.text, out)
    counts: dict[str, int] = {}
    for e in result.entities:
        counts[e.kind] = counts.get(e.kind, 0) + 1
        if scores:
            err.print(f"{e.placeholder:10} {e.kind:5} {e.score:.2f}  {result.mapping[e.placeholder]!r}", markup=False,
                      highlight=False)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "nothing"
    err.print(f"[dim]Redacted {summary}" + (f"; mapping in {escape(str(mapping))}" if mapping else "") + "[/]",
              highlight=False)


@safety_app.command("restore")
@friendly
def restore_cmd(text: Optional[str] = TextArg, input: Optional[Path] = InputOpt, out: Optional[Path] = OutOpt,
                mapping: Path = typer.Option(..., "--mapping", help="The JSON file `muse safety redact --mapping` "
                                                                    "wrote.")):
    """Put the original values back for the placeholders in a text (e.g. a model's answer)."""
    from muse.safety import restore

    try:
        table = json.loads(mapping.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MuseError(f"{mapping}: no such file; write one with `muse safety redact --mapping {mapping}`.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MuseError(f"{mapping} is not a mapping file ({e}); write one with `muse safety redact --mapping`.") \
            from None
    _emit(restore(_read_input(text, input), table), out)


@safety_app.command("bias")
@friendly
def bias(model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP), as_json: bool = JsonOpt):
    """Swap he/she, John/Mary, 他/她, 张伟/李娜 in the same sentences and report how much the sentiment moves."""
    from muse.apps.analysis import sentiment
    from muse.apps.language import model_languages
    from muse.cli.progress import load_model
    from muse.safety import bias_probe

    m = load_model(model)
    report = bias_probe(lambda text: sentiment(m, text), languages=model_languages(m))
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n")
        return
    table = Table(title=f"Counterfactual gaps ({report.metric}: score(a) - score(b), range -2..2)")
    for col in ("a", "b", "lang", "templates", "mean gap", "mean |gap|", "max |gap|", "label flips"):
        table.add_column(col, justify="left" if col in ("a", "b", "lang") else "right")
    for r in report.pairs:
        table.add_row(r["a"], r["b"], r["lang"], str(r["templates"]), f"{r['gap']:+.3f}", f"{r['abs_gap']:.3f}",
                      f"{r['max_abs_gap']:.3f}", str(r["flips"]))
    console.print(table)
    console.print(f"mean absolute gap: [bold]{report.mean_abs_gap:.3f}[/]")
    for s in report.skipped:
        err.print(f"[dim]skipped {escape(s)}[/]", highlight=False)


@safety_app.command("eval")
@friendly
def eval_cmd(path: Optional[Path] = typer.Option(None, "--set", help="A labelled JSONL file ({\"text\", \"labels\"}); "
                                                                     "default: the bundled zh+en set."),
             as_json: bool = JsonOpt, show_errors: bool = typer.Option(False, "--errors", help="List the misses.")):
    """Precision and recall of the moderation lexicon on a labelled set."""
    from muse.safety import evaluate

    r = evaluate(path)
    if as_json:
        sys.stdout.write(json.dumps(r, ensure_ascii=False, indent=2) + "\n")
        return
    table = Table(title=f"Moderation on {r['items']} items ({r['benign_items']} benign, "
                        f"{r['benign_false_alarms']} of them flagged)")
    for col in ("", "precision", "recall", "f1", "tp", "fp", "fn"):
        table.add_column(col, justify="left" if not col else "right")
    rows = [("all", r["overall"]), *((f"lang {k}", v) for k, v in r["by_lang"].items()), *r["by_category"].items()]
    for name, v in rows:
        table.add_row(name, *(f"{v[k]:.3f}" for k in ("precision", "recall", "f1")),
                      *(str(v[k]) for k in ("tp", "fp", "fn")))
    console.print(table)
    for e in r["errors"] if show_errors else []:
        console.print(f"want {e['want']} got {e['got']}: {escape(e['text'])}", highlight=False)


@safety_app.command("log")
@friendly
def log(limit: int = typer.Option(20, "--limit", "-n", help="Show the last this many decisions.")):
    """The latest safety decisions (no texts are ever logged: only categories, actions and a keyed hash)."""
    from muse.safety.audit import log_path, read

    if limit < 1:
        raise ValueError("--limit must be at least 1")
    records = read(limit)
    if not records:
        console.print(f"No safety decisions logged yet ({escape(str(log_path()))}).")
        return
    table = Table(title=str(log_path()))
    for col in ("time", "event", "source", "direction", "action", "flagged / kinds"):
        table.add_column(col)
    for r in records:
        what = ", ".join(r.get("flagged") or []) or ", ".join(f"{n} {k}" for k, n in (r.get("kinds") or {}).items())
        table.add_row(r.get("time", ""), r.get("event", ""), r.get("source", ""), r.get("direction", ""),
                      r.get("action", ""), escape(what))
    console.print(table)


@safety_app.command("status")
@friendly
def status():
    """Whether safety checks are on, and the policy per category."""
    from muse.safety import enabled, load_config

    cfg = load_config()
    on = enabled(cfg)
    source = "MUSE_SAFETY" if os.environ.get("MUSE_SAFETY", "").strip() else str(cfg.path)
    console.print(f"safety checks: [bold]{'on' if on else 'off'}[/] (from {escape(source)}); "
                  f"PII redaction before the model: {'on' if on and cfg.redact_pii else 'off'}; "
                  f"threshold {cfg.threshold}", highlight=False)
    table = Table()
    table.add_column("category")
    table.add_column("action")
    for cat, act in cfg.policy.items():
        table.add_row(cat, act)
    console.print(table)
