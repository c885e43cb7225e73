"""Knowledge-base commands: `muse kb add|list|remove|search` and `muse ask`."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from muse.cli.common import (MuseTyper, MODEL_HELP, PRECISION_HELP, MaxTokens, MinP, RepPenalty, Seed, Temperature,
                             TopK, TopP, _stream_to_stdout, app, console, err, friendly, given_sampling, over)
from muse.cli.progress import Activity, loading, routed, until_first

kb_app = MuseTyper(help="Your knowledge base: the documents `muse ask` answers from (txt, md, html, pdf, docx).",
                     no_args_is_help=True)
app.add_typer(kb_app, name="kb")

NoEmbeddings = typer.Option(False, "--no-embeddings",
                            help="Keyword search (BM25) only, without the multilingual embedding model.")


def _kb(no_embeddings: bool):
    from muse.apps.kb import KnowledgeBase

    return KnowledgeBase(embeddings="none" if no_embeddings else "auto")


@kb_app.command("add")
@friendly
def kb_add(
    paths: list[str] = typer.Argument(..., help="Files or folders (read recursively)."),
    no_embeddings: bool = NoEmbeddings,
):
    """Add documents; re-adding updates only the files that changed."""
    with Activity() as activity:
        activity.step("Reading and indexing")
        kb = _kb(no_embeddings)
        if kb.dense:
            activity.step("Reading, embedding and indexing")
        report = kb.add(paths)
    for label, colour, items in (("added", "green", report.added), ("updated", "cyan", report.updated),
                                 ("unchanged", "dim", report.unchanged)):
        for path in items:
            console.print(f"[{colour}]{label:9}[/] {escape(path)}", highlight=False, soft_wrap=True)
    for path, reason in report.skipped:
        err.print(f"[yellow]skipped  [/] {escape(path)}: {escape(reason)}", highlight=False, soft_wrap=True)
    console.print(f"{len(report.added)} added, {len(report.updated)} updated, {len(report.unchanged)} unchanged, "
                  f"{len(report.skipped)} skipped ({report.chunks} chunks written)")
    if report.skipped and not (report.added or report.updated or report.unchanged):
        raise typer.Exit(1)  # nothing usable: let scripts notice


@kb_app.command("list")
@friendly
def kb_list():
    """The documents in the knowledge base."""
    from muse.apps.kb import KnowledgeBase

    docs = KnowledgeBase(embeddings="none").list()
    if not docs:
        console.print("The knowledge base is empty. Add documents with `muse kb add PATH...`.")
        return
    table = Table()
    for col in ("id", "title", "path", "chunks", "size"):
        table.add_column(col, justify="right" if col in ("id", "chunks", "size") else "left")
    for d in docs:
        table.add_row(str(d["id"]), escape(d["title"]), escape(d["path"]), str(d["chunks"]), f"{d['size']:,} B")
    console.print(table)


@kb_app.command("remove")
@friendly
def kb_remove(doc: str = typer.Argument(..., help="The document's id, path, file name or title (see `muse kb list`).")):
    """Remove a document and its chunks."""
    from muse.apps.kb import KnowledgeBase

    removed = KnowledgeBase(embeddings="none").remove(doc)
    console.print(f"[green]Removed[/] {escape(removed['title'])} ({escape(removed['path'])})",
                  highlight=False, soft_wrap=True)


@kb_app.command("search")
@friendly
def kb_search(
    query: str = typer.Argument(..., help="What to look for (English or Chinese)."),
    k: int = typer.Option(5, "-k", help="How many passages to show."),
    no_embeddings: bool = NoEmbeddings,
):
    """Show the passages that best match a query, without asking a model."""
    with Activity() as activity:
        activity.step("Searching the knowledge base")
        hits = _kb(no_embeddings).search(query, k=k)
    if not hits:
        console.print("No matching passages.")
    for n, h in enumerate(hits, 1):
        console.print(f"[bold][{n}][/] {escape(h.title)} — {escape(h.path)} [dim](score {h.score:.4f})[/]",
                      highlight=False, soft_wrap=True)
        console.print(f"    {escape(h.text)}", highlight=False, soft_wrap=True)


@app.command()
@friendly
def ask(
    question: str = typer.Argument(..., help="Your question (English, or Chinese with a bilingual model)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    k: int = typer.Option(4, "-k", help="Most passages to give the model."),
    show_sources: bool = typer.Option(False, "--show-sources", help="Print each cited passage after the answer."),
    no_embeddings: bool = NoEmbeddings,
    max_tokens: Optional[int] = MaxTokens, temperature: Optional[float] = Temperature,
    top_k: Optional[int] = TopK, top_p: Optional[float] = TopP, min_p: Optional[float] = MinP,
    repetition_penalty: Optional[float] = RepPenalty, seed: Optional[int] = Seed,
    precision: str = typer.Option("auto", help=PRECISION_HELP),
):
    """Answer a question from your documents, citing them as [1], [2] …"""
    import muse
    from muse.errors import MuseError
    from muse.text import language

    chosen = routed(model, language(question) == "zh")
    with Activity() as activity:
        with loading(activity, chosen):  # shown before torch is imported: ~1 s
            from muse.apps.kb import DEFAULT_PARAMS, stream_ask

            kb = _kb(no_embeddings)
            if not kb.list():
                raise MuseError("The knowledge base is empty: add documents first with `muse kb add PATH...`.")
            given = given_sampling(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
            params = over(DEFAULT_PARAMS, given) if given else None
            m = muse.load(chosen, precision=precision)
        activity.step("Searching the knowledge base" + (" (embeddings)" if kb.dense else ""))
        stream = stream_ask(m, kb, question, params, k=k)
        n = len(stream.citations)
        activity.step(f"Reading {n} passage{'s' if n != 1 else ''}" if n else "Answering")
        _stream_to_stdout(until_first(stream, activity))
    answer = stream.answer
    if answer.quoted:
        console.print("[dim](quoted: the model gave no answer it could back, so this is the sentence of your "
                      "documents nearest the question)[/]")
    if answer.citations:
        console.print("\n[bold]Sources[/]")
    for c in answer.citations:
        console.print(f"[{c.n}] {escape(c.title)} — {escape(c.path)}", highlight=False, soft_wrap=True)
        if show_sources:
            console.print(f"    [dim]{escape(c.text)}[/]", highlight=False, soft_wrap=True)
