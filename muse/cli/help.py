"""How `muse … --help` lays out arguments and options (installed when help is first shown).

Typer's own layout gives each option six columns (long name, short name, --no- name, its short name,
type, help). At 80 columns the name columns take most of the width, and the help column, which rich
may shrink to nothing, gets its words cut with an ellipsis ("shakespeare-char-…"); flags show a
`<bool>` type though they take no value. Here each option is one line of names and its value type
(`--max-tokens, -n <int>`, `--compile/--no-compile`), and the help column is never narrower than its
longest word, so rich wraps it at word boundaries.

Typer is pinned (pyproject.toml); `install()` replaces its one options-panel function.
"""

from __future__ import annotations

_installed = False


def install() -> None:
    """Use this layout for every help screen from now on (imports typer.rich_utils: ~50 ms)."""
    global _installed
    if not _installed:
        from typer import rich_utils

        rich_utils._print_options_panel = _print_options_panel
        _installed = True


def _names(param, ctx):
    """The option's names and value type as rich Text: `--model, -m <str>`, `--compile/--no-compile`."""
    from rich.text import Text
    from typer import rich_utils as ru
    from typer.core import TyperArgument

    if isinstance(param, TyperArgument):
        text = Text(param.display_name_raw + ("..." if param.metavar is None and param.nargs != 1 else ""),
                    style=ru.STYLE_OPTION)
    else:
        long = [o for o in param.opts if o.startswith("--")]
        short = [o for o in param.opts if not o.startswith("--")]
        text = Text()
        for i, name in enumerate(long):
            text.append(("/" if i else "") + name, style=ru.STYLE_OPTION)
        for name in param.secondary_opts:  # --no-flag
            text.append("/" + name, style=ru.STYLE_NEGATIVE_OPTION)
        if short:
            text.append(", " if len(text) else "")
            text.append(", ".join(short), style=ru.STYLE_SWITCH)
    if not getattr(param, "is_flag", False):  # a flag takes no value: no type to show
        kind = param.display_type_rich(ctx=ctx)
        range_str = param._get_number_range_help_str()
        if kind or range_str:
            text.append(" ")
            text.append((kind or "") + (f" [{range_str}]" if range_str else ""), style=ru.STYLE_TYPES)
    return text


def _help(param, ctx, markup_mode):
    """Typer's help text for the option (help, env var, default, required) as one wrapping Text."""
    from rich.text import Text
    from typer import rich_utils as ru

    parts = ru._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode).renderables
    if not all(isinstance(p, Text) for p in parts):  # markdown mode: keep typer's own
        return ru.Columns(parts)
    out = Text()
    for part in parts:
        if len(out):
            out.append("  ")
        out.append_text(part)
    return out


def _print_options_panel(*, name, params, ctx, markup_mode, console) -> None:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text
    from typer import rich_utils as ru

    if not params:
        return
    rows = [(Text(ru.REQUIRED_SHORT_STRING, style=ru.STYLE_REQUIRED_SHORT) if p.required else Text(""),
             _names(p, ctx), _help(p, ctx, markup_mode)) for p in params]
    if not any(p.required for p in params):
        rows = [row[1:] for row in rows]
    table = Table(show_header=False, expand=True, box=None, pad_edge=False, padding=(0, 1), highlight=False)
    if len(rows[0]) == 3:
        table.add_column(width=1)  # * marks the required ones
    # names take what they need, up to ~40 % of the width
    table.add_column(max_width=max(16, (console.width - 4) * 2 // 5), overflow="fold")
    longest = max((len(w) for *_, h in rows if isinstance(h, Text) for w in h.plain.split()), default=8)
    # fold, not ellipsis: rich keeps a line's trailing space after wide (CJK) characters, and crops it with "…"
    table.add_column(ratio=1, min_width=min(longest, max(8, console.width // 2)), overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(Panel(table, border_style=ru.STYLE_OPTIONS_PANEL_BORDER, title=name,
                        title_align=ru.ALIGN_OPTIONS_PANEL))
