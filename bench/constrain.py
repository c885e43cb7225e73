"""Constrained decoding: what the token mask costs per step, and how often output is valid JSON.

    .venv/bin/python bench/constrain.py                 # both bundled models (the bilingual one if installed)
    .venv/bin/python bench/constrain.py --isa avx2      # torch's AVX2 kernels, as on most laptops
    .venv/bin/python bench/constrain.py --models smollm2-135m --repeats 3

1. Overhead: the same chat prompt decoded greedily for --tokens tokens, free and under a JSON schema,
   --repeats times each, alternating; medians of ms per token. "mask" replays the constrained
   output through `muse.constrain.TokenMask` alone (compute the allowed set + apply it to the
   logits), so its share of a step is measured, not inferred from a noisy difference.
2. Validity: 24 extraction requests (12 English, 12 Chinese) that each name a JSON schema, answered
   greedily with and without the schema as a constraint; "valid" = parses (a ```json fence is
   stripped first, to be fair to the free output) and validates against the schema (jsonschema).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_line() -> str:
    import torch

    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = re.search(r"model name\s*:\s*(.*)", text).group(1)
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile")
                         if re.search(rf"\b{f}\b", text))
    except (OSError, AttributeError):
        name = "unknown CPU"
    return (f"{name}; {os.cpu_count()} logical CPUs; flags: {flags or 'none of avx2/avx512'}; "
            f"torch kernels: {torch.backends.cpu.get_cpu_capability()}; threads {torch.get_num_threads()}; "
            f"load {os.getloadavg()[0]:.1f}")


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}},
          "required": ["name", "age", "city"], "additionalProperties": False}
PRODUCT = {"type": "object", "properties": {"product": {"type": "string"}, "price": {"type": "number"},
                                            "in_stock": {"type": "boolean"}},
           "required": ["product", "price", "in_stock"], "additionalProperties": False}
EVENT = {"type": "object", "properties": {"event": {"type": "string"}, "date": {"type": "string"},
                                          "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 6}},
         "required": ["event", "date", "attendees"], "additionalProperties": False}

TASKS = [  # (schema, text)
    (PERSON, "Maria Lopez is 34 and lives in Madrid."), (PERSON, "Tom, aged 58, moved to Leeds last year."),
    (PERSON, "Our new intern Priya (22) is based in Pune."), (PERSON, "Kenji Sato, 41, Osaka."),
    (PRODUCT, "The Aero kettle costs $39.99 and is in stock."),
    (PRODUCT, "Sold out: the Nova desk lamp, usually 24.50 euros."),
    (PRODUCT, "Trail running shoes, 120 dollars, available now."),
    (PRODUCT, "The 2 TB drive is back in stock at 89.00."),
    (EVENT, "The book club meets on 12 March; Ann, Raj and Lee are coming."),
    (EVENT, "Team offsite on 2026-05-04 with Sam and Dana."),
    (EVENT, "Jo's birthday dinner is Friday the 9th; guests: Mia, Leo."),
    (EVENT, "Quarterly review, June 30, attended by the CFO and two analysts."),
    (PERSON, "王芳今年29岁，住在杭州。"), (PERSON, "李雷，45岁，来自成都。"),
    (PERSON, "新同事陈静在深圳工作，今年31岁。"), (PERSON, "张伟（60岁）退休后搬到了大连。"),
    (PRODUCT, "这款保温杯售价59元，目前有货。"), (PRODUCT, "蓝牙耳机已售罄，原价199元。"),
    (PRODUCT, "电动牙刷现价129.9元，库存充足。"), (PRODUCT, "这本词典卖45元，暂时缺货。"),
    (EVENT, "读书会定于3月12日举行，小王、小李和老张参加。"), (EVENT, "公司年会在2026年1月20日，参加者有刘洋和赵敏。"),
    (EVENT, "周五晚上给妈妈过生日，来的人有姐姐和舅舅。"), (EVENT, "项目评审会6月30日召开，出席者：周总、两位工程师。"),
]


def request(schema: dict, text: str) -> list[dict]:
    zh = re.search(r"[\u4e00-\u9fff]", text) is not None
    keys = ", ".join(schema["properties"])
    ask = (f"从下面的文字中提取信息，只输出一个 JSON 对象，键为：{keys}。\n\n{text}" if zh else
           f"Extract the information from the text below. Output only one JSON object with the keys: {keys}.\n\n{text}")
    return [{"role": "user", "content": ask}]


def parse_free(text: str):
    fenced = re.search(r"```(?:json)?\s*(.*?)(```|$)", text, re.S)
    body = fenced.group(1) if fenced else text
    start = body.find("{")
    return json.loads(body[start:] if start >= 0 else body)


def validity(model, jsonschema, max_tokens: int):
    """Yields (lang, method, valid, items, median seconds) as each is measured."""
    from muse import Constraint

    for lang, tasks in (("en", TASKS[:12]), ("zh", TASKS[12:])):
        for method in ("free", "constrained"):
            ok, secs = 0, []
            for schema, text in tasks:
                kw = {"constraint": Constraint.json_schema(schema)} if method == "constrained" else {}
                t0 = time.perf_counter()
                out = model.chat(request(schema, text), temperature=0, max_new_tokens=max_tokens, **kw)
                secs.append(time.perf_counter() - t0)
                try:
                    jsonschema.validate(parse_free(out) if method == "free" else json.loads(out), schema)
                    ok += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
            yield lang, method, ok, len(tasks), statistics.median(secs)


def overhead(model, tokens: int, repeats: int) -> dict:
    from muse import Constraint
    from muse.constrain import TokenMask

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "story": {"type": "string"}},
              "required": ["name", "story"]}
    msgs = [{"role": "user", "content": "Write a long story about a cat, as JSON with a name and a story."}]
    ids = model.tokenizer.encode(model.chat_prompt(msgs), add_special_tokens=False)
    runs = {"free": [], "constrained": [], "mask": []}
    for _ in range(repeats):
        for method in ("free", "constrained"):
            kw = {"constraint": Constraint.json_schema(schema)} if method == "constrained" else {}
            t0 = time.perf_counter()
            chunks = list(model.stream(ids, temperature=0, max_new_tokens=tokens, loop_guard=False, **kw))
            runs[method].append((time.perf_counter() - t0) / len(chunks) * 1e3)
            if method == "constrained":
                out = [c.token for c in chunks]
        mask = TokenMask(Constraint.json_schema(schema), model.tokenizer, model.config.vocab_size)
        import torch

        logits = torch.randn(1, model.config.vocab_size)
        t0 = time.perf_counter()
        for tok in out:
            mask.apply(logits)
            mask.accept(tok)
        runs["mask"].append((time.perf_counter() - t0) / len(out) * 1e3)
    return {k: statistics.median(v) for k, v in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=160, help="budget for each validity answer")
    ap.add_argument("--isa", choices=["default", "avx2"], default="default",
                    help="avx2: re-run under ATEN_CPU_CAPABILITY=avx2 (torch's AVX2 kernels)")
    ap.add_argument("--skip-validity", action="store_true")
    args = ap.parse_args()
    if args.isa == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})

    import jsonschema

    import muse
    from muse.checkpoints.registry import BUNDLED

    print(f"# bench/constrain.py\n{cpu_line()}\n", flush=True)
    models = []
    for name in args.models:
        if name in BUNDLED and BUNDLED[name].installed_file() is None and BUNDLED[name].parts_present() is None:
            print(f"({name} is not installed: skipped)")
            continue
        models.append((name, muse.load(name)))
    print(f"## Mask cost per decode step (greedy, {args.tokens} tokens, median of {args.repeats})\n")
    print("| model | vocab | free ms/token | constrained ms/token | mask ms/token | mask share of a step |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    for name, model in models:  # rows as they are measured: a slow run still shows what it has
        o = overhead(model, args.tokens, args.repeats)
        print(f"| {name} | {model.config.vocab_size} | {o['free']:.2f} | {o['constrained']:.2f} | {o['mask']:.3f} | "
              f"{o['mask'] / o['constrained'] * 100:.1f} % |", flush=True)
    if args.skip_validity:
        return
    print("\n## Valid JSON (parses and matches the requested schema), greedy\n")
    print("| model | lang | method | valid | median s/answer |")
    print("|---|---|---|---:|---:|", flush=True)
    for name, model in models:
        for lang, method, ok, n, secs in validity(model, jsonschema, args.max_tokens):
            print(f"| {name} | {lang} | {method} | {ok}/{n} ({ok / n * 100:.0f} %) | {secs:.2f} |", flush=True)

if __name__ == "__main__":
    main()
