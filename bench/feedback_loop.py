"""Feedback closes the loop: ratings and corrections → a LoRA fine-tune → a higher held-out score.

    .venv/bin/python bench/feedback_loop.py                            # smollm2-135m, sentiment-en
    .venv/bin/python bench/feedback_loop.py --model qwen2.5-0.5b --suite sentiment-zh --iters 60

What a user does, simulated on the dev split of a held-out suite (the test split is only scored):
1. asks the model in a plain chat (the suite's raw prompt: "Classify the sentiment … Text: …");
2. rates each answer: 👍 when it names the right label, else 👎 with the right label as the
   correction (`muse.apps.feedback.add_feedback`, in a temporary MUSE_HOME);
3. exports the ratings as fine-tuning chats and as eval items (`export_feedback`);
4. fine-tunes a LoRA adapter on the chats (`muse.training.finetune.finetune`);
5. scores the base and the adapted model side by side on the suite's **test** split (the app and
   the raw prompt) and on the exported eval items (the dev answers the user disliked).

Prints one table; figures are accuracy × 100 (greedy, so they repeat).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def feedback_from_dev(model, suite_name: str, store, limit: int | None) -> tuple[int, int]:
    """Rate the model's raw answers to the dev items as a user would; (liked, corrected)."""
    from muse.apps import analysis as A
    from muse.apps.feedback import add_feedback
    from muse.eval.suites import SUITES, _labels_of, load_data, sample
    from muse.sampling import SamplingParams

    suite = SUITES[suite_name]
    items = sample(load_data(suite.data_file("dev")), limit)
    labels = _labels_of(items)
    task = "sentiment" if suite.task == "sentiment" else "classify"
    local = A.SENTIMENT_LABELS[suite.language] if task == "sentiment" else None
    shown = list(local) if local else labels  # the label words the prompt shows (Chinese ones for zh sentiment)
    liked = corrected = 0
    for it in items:
        gold = dict(zip(A.SENTIMENTS, local)).get(it["label"], it["label"]) if local else it["label"]
        prompt = A.messages(it["text"], shown, task, suite.language, shots=False)
        answer = model.chat(prompt, SamplingParams(temperature=0.0, max_new_tokens=16)).strip() or "(empty)"
        if A.named_label(answer, shown) == gold:
            add_feedback(store, 1, answer, prompt)
            liked += 1
        else:
            add_feedback(store, -1, answer, prompt, correction=gold)
            corrected += 1
    return liked, corrected


def score(model, suite_name: str, items_file: Path, limit: int | None) -> dict[str, float]:
    from muse.eval.suites import run_suite

    test = run_suite(model, suite_name, limit, split="test")
    mine = run_suite(model, str(items_file))
    primary = test.primary
    return {"app": test.metrics[primary], "raw": test.metrics[primary + "_raw"],
            "items": mine.metrics.get("match"), "metric": primary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--suite", default="sentiment-en", help="a sentiment or classify suite")
    ap.add_argument("--iters", type=int, default=60, help="LoRA steps")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dev-limit", type=int, default=None, help="dev items rated (default all)")
    ap.add_argument("--test-limit", type=int, default=None, help="test items scored (default all)")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="muse-feedback-"))
    os.environ["MUSE_HOME"] = str(home)  # the ratings go to a throwaway database, not the user's
    import torch

    from muse.api import load
    from muse.apps.feedback import export_feedback
    from muse.store import Store
    from muse.training.finetune import finetune

    print(f"# feedback loop: {args.model}, {args.suite}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = load(args.model)
    with Store() as store:
        t = time.perf_counter()
        liked, corrected = feedback_from_dev(base, args.suite, store, args.dev_limit)
        train, items = home / "train.jsonl", home / "items.jsonl"
        export_feedback(store, train)
        export_feedback(store, items, kind="eval")
    print(f"rated {liked + corrected} dev answers: {liked} 👍, {corrected} 👎 with a correction "
          f"({time.perf_counter() - t:.0f} s)")

    before = score(base, args.suite, items, args.test_limit)
    t = time.perf_counter()
    adapter = finetune(args.model, train, home / "lora", rank=args.rank,
                       settings={"max_iters": args.iters, "learning_rate": args.lr})
    print(f"LoRA r={args.rank}, {args.iters} steps on {liked + corrected} chats: {time.perf_counter() - t:.0f} s")
    after = score(load(adapter), args.suite, items, args.test_limit)

    name = before["metric"]
    print(f"\n| {args.model} | {args.suite} test {name} (app) | test {name} (raw prompt) | "
          "disliked dev answers now right % |")
    print("|---|---|---|---|")
    for label, s in (("base", before), ("+ LoRA on feedback", after)):
        print(f"| {label} | {s['app']:.1f} | {s['raw']:.1f} | {s['items']:.1f} |")


if __name__ == "__main__":
    main()
