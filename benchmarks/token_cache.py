"""Tokenise once, measured: the train stage's tokenization of N train rows (examples.tokenize_rows: chat template, ids,
reply-only mask, in parallel processes) against reading the same examples back from wenyan/token_cache.py.

    python benchmarks/token_cache.py --train data/format/train.jsonl --model gemma-3-270m --chat-template gemma-3 \
        --rows 50000 --out reports/benchmarks/token_cache

The cache goes to a fresh temporary folder (the user's cache is left alone). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=Path, default=Path("data/format/train.jsonl"))
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--chat-template", default="gemma-3")
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/token_cache"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["WENYAN_MT_CACHE"] = tmp
        from wenyan import models
        from wenyan.training import examples

        tokenizer = models.load_tokenizer(args.model, args.chat_template)
        rows = []
        with args.train.open(encoding="utf-8") as f:
            for line in f:
                rows.append(json.loads(line))
                if len(rows) == args.rows:
                    break
        times = {}
        for name in ("tokenize", "from the cache"):
            started = time.perf_counter()
            out = examples.tokenize_rows(tokenizer, rows, args.max_seq_length, str(args.train))
            times[name] = round(time.perf_counter() - started, 2)
            if name == "tokenize":
                first = out
        assert out == first
        size = sum(p.stat().st_size for p in Path(tmp, "tokenized").glob("*.npz"))
    result = {"rows": len(rows), "model": args.model, "seconds": times, "speedup": round(times["tokenize"] / times["from the cache"], 1),
              "cache_bytes": size, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "command": f"python benchmarks/token_cache.py --train {args.train} --model {args.model} --rows {args.rows}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    text = (f"# Tokenise once\n\n`{result['command']}` ({result['cpus']} CPUs, load average "
            f"{', '.join(f'{x:.2f}' for x in result['load_average'])})\n\n| | seconds |\n| --- | ---: |\n"
            f"| tokenize {len(rows):,} train rows ({args.model}, examples.tokenize_rows) | {times['tokenize']} |\n"
            f"| the same examples from the cache | {times['from the cache']} |\n\n"
            f"{result['speedup']}x; the cache file {size / 1e6:.1f} MB; the examples identical.\n")
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
