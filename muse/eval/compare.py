"""Several models (or one model at several precisions) side by side on the same evaluations.

    report = evaluate(["smollm2-135m", "qwen2.5-0.5b"], suites=["all"], split="dev", limit=10)
    report.rows     # one Row per metric and method: a value per model; the first model is the baseline
    report.versus   # per suite and metric: the app's value and the raw prompt's, per model
    report.details  # everything behind the rows: per-suite examples, perplexity results, KL

Every suite runs the app and raw prompting of the same model (see muse.eval.suites); `versus` puts
the two side by side for each model, so a report can say where the app is below raw. A model that
reads English only skips the Chinese suites, with a note saying so.

A model is written NAME[@PRECISION]: a bundled name, a .gguf file or a model directory, optionally
followed by @auto, @fp32, @bf16, @int8 or @int4 (what `muse.load(name, precision)` takes).

With perplexity sources and two or more models, each later model's next-token distributions are also
compared with the baseline's on the same text: KL divergence (mean, p99) and how often the most
likely token is the same — when the two share a tokenizer.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from muse.errors import MuseError
from muse.eval.suites import (APP, BASE_NAMES, DEFAULT_SPLIT, METRIC_NAMES, RAW, SUITES, metric_base,
                              resolve_suites, run_suite)

from muse.checkpoints.weights import PRECISIONS


@dataclass(frozen=True)
class ModelSpec:
    name: str | None  # None: the default model
    precision: str = "auto"

    @property
    def label(self) -> str:
        import os

        from muse.checkpoints.registry import DEFAULT_MODEL

        name = self.name or os.environ.get("MUSE_MODEL") or DEFAULT_MODEL  # what muse.load(None) loads
        return name if self.precision == "auto" else f"{name}@{self.precision}"


def parse_spec(spec: "str | None") -> ModelSpec:
    """'NAME@PRECISION' → ModelSpec; a path that exists is taken whole, even with an '@' in it."""
    if spec is None or not str(spec).strip():
        return ModelSpec(None)
    spec = str(spec).strip()
    name, at, precision = spec.rpartition("@")
    if not at or Path(spec).expanduser().exists():
        return ModelSpec(spec)
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r} in model {spec!r}: write NAME@PRECISION with one of "
                         f"{', '.join(PRECISIONS)}")
    return ModelSpec(name or None, precision)


@dataclass
class Row:
    section: str  # "kbqa-en", "perplexity: book.txt", "KL vs baseline: book.txt"
    metric: str  # a key: "accuracy", "perplexity", "kl_mean", …
    label: str  # what the table shows
    values: list  # one per model (None: not measured for that model)
    higher_is_better: bool | None  # None: neither (token counts)


@dataclass
class Best:
    """Which method scored best on one suite, per model (suites that compare methods: the label
    suites' likelihood / constrained / raw prompt, summarize's muse / raw prompt)."""

    section: str  # the suite
    metric: str  # its headline metric's label, e.g. "accuracy"
    scores: list  # per model: {method: value} (empty: not run for that model)
    best: list  # per model: the best method(s), ties joined by " = " ("" when not run)


@dataclass
class Versus:
    """One metric of one suite: the app's value and the raw prompt's, per model (None: not run)."""

    section: str  # the suite
    metric: str  # the metric key without a method suffix, e.g. "chrf"
    label: str  # what the table shows, e.g. "chrF"
    app: list
    raw: list

    def below(self, i: int) -> bool:
        """Whether model i's app scored below its raw prompt (by more than rounding)."""
        a, r = self.app[i], self.raw[i]
        return a is not None and r is not None and r - a >= 5e-5


@dataclass
class EvalReport:
    models: list[str]
    rows: list[Row] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # model label -> {"info", "suites", "perplexity", "kl"}
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    best: list[Best] = field(default_factory=list)
    versus: list[Versus] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(models, suites=(), perplexity=(), limit: int | None = None, window: int | None = None,
             stride: int | None = None, kl: bool = True, params=None,
             loader: Callable | None = None, on_event: Callable[[str], None] | None = None,
             split: str = DEFAULT_SPLIT) -> EvalReport:
    """Run the suites and perplexity sources on every model; the first model is the baseline.

    models: specs ('NAME[@PRECISION]', None for the default). suites: names or task names (see
    muse.eval.suites), run on the held-out `split` ("dev" or "test"), `limit` items each (None: all).
    perplexity: files, folders or prepared data directories, one row group each.
    loader(name, precision) loads a model (default `muse.load`). on_event(message) reports progress.
    """
    specs = [parse_spec(m) for m in (models or [None])]
    labels = _unique_labels(specs)
    names = resolve_suites(suites) if suites else []
    sources = [str(s) for s in perplexity]
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 item per suite, got {limit}")
    if split not in ("dev", "test"):
        raise ValueError(f"Unknown split {split!r}: choose dev (for tuning) or test (for reporting).")
    if not names and not sources:
        raise MuseError("Nothing to evaluate: pass --suite NAME (one of "
                        f"{', '.join(['all', *SUITES])}) and/or --perplexity FILE.")
    for s in sources:
        if not Path(s).expanduser().exists() and not any(c in s for c in "*?["):
            raise MuseError(f"Perplexity source {s!r} does not exist: pass a text file, folder or prepared data directory.")
    if loader is None:
        from muse.api import load as loader
    say = on_event or (lambda message: None)
    report = EvalReport(labels, config={"models": labels, "suites": names, "perplexity": sources, "limit": limit,
                                        "split": split, "window": window, "stride": stride, "kl": kl})
    base = None
    for i, (spec, label) in enumerate(zip(specs, labels)):
        say(f"loading {label}")
        model = loader(spec.name, spec.precision)
        report.details[label] = _one_model(model, label, names, sources, limit, window, stride, params, say, split)
        if i == 0:
            base = model
        elif kl and sources:
            report.details[label]["kl"] = _kl_all(base, model, labels[0], label, sources, window, stride, report, say)
        if i:
            del model
            gc.collect()  # free one compared model before loading the next
    _build_rows(report, names, sources)
    return report


