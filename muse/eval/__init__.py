"""Evaluation: perplexity, text metrics, task suites over the apps, side-by-side comparison, reports.

    from muse.eval import perplexity, corpus_perplexity
    r = perplexity(model, open("book.txt").read())      # tokens, loss, perplexity, bits_per_byte
    from muse.eval.metrics import bleu, chrf, rouge, classification_scores
    from muse.eval.suites import run_suite               # each app vs raw prompting, on held-out dev/test items:
                                                         # summarize, translate, sentiment, classify, kbqa, writer
    from muse.eval.compare import evaluate               # several models side by side, with a report

The `muse eval` command is a thin layer over `muse.eval.compare.evaluate`.
"""

from muse.eval.perplexity import PerplexityResult, corpus_perplexity, perplexity

__all__ = ["PerplexityResult", "corpus_perplexity", "perplexity"]
