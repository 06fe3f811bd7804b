"""The figures README.md and docs/*.md state about runs, made from the committed reports.

    python -m tools.results --check    # exit 1 naming every stale block (tests/test_results.py runs the same check)
    python -m tools.results --write    # rewrite the blocks from the reports

A block is the text between `<!-- results:NAME -->` and `<!-- /results:NAME -->`; NAME is a key of BLOCKS, whose
function reads only files git holds (reports/metrics.json, reports/export.json, reports/runs/**,
reports/benchmarks/**, dvc.lock) and names them in the text it makes. reports/train/ is not read: its summary is
in DVC's cache (git-ignored), and a run's timings are not a function of its deps. Edit a block here, never in place.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

from wenyan.errors import PipelineError, run_main

DOCS = ("README.md", "docs/*.md")  # the files whose blocks are checked
BLOCK = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)
RUNS = "reports/runs"
CPU_VARIANTS = "reports/benchmarks/cpu_default_gemma"


def read_json(root: Path, rel: str):
    path = root / rel
    if not path.is_file():
        raise PipelineError(f"{rel}: the report a README/docs block is made from is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def lr(value: float) -> str:
    """0.0003 -> 3e-4, as the README writes learning rates."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def mib_gib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB"


def bleu_ci(m: dict) -> str:
    return f"{m['bleu']:.2f} ({m['bleu_ci95']['low']:.2f}–{m['bleu_ci95']['high']:.2f})"


def baselines(m: dict, system: str) -> str:
    b = m["baselines"][system]
    return f"{b['bleu']:.2f} / {b['chrf']:.2f}"


def table(header: list[str], rows: list[list[str]], right: int = 0) -> str:
    """A Markdown table; the last `right` columns right-aligned."""
    align = ["---"] * (len(header) - right) + ["---:"] * right
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The blocks: each returns the Markdown between its markers


def cpu_default(root: Path) -> str:
    """The default `dvc repro` run: reports/metrics.json, with the train params dvc.lock recorded for it."""
    m = read_json(root, "reports/metrics.json")
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    train = lock["train"]["params"]["params.yaml"]["train"]
    return (f"The default run ({train['model']}, {train['method']}, {train['max_steps']} steps, "
            f"vocabulary trim `{train['trim_vocab']}`) scores **BLEU {m['bleu']:.2f}** (95% CI "
            f"{m['bleu_ci95']['low']:.2f}–{m['bleu_ci95']['high']:.2f}) and chrF {m['chrf']:.2f} on "
            f"{m['n_sentences']} 史记 test sentences, against {baselines(m, 'copy')} (BLEU / chrF) for copying the "
            f"source and {baselines(m, 'base')} for the untuned model (`reports/metrics.json`; its params: "
            f"`dvc.lock`).\n")


def cpu_time(root: Path) -> str:
    """`/usr/bin/time -v dvc repro` of the CPU default, as committed with its variants."""
    rel = f"{CPU_VARIANTS}/dvc_repro_time.txt"
    text = (root / rel).read_text(encoding="utf-8")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not wall or not rss:
        raise PipelineError(f"{rel}: no wall time or maximum resident set size of /usr/bin/time -v")
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return (f"`/usr/bin/time -v dvc repro` of the default on 2 CPU cores, installs excluded: "
            f"{int(seconds // 60)} min {seconds % 60:.0f} s, maximum resident set {int(rss.group(1)) / 2**20:.1f} GiB "
            f"(`{rel}`; `python benchmarks/main_command.py` times it on a fresh clone).\n")


VARIANTS = [  # (file in CPU_VARIANTS, what differs from the shipped params of then)
    ("long_prompt.metrics.json", "the long default system prompt of then"),
    ("lr1e3.metrics.json", "`train.learning_rate=0.001`"),
    ("lr2e4.metrics.json", "`train.learning_rate=0.0002`"),
    ("short.metrics.json", "`format.system_prompt=你是翻译家。` (shipped now)"),
    ("short40.metrics.json", "the short prompt and `train.max_steps=40`"),
]


def cpu_variants(root: Path) -> str:
    rows = []
    for name, what in VARIANTS:
        m = read_json(root, f"{CPU_VARIANTS}/{name}")
        base = baselines(m, "base") if "base" in m["baselines"] else "-"
        rows.append([what, bleu_ci(m), f"{m['chrf']:.2f}", baselines(m, "copy"), base, str(m["n_sentences"]),
                     f"`{name}`"])
    return table(["variant (Gemma 3 270M, 30 LoRA steps on CPU)", "BLEU (95% CI)", "chrF", "copy BLEU / chrF",
                  "base BLEU / chrF", "sentences", f"file in `{CPU_VARIANTS}/`"], rows) + "\n"


