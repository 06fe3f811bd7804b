"""Benchmark: `wenyan-translate --input big.txt --output out.txt` memory and first output against input length.

    python benchmarks/translate_memory.py --model models/adapter --lines 1000 --lines 10000 --lines 100000 \
        --out reports/benchmarks/translate_memory

Issue 21 (class 8): a 100,000-line input grew to 4.9 GB and wrote nothing until the end. This runs the real
command (tools/translate.main: reading, normalising, sentence planning, prompts, chunked writing into
<output>.partial, the rename at the end) on inputs of each length, one process each, with the model's
generation replaced by an echo ('译' + the sentence): what is measured is the tool's own memory and streaming,
not the model's speed (a 135M model on 2 CPU threads needs hours for 100,000 lines). The model is still loaded,
so its weights are in the peak. Per length: peak RSS of the process (ru_maxrss), wall time, the seconds until
the first translated lines are on disk (<output>.partial polled every 50 ms), and that the output has one line
per input line. Bounded memory = the peak does not grow with the input.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["子曰：学而时习之，不亦说乎？有朋自远方来，不亦乐乎？", "人不知而不愠，不亦君子乎？",
             "黄帝者，少典之子，姓公孙，名曰轩辕。生而神灵，弱而能言。", "三人行，必有我师焉。"]
DRIVER = """import resource, sys
from wenyan import generation

def echo(model, tokenizer, prompts, sources, **kwargs):
    return ["译" + s for s in sources], [False] * len(sources)

generation.generate = echo
from tools import translate
try:
    translate.main(sys.argv[1:])
finally:
    print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def run_one(model: Path, lines: int, work: Path) -> dict:
    src, out = work / f"in-{lines}.txt", work / f"out-{lines}.txt"
    src.write_text("".join(SENTENCES[i % len(SENTENCES)] + "\n" for i in range(lines)), encoding="utf-8")
    partial = out.with_name(out.name + ".partial")
    cmd = [sys.executable, "-c", DRIVER, "--model", str(model), "--input", str(src), "--output", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and ((partial.is_file() and partial.stat().st_size > 0) or out.is_file()):
            first = time.perf_counter() - start
        time.sleep(0.05)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"translate failed on {lines} lines:\n{stderr[-2000:]}")
    peak_kib = int(next(line.split()[1] for line in stderr.splitlines() if line.startswith("MAXRSS_KIB")))
    written = out.read_text(encoding="utf-8").splitlines()
    return {"lines": lines, "input_mb": round(src.stat().st_size / 1e6, 2), "wall_s": round(wall, 1),
            "first_output_s": round(first, 1) if first is not None else None,
            "peak_rss_mib": round(peak_kib / 1024, 1), "output_lines": len(written),
            "one_line_per_input_line": len(written) == lines}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a trained model directory (models/adapter)")
    parser.add_argument("--lines", type=int, action="append", help="input lengths, shortest first (default 1000 10000 100000)")
    parser.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    lengths = sorted(args.lines or [1000, 10000, 100000])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in lengths:
            rows.append(run_one(args.model.resolve(), n, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"model": str(args.model), "rows": rows, "python": platform.python_version(),
              "command": "python benchmarks/translate_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        md = ["# `wenyan-translate --input N lines --output file`: memory and first output (generation echoed)", "",
              f"`{result['command']}`", "", __doc__.split("\n\n", 2)[2].strip(), "",
              "| input lines | input MB | wall s | first lines on disk after s | peak RSS MiB | output lines = input lines |",
              "|---:|---:|---:|---:|---:|---|"]
        md += [f"| {r['lines']:,} | {r['input_mb']} | {r['wall_s']} | {r['first_output_s']} | {r['peak_rss_mib']} | "
               f"{r['one_line_per_input_line']} |" for r in rows]
        args.out.with_suffix(".md").write_text("\n".join(md) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
