"""Knowledge-base QA: Muse's `ask` vs raw prompting of the same model, on the held-out kbqa files.

    .venv/bin/python bench/kbqa.py --split dev                       # both languages, qwen2.5-0.5b
    .venv/bin/python bench/kbqa.py --split dev --lang en --model smollm2-135m --embeddings none -v

Per language: the file's documents go into a KnowledgeBase in a temporary MUSE_HOME (added with
`add_text`, so chunking, headings and embeddings are the app's own); each question is answered by
`muse.apps.kb.ask` and by raw prompting (the same model and chat template, greedy, every document
pasted whole into the prompt, told to reply with the not-found sentence when they do not hold the
answer). Scores: `muse.eval.kbqa.score` (answer / refusal accuracy, citation precision / recall).
Tune on dev only; run test once, to report.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

HELDOUT = Path(__file__).resolve().parent.parent / "muse" / "eval" / "data" / "heldout"
RAW_SYSTEM = {
    "en": "Answer the question using only the documents below, in one short sentence. If the documents do not "
          "contain the answer, reply exactly: {nf}",
    "zh": "只根据下面的文档回答问题，用一句简短的话回答。如果文档中没有答案，只回答：{nf}",
}


def raw_answer(model, docs: list[dict], question: str, lang: str, params) -> str:
    from muse.apps.grounding import NOT_FOUND

    block = "\n\n".join(f"Document: {d['document']}\n{d['text']}" for d in docs)
    q = ("Question: " if lang == "en" else "问题：") + question
    messages = [{"role": "system", "content": RAW_SYSTEM[lang].format(nf=NOT_FOUND[lang])},
                {"role": "user", "content": f"{block}\n\n{q}"}]
    return model.chat(messages, params).strip()


def run(model, lang: str, split: str, args) -> dict:
    from muse.apps.kb import KnowledgeBase, stream_ask
    from muse.eval.kbqa import Prediction, correct, load, score
    from muse.sampling import SamplingParams
    from muse.text import language

    docs, questions = load(HELDOUT / f"kbqa_{lang}_{split}.jsonl")
    questions = questions[:args.limit] if args.limit else questions
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_tokens)
    old = os.environ.get("MUSE_HOME")
    with tempfile.TemporaryDirectory() as home:
        os.environ["MUSE_HOME"] = home
        try:
            kb = KnowledgeBase(embeddings=args.embeddings)
            for d in docs:
                kb.add_text(d["document"], d["text"])
            ours, raw = [], []
            t0 = time.perf_counter()
            for q in questions:
                s = stream_ask(model, kb, q["question"], params, k=args.k)
                for _ in s:
                    pass
                a = s.answer
                ours.append(Prediction(a.text, a.found, [c.title for c in a.citations]))
                if not args.no_raw:
                    raw.append(Prediction(raw_answer(model, docs, q["question"], language(q["question"]), params)))
                if args.verbose:
                    mark = "ok " if correct(q, ours[-1]) else "BAD"
                    print(f"{mark} {q['question']}\n    gold={q['answers']} src={q['source']}\n"
                          f"    reply={s.reply!r}\n    muse={a.text!r} cited={ours[-1].cited}"
                          f"\n    passages={[(c.n, c.title, c.section) for c in s.citations]}"
                          + (f"\n    raw={raw[-1].text!r} {'ok' if correct(q, raw[-1]) else 'BAD'}" if raw else ""),
                          flush=True)
            secs = time.perf_counter() - t0
        finally:
            if old is None:
                os.environ.pop("MUSE_HOME", None)
            else:
                os.environ["MUSE_HOME"] = old
    out = {"muse": score(questions, ours), "seconds": round(secs, 1)}
    if raw:
        out["raw"] = score(questions, raw)
    return out


def table(results: dict) -> str:
    cols = ["answer_accuracy", "refusal_accuracy", "accuracy", "citation_precision", "citation_recall",
            "inline_citation"]
    lines = ["| file | method | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for name, r in results.items():
        for method in ("muse", "raw"):
            if method in r:
                lines.append(f"| {name} | {method} | " + " | ".join(fmt(r[method][c]) for c in cols) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--lang", nargs="+", default=["en", "zh"], choices=["en", "zh"])
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    ap.add_argument("--embeddings", default="auto", choices=["auto", "none"])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--no-raw", action="store_true")
    ap.add_argument("--json", help="write the scores here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    import muse

    model = muse.load(args.model)
    results = {}
    for lang in args.lang:
        results[f"kbqa_{lang}_{args.split}"] = run(model, lang, args.split, args)
    print(f"model {args.model}, embeddings {args.embeddings}, k {args.k}, greedy, max_new_tokens {args.max_tokens}")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