def model_name(root: Path, run: Path, summary: dict) -> str:
    """The base a run trained: the GGUF's name (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct), or the
    base and tokens of the pretrain arm P beside it when it trained on models/pretrain."""
    if summary["model"] == "models/pretrain":
        p = read_json(root, f"{run.parent.relative_to(root).as_posix()}/P/summary.json")
        return (f"{Path(p['base_model']).name.split('.')[0]} pretrained on {p['tokens'] / 1e6:.1f}M tokens "
                f"(`P/`, {p['added_tokens']:,} CJK tokens added)")
    return Path(summary["model"]).name.split(".")[0]


def run_settings(model: str, params: dict | None, summary: dict, description: str = "") -> str:
    """What a GPU run trained, from its params.yaml and train/summary.json (or its arm's description)."""
    parts = [f"{model}, {summary['method']}"]
    if summary.get("added_tokens"):
        parts.append(f"{summary['added_tokens']:,} CJK tokens added")
    parts.append(f"{summary['steps']:,} steps, {summary['tokens_seen'] / 1e6:.1f}M tokens")
    if params:
        parts.append(f"lr {lr(params['train']['learning_rate'])}")
        if params["evaluate"].get("num_beams", 1) > 1:
            parts.append(f"{params['evaluate']['num_beams']} beams")
    if description:
        parts.append(description)
    return "; ".join(parts)


def gpu_run_rows(root: Path) -> list[tuple[str, dict, dict, str]]:
    """(folder, metrics, train summary, settings) of every scored run under reports/runs, newest first."""
    rows = []
    for run in sorted((root / RUNS).iterdir()):
        if (run / "metrics.json").is_file():  # one run a folder: metrics, params.yaml, train/summary.json
            rel = f"{RUNS}/{run.name}"
            m, s = read_json(root, f"{rel}/metrics.json"), read_json(root, f"{rel}/train/summary.json")
            params = yaml.safe_load((run / "params.yaml").read_text(encoding="utf-8"))
            rows.append((rel, m, s, run_settings(model_name(root, run, s), params, s)))
    arms = read_json(root, "reports/benchmarks/pretrain_arms.json")  # the arms' descriptions
    for arm in arms["arms"]:
        rel = f"{RUNS}/h200-pretrain-arms/{arm['arm']}"
        m = read_json(root, f"{rel}/metrics.json")
        trained = rel if (root / rel / "train/summary.json").is_file() else f"{RUNS}/h200-pretrain-arms/C"
        s = read_json(root, f"{trained}/train/summary.json")  # beam4: C's model, scored with 4 beams
        settings = run_settings(model_name(root, root / rel, s), None, s, arm["description"])
        rows.append((rel, m, s, settings))
    return sorted(rows, key=lambda r: -r[1]["bleu"])


def card(summary: dict) -> str:
    return f"{summary.get('processes') or 1} x {summary['device']}"


def gpu_runs(root: Path) -> str:
    rows = []
    for rel, m, s, settings in gpu_run_rows(root):
        speed = (f"{s['tokens_per_s'] / 1000:.1f}k tokens/s, {mib_gib(s['peak_memory_mib'])}"
                 if "tokens_per_s" in s else "-")
        rows.append([f"`{rel}/`", card(s), settings, bleu_ci(m), f"{m['chrf']:.2f}", baselines(m, "copy"),
                     baselines(m, "base"), f"{m['n_sentences']:,}", speed])
    return table(["run (reports)", "card", "training", "BLEU (95% CI)", "chrF", "copy BLEU / chrF",
                  "base BLEU / chrF", "sentences", "train speed, peak memory (its train/summary.json)"], rows) + "\n"


def gpu_best(root: Path) -> str:
    rel, m, s, settings = gpu_run_rows(root)[0]
    gain = m["bleu"] - m["baselines"]["copy"]["bleu"]
    return (f"The best committed GPU run, `{rel}/` ({settings}; {card(s)}), scores **BLEU {m['bleu']:.2f}** "
            f"(95% CI {m['bleu_ci95']['low']:.2f}–{m['bleu_ci95']['high']:.2f}), chrF {m['chrf']:.2f}, on "
            f"{m['n_sentences']:,} test sentences: {gain:.2f} above copying the source ({baselines(m, 'copy')}), "
            f"the untuned model {baselines(m, 'base')} (BLEU / chrF; peak memory of its training "
            f"{mib_gib(s['peak_memory_mib'])}). Every run: [docs/results.md](docs/results.md).\n")


