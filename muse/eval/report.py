"""Evaluation reports: a Markdown table, the full JSON, a PNG bar chart, and a row in the database.

    out_dir, run_id = save(report)        # MUSE_HOME/runs/eval-<timestamp>/report.{md,json,png}
    print(markdown(report))

The table has one column per model; every model after the first also gets a Δ column, its difference
from the baseline (the first model): signed, relative, and "better" or "worse" where the metric has a
direction ("+0.14 (+1.2%) worse" for a perplexity). No ✓/✗: a difference is measured, not a pass/fail.
The "app vs raw prompt" table puts each app next to raw prompting of the same model, per model, and
says "**app below raw**" where the app scored lower.
The JSON holds everything, including each suite's examples (inputs, outputs, references), so a number
can be traced to its items. The directory is written atomically: it is complete or absent. The `runs`
table gets a row of kind "eval" with the configuration, the rows and the output directory.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

from muse.errors import MuseError
from muse.eval.compare import EvalReport, Row, Versus

# Fonts that can draw Chinese, tried in order (a model or suite name may be Chinese).
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "AR PL UMing CN",
             "Droid Sans Fallback")


# -- Markdown ----------------------------------------------------------------------------------


def fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.1f}" if abs(x) >= 1000 else f"{x:.4f}" if 0 < abs(x) < 1 else f"{x:.2f}"  # KL values are small


def delta(row: Row, i: int) -> str:
    """Model i's difference from the baseline: signed, relative to it, and whether that is better or
    worse where the metric has a direction. A measured difference is no pass/fail (no threshold is
    declared), so it is told in words, never marked ✓/✗."""
    base, x = row.values[0], row.values[i]
    if base is None or x is None:
        return "—"
    d = x - base
    if abs(d) < 5e-5:  # rounds to zero at the 4 decimals shown
        return "±0"
    sign = "+" if d > 0 else "−"
    text = f"{sign}{fmt(abs(d))}"
    if base != 0:
        text += f" ({sign}{abs(d) / abs(base):.1%})"
    if row.higher_is_better is not None:
        text += " better" if (d > 0) == row.higher_is_better else " worse"
    return text


def aliases(report: EvalReport) -> list[str]:
    """Short column names for a narrow terminal: A (the baseline), B, C, …"""
    return [chr(ord("A") + i) if i < 26 else f"M{i + 1}" for i in range(len(report.models))]


def legend(report: EvalReport) -> str:
    return " · ".join(f"{a} = {m}" + (" (baseline)" if i == 0 else "")
                      for i, (a, m) in enumerate(zip(aliases(report), report.models)))


def table(report: EvalReport, short: bool = False) -> str:
    """The results as a Markdown table; `short` names the model columns A, B, … (see `legend`)."""
    names = aliases(report) if short else report.models
    head = ["suite", "metric", names[0] if short else f"{names[0]} (baseline)"]
    for m in names[1:]:
        head += [m, f"Δ {m}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    previous = None
    for row in report.rows:
        cells = [row.section if row.section != previous else "", row.label, fmt(row.values[0])]
        previous = row.section
        for i in range(1, len(report.models)):
            cells += [fmt(row.values[i]), delta(row, i)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def best_table(report: EvalReport, short: bool = False) -> str:
    """Which method scored best per suite and model, with every method's score ("" when none compare)."""
    if not report.best:
        return ""
    names = aliases(report) if short else report.models
    lines = ["| suite | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for b in report.best:
        cells = [b.section, b.metric]
        for scores, best in zip(b.scores, b.best):
            others = ", ".join(f"{m} {fmt(v)}" for m, v in scores.items())
            cells.append(f"**{best}** ({others})" if scores else "—")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


BELOW = "**app below raw**"


def app_vs_raw(v: Versus, i: int) -> str:
    """Model i's app minus its raw prompt on one metric, marked where the app is below."""
    a, r = v.app[i], v.raw[i]
    if a is None or r is None:
        return "—"
    d = a - r
    if abs(d) < 5e-3:  # task scores are 0-100, shown to 2 decimals (`fmt`'s 4 are for small KL values)
        return "±0"
    return f"{'+' if d > 0 else '−'}{abs(d):.2f}" + (f" {BELOW}" if v.below(i) else "")


def versus_table(report: EvalReport, short: bool = False) -> str:
    """Each suite's metrics with the app and the raw prompt side by side, per model ("" when none)."""
    if not report.versus:
        return ""
    names = aliases(report) if short else report.models
    head = ["suite", "metric"]
    for m in names:
        head += [f"{m} app", f"{m} raw", f"{m} app − raw"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    previous = None
    for v in report.versus:
        cells = [v.section if v.section != previous else "", v.label]
        previous = v.section
        for i in range(len(report.models)):
            cells += [fmt(v.app[i]), fmt(v.raw[i]), app_vs_raw(v, i)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def below_raw(report: EvalReport) -> list[str]:
    """"suite metric (model)" wherever an app scored below its raw prompt."""
    return [f"{v.section} {v.label} ({m})" for v in report.versus for i, m in enumerate(report.models) if v.below(i)]


def markdown(report: EvalReport) -> str:
    parts = ["# Muse evaluation", "", f"Models: {', '.join(report.models)} (the first is the baseline). "
             "Task scores are 0-100, higher is better; perplexity, bits per byte and KL are lower-is-better.", ""]
    split = report.config.get("split")
    if report.versus:
        parts += ["## App vs raw prompt", "", f"Each app against raw prompting of the same model (chat template, "
                  f"greedy, a plain instruction) on the held-out {split or ''} items; "
                  f"{BELOW} marks where the app scored lower.", "", versus_table(report), ""]
        parts += ["## Every metric", ""]
    parts.append(table(report) if report.rows else "_No results: every suite was skipped._")
    if report.best:
        parts += ["", "## Best method", "", "The suites that compare methods, by their headline metric: "
                  "the best in bold, then every method's score.", "", best_table(report)]
    if report.notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    parts += ["", "## Models", "", "| model | " + " | ".join(report.models) + " |",
              "|---|" + "---|" * len(report.models)]
    keys = list(dict.fromkeys(k for m in report.models for k in report.details[m]["info"]))
    for k in keys:
        parts.append(f"| {k} | " + " | ".join(str(report.details[m]["info"].get(k, "—")) for m in report.models) + " |")
    return "\n".join(parts) + "\n"


# -- chart -------------------------------------------------------------------------------------


def chart_rows(report: EvalReport) -> tuple[list[Row], list[Row]]:
    """(each suite's headline score, bits per byte of each perplexity source)."""
    primary = {}
    for m in report.models:
        for name, r in report.details[m]["suites"].items():
            primary.setdefault(name, r["primary"] or None)
    scores = [r for r in report.rows if primary.get(r.section) == r.metric and any(v is not None for v in r.values)]
    bpb = [r for r in report.rows if r.metric == "bits_per_byte" and any(v is not None for v in r.values)]
    return scores, bpb


def cjk_font() -> str | None:
    """A font family that draws Chinese, or None. Fonts installed after matplotlib built its font cache
    are not in it, so system font files with CJK-looking names are registered first."""
    from matplotlib import font_manager

    def known():
        names = {f.name for f in font_manager.fontManager.ttflist}
        return next((f for f in CJK_FONTS if f in names), None)

    if known() is None:
        for path in font_manager.findSystemFonts():
            if any(h in Path(path).name.lower() for h in ("cjk", "wqy", "simhei", "msyh", "sourcehansans",
                                                          "droidsansfallback", "pingfang")):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue  # an unreadable font file: try the next
    return known()


def chart(report: EvalReport, path: Path) -> bool:
    """A grouped bar chart (one bar per model) of the headline scores and bits per byte; False if none."""
    scores, bpb = chart_rows(report)
    panels = [(rows, title) for rows, title in ((scores, "task scores (0-100, higher is better)"),
                                                 (bpb, "bits per byte (lower is better)")) if rows]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = cjk_font()
    with plt.rc_context({"font.family": ["DejaVu Sans"] + ([font] if font else [])}):
        groups = sum(len(r) for r, _ in panels)
        fig, axes = plt.subplots(1, len(panels), figsize=(min(16, 3 + groups * (0.5 + 0.45 * len(report.models))), 4.5),
                                 squeeze=False, gridspec_kw={"width_ratios": [len(r) for r, _ in panels]})
        width = 0.8 / len(report.models)
        for ax, (rows, title) in zip(axes[0], panels):
            for i, m in enumerate(report.models):
                xs = [j + (i - (len(report.models) - 1) / 2) * width for j in range(len(rows))]
                bars = ax.bar(xs, [r.values[i] if r.values[i] is not None else 0 for r in rows], width,
                              label=m, color=f"C{i}")
                ax.bar_label(bars, labels=[fmt(r.values[i]) for r in rows], fontsize=7, padding=2)
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels([f"{r.section}\n{r.label}" if r.metric != "bits_per_byte"
                                else r.section.split(": ", 1)[-1] for r in rows], rotation=20, ha="right", fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.margins(y=0.12)
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=len(report.models), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return True


# -- saving ------------------------------------------------------------------------------------


def default_out_dir() -> Path:
    from muse.paths import muse_home

    base = muse_home() / "runs" / f"eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def write(report: EvalReport, out_dir: "str | Path | None" = None) -> Path:
    """Write report.md, report.json and report.png (if there is something to chart) atomically."""
    from muse.fileio import atomic_dir

    out = Path(out_dir).expanduser() if out_dir else default_out_dir()
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file()):
        raise MuseError(f"{out} exists and is not an evaluation report directory; refusing to overwrite it. "
                        "Choose another --out or remove it.")

    def fill(tmp: Path) -> None:
        (tmp / "report.md").write_text(markdown(report), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=1),
                                         encoding="utf-8")
        chart(report, tmp / "report.png")

    return atomic_dir(out, fill)


def record(report: EvalReport, out_dir: Path, store=None) -> int:
    """A row in the `runs` table (kind "eval"); returns its id."""
    from muse.store import Store

    db = store or Store()
    try:
        result = {"out": str(out_dir), "models": report.models, "notes": report.notes,
                  "rows": [{"section": r.section, "metric": r.metric, "values": r.values} for r in report.rows]}
        with db.transaction():
            cur = db.execute("INSERT INTO runs (kind, config, result) VALUES (?, ?, ?)",
                             ("eval", json.dumps(report.config, ensure_ascii=False),
                              json.dumps(result, ensure_ascii=False)))
        return cur.lastrowid
    finally:
        if store is None:
            db.close()


def save(report: EvalReport, out_dir: "str | Path | None" = None, store=None) -> tuple[Path, int]:
    """Write the report files, then record the run: (the directory, the runs row id)."""
    out = write(report, out_dir)
    return out, record(report, out, store)