def _unique_labels(specs: list[ModelSpec]) -> list[str]:
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"The same model is listed twice ({', '.join(labels)}); give each --model once.")
    return labels


def _one_model(model, label, names, sources, limit, window, stride, params, say, split) -> dict:
    from muse.eval.perplexity import corpus_perplexity

    out = {"info": _info(model), "suites": {}, "perplexity": {}, "kl": {}}
    for source in sources:
        say(f"{label}: perplexity on {source}")
        out["perplexity"][source] = corpus_perplexity(
            model, [source], window, stride,
            on_progress=lambda done, total: say(f"{label}: perplexity on {source}, {done:,}/{total:,} tokens")).to_dict()
    for name in names:
        say(f"{label}: suite {name}")
        out["suites"][name] = run_suite(model, name, limit, params, split=split,
                                        on_item=lambda done, total: say(f"{label}: {name} {done}/{total}")).to_dict()
    return out


def _info(model) -> dict:
    try:
        d = model.describe()
        return {k: d[k] for k in ("name", "format", "parameters", "precision", "quantization", "context")}
    except (AttributeError, KeyError, TypeError):  # a stand-in model in tests
        return {"name": getattr(model, "name", "model")}


def _kl_all(base, model, base_label, label, sources, window, stride, report, say) -> dict:
    from muse.eval.divergence import corpus_kl_divergence

    out = {}
    for source in sources:
        say(f"{label}: KL divergence from {base_label} on {source}")
        try:
            out[source] = corpus_kl_divergence(base, model, [source], window, stride).to_dict()
        except MuseError as e:
            report.notes.append(f"KL of {label} from {base_label} not measured: {e}")
            return {}
    return out


# -- rows --------------------------------------------------------------------------------------


def _build_rows(report: EvalReport, names: list[str], sources: list[str]) -> None:
    details = [report.details[m] for m in report.models]
    for source in sources:
        section = f"perplexity: {Path(source).name or source}"
        ppl = [d["perplexity"].get(source) for d in details]
        for key, label, better in (("perplexity", "perplexity", False), ("bits_per_byte", "bits per byte", False),
                                   ("tokens", "tokens scored", None)):
            report.rows.append(Row(section, key, label, [p[key] if p else None for p in ppl], better))
        kls = [d["kl"].get(source) for d in details]
        if any(kls):
            section = f"KL vs {report.models[0]}: {Path(source).name or source}"
            for key, label, better in (("mean", "KL mean (nats)", False), ("p99", "KL p99 (nats)", False),
                                       ("same_top1", "same top-1 %", True)):
                report.rows.append(Row(section, f"kl_{key}", label, [k[key] if k else None for k in kls], better))
    for name in names:
        results = [d["suites"][name] for d in details]
        keys = list(dict.fromkeys(k for r in results for k in r["metrics"]))
        for key in keys:
            report.rows.append(Row(name, key, METRIC_NAMES.get(key, key),
                                   [r["metrics"].get(key) for r in results], True))
        for model, r in zip(report.models, results):
            if r["skipped"]:
                report.notes.append(f"{name} skipped for {model}: {r['skipped']}")
            if r["errors"]:
                first = next((e["error"] for e in r["examples"] if "error" in e), "")
                report.notes.append(f"{name} on {model}: {r['errors']} of {r['n']} items failed "
                                    f"(scored as wrong), e.g. {first}")
        signatures = {n for r in results for n in r["notes"]}
        report.notes += [f"{name}: {n}" for n in sorted(signatures)]
        best = best_method(name, results)
        if best is not None:
            report.best.append(best)
        report.versus += versus(name, results)


def versus(name: str, results: list[dict]) -> list[Versus]:
    """The app against the raw prompt on every metric of suite `name` that both have, per model."""
    keys = dict.fromkeys(k for r in results for k in r["metrics"])
    bases = [k for k in keys if metric_base(k)[1] == APP and k + RAW in keys]
    return [Versus(name, k, BASE_NAMES.get(k, k), [r["metrics"].get(k + APP) for r in results],
                   [r["metrics"].get(k + RAW) for r in results]) for k in bases]


def best_method(name: str, results: list[dict]) -> "Best | None":
    """The best of the methods a suite compares, per model, by its headline metric; None when the
    suite compares none."""
    primary = next((r["primary"] for r in results if len(r.get("methods") or {}) > 1), None)
    if primary is None:
        return None
    scores, best = [], []
    for r in results:
        values = {m: r["metrics"][primary + suffix] for m, suffix in r.get("methods", {}).items()
                  if r["metrics"].get(primary + suffix) is not None}
        top = max(values.values(), default=None)
        scores.append(values)
        best.append(" = ".join(m for m, v in values.items() if v == top) if values else "")
    label = METRIC_NAMES.get(primary, primary).split(" (")[0]
    return Best(name, label, scores, best)