def export_rows(root: Path) -> tuple[dict, list[list[str]]]:
    e = read_json(root, "reports/export.json")
    check = e["gguf"]["check"]
    hf = check["transformers"]
    rows = [[f"`hf/` (transformers, {hf['dtype']}, batch {hf['batch_size']})", f"{e['hf']['bytes'] / 1e6:.1f} MB",
             "-", f"{hf['bleu']:.2f}", "-", f"{hf['sentences_per_s']:.2f}"]]
    for f in e["gguf"]["files"]:
        c = f["check"]
        rows.append([f"`{f['file']}` ({f['type']})", f"{f['bytes'] / 1e6:.1f} MB", f"{c['identical_fraction']:.0%}",
                     f"{c['bleu']:.2f}", f"{c['bleu_change']:+.2f}", f"{c['sentences_per_s']:.2f}"])
    return e, rows


def export(root: Path) -> str:
    e, rows = export_rows(root)
    check = e["gguf"]["check"]
    head = (f"`{e['model']}` ({e['base_model']}, {e['kind']}), exported as {e['hf']['dtype']}; the first "
            f"{check['sentences']} test sentences, {check['threads']} threads, greedy, transformers against each GGUF "
            f"through llama-cpp-python (`reports/export.json`; BLEU `{check['bleu_signature']}`):\n\n")
    return head + table(["file", "size", "identical to transformers", f"BLEU (zh, {check['sentences']} sentences)",
                         "change", "sentences/s"], rows, right=4) + "\n"


def export_summary(root: Path) -> str:
    e, _ = export_rows(root)
    files = "; ".join(f"`{f['file']}` {f['bytes'] / 1e6:.0f} MB, {f['check']['identical_fraction']:.0%} identical to "
                      f"transformers, BLEU {f['check']['bleu_change']:+.2f}" for f in e["gguf"]["files"])
    return (f"On the default model (`reports/export.json`, {e['gguf']['check']['sentences']} test sentences): "
            f"{files}. The table and speeds: [docs/results.md](docs/results.md#export).\n")


def trim_speed(root: Path) -> str:
    """train.trim_vocab none (N) vs auto (T) on one H100: reports/runs/h100-gemma-trim-speed/."""
    rel = f"{RUNS}/h100-gemma-trim-speed"
    rows = []
    for arm, what in (("N", "`train.trim_vocab: none`"), ("T", "`train.trim_vocab: auto`")):
        m = read_json(root, f"{rel}/{arm}/metrics.json")
        steady = [line.split("\t") for line in (root / rel / arm / "tokens_per_s.tsv").read_text().splitlines()[1:]]
        late = " / ".join(f"{float(v) / 1000:.1f}k" for step, v in steady if int(step) >= 10)
        rows.append([f"`{arm}/` {what}", m["device"], f"{m['peak_memory_mib']:,.0f} MiB",
                     f"{m['tokens_per_s']:,.0f} ({m['train_time_s']:.0f} s)", late, f"{m['train']['loss']:.3f}"])
    return table(["arm", "card", "peak GPU memory", f"tokens/s, whole run ({m['step']} steps)",
                  "tokens/s from step 10 (`tokens_per_s.tsv`)", "final loss"], rows) + f"\n\n(`{rel}/`)\n"


BLOCKS = {
    "cpu-default": cpu_default,
    "cpu-time": cpu_time,
    "cpu-variants": cpu_variants,
    "gpu-best": gpu_best,
    "gpu-runs": gpu_runs,
    "export": export,
    "export-summary": export_summary,
    "trim-speed": trim_speed,
}


# ----------------------------------------------------------------------------------------------
# Checking and writing


def doc_files(root: Path) -> list[Path]:
    return [p for pattern in DOCS for p in sorted(root.glob(pattern))]


def render(text: str, root: Path, where: str) -> tuple[str, list[str]]:
    """The text with every block made anew, and the names of the blocks that differed."""
    stale, made = [], {}

    def fill(match: re.Match) -> str:
        name = match.group(2)
        if name not in BLOCKS:
            raise PipelineError(f"{where}: unknown block results:{name} (known: {', '.join(BLOCKS)})")
        if name not in made:
            made[name] = BLOCKS[name](root)
        if match.group(3) != made[name]:
            stale.append(name)
        return match.group(1) + made[name] + match.group(4)

    return BLOCK.sub(fill, text), stale


def check(root: Path, write: bool = False) -> list[str]:
    """'file: results:NAME' for every stale block (rewritten when write)."""
    out = []
    for path in doc_files(root):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        new, stale = render(text, root, rel)
        out += [f"{rel}: results:{name}" for name in stale]
        if write and new != text:
            path.write_text(new, encoding="utf-8")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 naming every block that differs from the reports")
    mode.add_argument("--write", action="store_true", help="rewrite the blocks from the reports")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository (default: here)")
    args = parser.parse_args(argv)
    stale = check(args.root, write=args.write)
    for line in stale:
        print(("rewrote " if args.write else "stale: ") + line)
    if stale and args.check:
        raise SystemExit(1)


if __name__ == "__main__":
    run_main(main)
