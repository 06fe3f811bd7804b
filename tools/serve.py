"""The local web page: translate pasted or uploaded Classical Chinese with a trained model, and compare the runs.

    python -m tools.serve                       # http://127.0.0.1:8765/ (printed); models found under models/
    python -m tools.serve --model models/export/model-Q8_0.gguf --port 0    # a free port

Two views, both server-rendered HTML with inline CSS, JS and SVG: nothing is fetched from anywhere but this
server, so the page works offline (no fonts, scripts or plots from the network).

- Translate (/): paste text or pick a .txt file (read in the browser), choose a model (a train/export directory
  or a GGUF the export stage wrote; those under models/ and those given with --model are listed, any other path
  can be typed), and the sentence-by-sentence translation appears as each sentence is done (a progress bar),
  each source sentence beside its translation; copy or download the result (one output line per input line,
  as `wenyan-translate` writes it). The work is tools.translate's Translator: the same splitting, prompts and
  decoding as the command.
- Runs (/runs): the committed runs (reports/runs/*/) and the current reports/ side by side: BLEU (95% CI) and
  chrF with the copy-the-source and untuned-base baselines, per-book BLEU bars with the baselines beside the
  model, and the training and eval loss curves.

Starlette (ASGI) served by uvicorn on 127.0.0.1 only. Translation streams as NDJSON from POST /api/translate.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import queue
import socket
import threading
import time
from pathlib import Path

from wenyan.errors import PipelineError, get_logger, run_main

log = get_logger("serve")

DEFAULT_PORT = 8765
MAX_TEXT_CHARS = 200_000
BOOKS_SHOWN = 12


# ----------------------------------------------------------------------------------------------
# Models and runs on disk


def find_models(root: Path, given: list[Path]) -> list[dict]:
    """Models to offer: those given, then the train stage's adapter, the export's merged model and GGUF files."""
    candidates = list(given)
    candidates += [root / "models" / "adapter", root / "models" / "export" / "hf"]
    candidates += sorted((root / "models" / "export").glob("*.gguf"))
    seen, out = set(), []
    for path in candidates:
        path = Path(path)
        ok = path.is_file() and path.suffix == ".gguf" and (path.parent / "training_config.json").is_file() or \
            path.is_dir() and (path / "training_config.json").is_file()
        key = str(path.resolve()) if path.exists() else str(path)
        if ok and key not in seen:
            seen.add(key)
            out.append({"path": str(path), "kind": "GGUF (llama.cpp)" if path.suffix == ".gguf" else "transformers"})
    return out


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_csv(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def read_curve(path: Path) -> list[tuple[float, float]]:
    """A DVCLive TSV (step<TAB>value) as (step, value) points."""
    points = []
    for row in _read_tsv(path):
        try:
            points.append((float(row["step"]), float(next(v for k, v in row.items() if k != "step" and k is not None))))
        except (KeyError, ValueError, StopIteration, TypeError):
            continue
    return points


def _read_tsv(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except OSError:
        return []


def load_run(name: str, folder: Path) -> dict | None:
    """One run's figures: reports/metrics.json-style metrics, by_book.csv, training curves and summary."""
    metrics = read_json(folder / "metrics.json")
    if not metrics:
        return None
    train = read_json(folder / "train" / "metrics.json") or {}
    summary = read_json(folder / "train" / "summary.json") or {}
    curves = {
        "train loss": read_curve(folder / "train" / "plots" / "metrics" / "train" / "loss.tsv"),
        "eval loss": read_curve(folder / "train" / "plots" / "metrics" / "eval" / "loss.tsv"),
    }
    return {"name": name, "folder": str(folder), "metrics": metrics, "train": train, "summary": summary,
            "by_book": read_csv(folder / "evaluate" / "by_book.csv"), "curves": curves,
            "bleu_signature": bleu_signature(folder, metrics)}


def bleu_signature(folder: Path, metrics: dict) -> str:
    """The model's BLEU signature: its row of evaluate/scores.csv, or, for a run from before scores.csv, the
    bleu_signature its metrics.json still had ("" when neither has one)."""
    for row in read_csv(folder / "evaluate" / "scores.csv"):
        if row.get("system") == "model" and row.get("bleu_signature"):
            return row["bleu_signature"]
    return metrics.get("bleu_signature") or ""


def load_runs(reports: Path) -> list[dict]:
    """The current reports/ first, then each committed run under reports/runs/ (by name)."""
    runs = []
    current = load_run("current (reports/)", reports)
    if current:
        runs.append(current)
    for folder in sorted((reports / "runs").glob("*/")):
        run = load_run(folder.name, folder)
        if run:
            runs.append(run)
    return runs


# ----------------------------------------------------------------------------------------------
# SVG charts (server-side, no plotting library in the browser)

COLORS = {"model": "#2b6cb0", "base": "#a0aec0", "copy": "#ed8936", "train loss": "#2b6cb0", "eval loss": "#c53030"}


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def book_bars(rows: list[dict], width: int = 640) -> str:
    """Grouped horizontal bars: per book (most sentences first), BLEU of the model, the base model and copying."""
    rows = sorted(rows, key=lambda r: -int(r.get("n") or 0))[:BOOKS_SHOWN]
    if not rows:
        return "<p class='muted'>no per-book scores (evaluate/by_book.csv)</p>"
    series = [("model", "bleu"), ("base", "base_bleu"), ("copy", "copy_bleu")]
    top = max([float(r.get(key) or 0) for r in rows for _, key in series] + [1.0])
    label_w, bar_h, gap = 130, 8, 10
    group_h = bar_h * len(series) + gap
    height = group_h * len(rows) + 30
    scale = (width - label_w - 60) / top
    parts = [f"<svg class='chart' width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' "
             f"aria-label='BLEU by book'>"]
    for k, row in enumerate(rows):
        y0 = 20 + k * group_h
        parts.append(f"<text x='{label_w - 6}' y='{y0 + bar_h * 1.8}' text-anchor='end' class='lbl'>"
                     f"{esc(row.get('book'))} ({esc(row.get('n'))})</text>")
        for j, (name, key) in enumerate(series):
            value = float(row.get(key) or 0)
            y = y0 + j * bar_h
            parts.append(f"<rect x='{label_w}' y='{y}' width='{max(value * scale, 0.5):.1f}' height='{bar_h - 1}' "
                         f"fill='{COLORS[name]}'><title>{esc(row.get('book'))} {name}: BLEU {value:.2f}</title></rect>")
            parts.append(f"<text x='{label_w + value * scale + 4:.1f}' y='{y + bar_h - 1}' class='val'>{value:.1f}</text>")
    parts.append(legend([name for name, _ in series], width - 210, 12))
    parts.append("</svg>")
    return "".join(parts)


def legend(names: list[str], x: int, y: int) -> str:
    out = []
    for k, name in enumerate(names):
        out.append(f"<rect x='{x + k * 70}' y='{y - 8}' width='10' height='10' fill='{COLORS[name]}'/>"
                   f"<text x='{x + k * 70 + 14}' y='{y + 1}' class='lbl'>{esc(name)}</text>")
    return "".join(out)


def loss_curves(curves: dict, width: int = 640, height: int = 220) -> str:
    """Training and eval loss against the step, on one set of axes."""
    points = [p for series in curves.values() for p in series]
    if not points:
        return "<p class='muted'>no training curves (train/plots/metrics/)</p>"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 48, 12, 20, 28

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [f"<svg class='chart' width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' "
             f"aria-label='loss curves'>",
             f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' class='axis'/>",
             f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' class='axis'/>",
             f"<text x='{left - 4}' y='{top + 4}' text-anchor='end' class='val'>{y1:.2f}</text>",
             f"<text x='{left - 4}' y='{height - bottom}' text-anchor='end' class='val'>{y0:.2f}</text>",
             f"<text x='{left}' y='{height - 8}' class='val'>step {x0:g}</text>",
             f"<text x='{width - right}' y='{height - 8}' text-anchor='end' class='val'>{x1:g}</text>"]
    for name, series in curves.items():
        if not series:
            continue
        if len(series) == 1:
            x, y = series[0]
            parts.append(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{COLORS[name]}'>"
                         f"<title>{name} {y:.3f} at step {x:g}</title></circle>")
        else:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in series)
            parts.append(f"<polyline points='{path}' fill='none' stroke='{COLORS[name]}' stroke-width='1.5'/>")
    parts.append(legend([n for n in curves if curves[n]], width - 170, 12))
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# Pages

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","WenQuanYi Micro Hei",sans-serif;margin:0;
     color:#1a202c;background:#f7fafc}
header{background:#2d3748;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:center}
header a{color:#e2e8f0;text-decoration:none}header a.on{color:#fff;font-weight:600;border-bottom:2px solid #90cdf4}
main{padding:16px 24px;max-width:1200px}
textarea{width:100%;min-height:140px;font-size:16px;box-sizing:border-box;padding:8px}
select,input[type=text]{font-size:14px;padding:4px;min-width:360px}
button{font-size:14px;padding:6px 14px;margin-right:6px;cursor:pointer}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #e2e8f0;padding:6px 10px;vertical-align:top}
th{background:#edf2f7;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
#aligned td.src{width:45%;color:#2d3748}#aligned td.tgt{width:55%}#aligned tr.line td{border-top:2px solid #a0aec0}
#aligned td.pending{color:#a0aec0}#aligned td.pass{color:#718096;font-style:italic}
.muted{color:#718096}.err{color:#c53030;font-weight:600}.row{margin:10px 0}
.chart text.lbl{font-size:12px}.chart text.val{font-size:10px;fill:#4a5568}.chart .axis{stroke:#718096}
.runs{display:flex;flex-wrap:wrap;gap:18px}.run{background:#fff;border:1px solid #e2e8f0;padding:10px;flex:1 1 560px}
progress{width:360px}
"""

TRANSLATE_JS = r"""
const $ = (id) => document.getElementById(id);
let output = "";
$("file").addEventListener("change", async (e) => {
  const f = e.target.files[0]; if (!f) return;
  $("text").value = await f.text(); $("filename").textContent = f.name;
});
$("model").addEventListener("change", () => { if ($("model").value) $("path").value = ""; });
function esc(s) { const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }
async function run() {
  const model = $("path").value.trim() || $("model").value;
  $("error").textContent = ""; $("aligned").innerHTML = ""; output = "";
  $("copy").disabled = true; $("download").disabled = true; $("go").disabled = true;
  $("status").textContent = "loading the model…"; $("bar").value = 0;
  try {
    const resp = await fetch("/api/translate", {method: "POST", headers: {"Content-Type": "application/json"},
                                                body: JSON.stringify({model: model, text: $("text").value})});
    const reader = resp.body.getReader(); const dec = new TextDecoder(); let buf = "";
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true}); let nl;
      while ((nl = buf.indexOf("\n")) >= 0) { handle(JSON.parse(buf.slice(0, nl))); buf = buf.slice(nl + 1); }
    }
  } catch (e) { $("error").textContent = "error: " + e; }
  $("go").disabled = false;
}
function handle(m) {
  if (m.event === "plan") {
    $("bar").max = Math.max(m.total, 1);
    const rows = [];
    m.lines.forEach((pieces, n) => {
      if (!pieces.length) rows.push(`<tr class="line" data-line="${n}"><td class="src"></td><td class="tgt"></td></tr>`);
      pieces.forEach((p, k) => {
        const cls = k === 0 ? "line" : "";
        const tgt = p.i === null ? `<td class="tgt pass">${esc(p.source)}</td>`
                                 : `<td class="tgt pending" id="t${p.i}">…</td>`;
        rows.push(`<tr class="${cls}" data-line="${n}"><td class="src">${esc(p.source)}</td>${tgt}</tr>`);
      });
    });
    $("aligned").innerHTML = rows.join("");
    $("status").textContent = `0 / ${m.total} sentences`;
  } else if (m.event === "piece") {
    const td = $("t" + m.i); td.textContent = m.text; td.classList.remove("pending");
    $("bar").value = m.done; $("status").textContent = `${m.done} / ${m.total} sentences`;
  } else if (m.event === "done") {
    output = m.output; $("copy").disabled = false; $("download").disabled = false;
    $("status").textContent = `done: ${m.total} sentences in ${m.seconds.toFixed(1)} s (${m.model})`;
    $("bar").value = $("bar").max;
  } else if (m.event === "error") {
    $("error").textContent = "error: " + m.message; $("status").textContent = "";
  }
}
$("go").addEventListener("click", run);
$("copy").addEventListener("click", async () => {
  try { await navigator.clipboard.writeText(output); $("status").textContent = "copied"; }
  catch (e) { const t = document.createElement("textarea"); t.value = output; document.body.appendChild(t);
              t.select(); document.execCommand("copy"); t.remove(); $("status").textContent = "copied"; }
});
$("download").addEventListener("click", () => {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([output], {type: "text/plain;charset=utf-8"}));
  const name = $("filename").textContent; a.download = name ? name.replace(/\.txt$/, "") + ".modern.txt" : "translation.txt";
  a.click(); setTimeout(() => URL.revokeObjectURL(a.href), 1000);
});
"""


def page(title: str, active: str, body: str, script: str = "") -> str:
    nav = "".join(f"<a href='{href}' class='{'on' if key == active else ''}'>{label}</a>"
                  for key, href, label in (("translate", "/", "Translate"), ("runs", "/runs", "Runs")))
    return (f"<!doctype html><html lang='zh'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><link rel='icon' href='data:,'>"
            f"<style>{STYLE}</style></head><body><header><strong>wenyan-mt</strong>{nav}</header><main>{body}</main>"
            + (f"<script>{script}</script>" if script else "") + "</body></html>")


def translate_page(models: list[dict]) -> str:
    options = "".join(f"<option value='{esc(m['path'])}'>{esc(m['path'])} — {esc(m['kind'])}</option>" for m in models)
    if not options:
        options = "<option value=''>(no trained model under models/: type a path)</option>"
    body = f"""
<h2>Translate 文言文 → 现代汉语</h2>
<div class='row'><label>Model <select id='model'>{options}</select></label>
 <label>or a path <input type='text' id='path' placeholder='models/export/model-Q8_0.gguf or a model directory'></label></div>
<div class='row'><textarea id='text' placeholder='粘贴文言文，或选择一个 .txt 文件'></textarea></div>
<div class='row'><input type='file' id='file' accept='.txt,text/plain'> <span id='filename' class='muted'></span></div>
<div class='row'><button id='go'>Translate</button><button id='copy' disabled>Copy</button>
 <button id='download' disabled>Download</button> <progress id='bar' value='0' max='1'></progress>
 <span id='status' class='muted'></span> <span id='error' class='err'></span></div>
<table id='aligned'></table>
"""
    return page("wenyan-mt: translate", "translate", body, TRANSLATE_JS)


def runs_page(runs: list[dict]) -> str:
    if not runs:
        return page("wenyan-mt: runs", "runs", "<p>No runs: reports/metrics.json and reports/runs/*/metrics.json are missing.</p>")
    head = ("<tr><th>run</th><th>test sentences</th><th>BLEU</th><th>95% CI</th><th>chrF</th><th>copy BLEU / chrF</th>"
            "<th>base BLEU / chrF</th><th>BLEU − copy</th><th>train steps</th><th>eval loss</th></tr>")
    rows = []
    for run in runs:
        m = run["metrics"]
        base, copy = (m.get("baselines") or {}).get("base") or {}, (m.get("baselines") or {}).get("copy") or {}
        ci = m.get("bleu_ci95") or {}
        gain = None if m.get("bleu") is None or copy.get("bleu") is None else m["bleu"] - copy["bleu"]
        rows.append(
            f"<tr data-run='{esc(run['name'])}'><td>{esc(run['name'])}</td><td class='num'>{esc(m.get('n_sentences', '-'))}</td>"
            f"<td class='num bleu'><strong>{number(m.get('bleu'))}</strong></td>"
            f"<td class='num'>{number(ci.get('low'))}–{number(ci.get('high'))}</td><td class='num chrf'>{number(m.get('chrf'))}</td>"
            f"<td class='num'>{number(copy.get('bleu'))} / {number(copy.get('chrf'))}</td>"
            f"<td class='num'>{number(base.get('bleu'))} / {number(base.get('chrf'))}</td>"
            f"<td class='num'>{'-' if gain is None else f'{gain:+.2f}'}</td>"
            f"<td class='num'>{esc(run['train'].get('step', '-'))}</td>"
            f"<td class='num'>{number((run['train'].get('eval') or {}).get('loss'), 3)}</td></tr>")
    sig = next((r["bleu_signature"] for r in runs if r["bleu_signature"]), "")
    cards = "".join(
        f"<div class='run'><h3>{esc(run['name'])}</h3><p class='muted'>{esc(run['folder'])}</p>"
        f"<h4>BLEU by book (model, base, copy)</h4>{book_bars(run['by_book'])}"
        f"<h4>Loss</h4>{loss_curves(run['curves'])}</div>" for run in runs)
    body = (f"<h2>Runs</h2><table id='runs'>{head}{''.join(rows)}</table>"
            f"<p class='muted'>sacrebleu {esc(sig)}. copy = the source sentence as its own translation; base = the untuned "
            f"model with the same prompts. From metrics.json, evaluate/scores.csv and by_book.csv and train/ of each folder.</p>"
            f"<div class='runs'>{cards}</div>")
    return page("wenyan-mt: runs", "runs", body)


# ----------------------------------------------------------------------------------------------
# The app


class Models:
    """Translators by model path, loaded once; one translation at a time (the CPU is the limit)."""

    def __init__(self, parallel: int, threads: int | None):
        self.parallel, self.threads = parallel, threads
        self.cache: dict[str, object] = {}
        self.lock = threading.Lock()

    def get(self, path: str):
        from wenyan.translation import Translator

        if path not in self.cache:
            self.cache[path] = Translator(Path(path), parallel=self.parallel, threads=self.threads)
        return self.cache[path]


def translate_events(models: Models, model: str, text: str):
    """NDJSON lines: plan (the aligned layout), one piece per translated sentence as it is done, then done."""
    events: queue.Queue = queue.Queue()

    def work():
        started = time.perf_counter()
        try:
            with models.lock:
                translator = models.get(model)
                plan = translator.plan(text, "text")
                k = iter(range(len(plan.pieces)))
                lines = [[{"source": p, "i": next(k) if translator_has_text(p) else None} for p in pieces]
                         for pieces in plan.planned]
                events.put({"event": "plan", "lines": lines, "total": len(plan.pieces)})
                done = [0]

                def on_result(i, translation):
                    done[0] += 1
                    events.put({"event": "piece", "i": i, "text": translation, "done": done[0], "total": len(plan.pieces)})

                out = translator.translate(plan, on_result)
            events.put({"event": "done", "output": "".join(line + "\n" for line in out), "total": len(plan.pieces),
                        "seconds": time.perf_counter() - started, "model": model})
        except PipelineError as exc:
            events.put({"event": "error", "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - shown on the page, logged in full here
            log.exception("translation failed")
            events.put({"event": "error", "message": f"{type(exc).__name__}: {exc}"})
        events.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (item := events.get()) is not None:
        yield json.dumps(item, ensure_ascii=False) + "\n"


def translator_has_text(piece: str) -> bool:
    from wenyan.translation import has_text

    return has_text(piece)


def make_app(root: Path, given: list[Path], parallel: int = 16, threads: int | None = None):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    models = Models(parallel, threads)
    reports = root / "reports"

    async def index(request: Request):
        return HTMLResponse(translate_page(find_models(root, given)))

    async def runs(request: Request):
        return HTMLResponse(runs_page(load_runs(reports)))

    async def api_models(request: Request):
        return JSONResponse(find_models(root, given))

    async def api_runs(request: Request):
        return JSONResponse([{k: v for k, v in r.items() if k != "curves"} for r in load_runs(reports)])

    async def api_translate(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the request body must be JSON {model, text}"}, status_code=400)
        model, text = str(body.get("model") or "").strip(), body.get("text")
        if not model or not isinstance(text, str):
            return JSONResponse({"error": "give a model path and a text"}, status_code=400)
        if len(text) > MAX_TEXT_CHARS:
            return JSONResponse({"error": f"the text has {len(text)} characters; the page takes at most {MAX_TEXT_CHARS} "
                                          f"(use wenyan-translate --input for a whole book)"}, status_code=413)
        path = Path(model) if Path(model).is_absolute() else root / model
        return StreamingResponse(translate_events(models, str(path), text), media_type="application/x-ndjson")

    return Starlette(routes=[Route("/", index), Route("/runs", runs), Route("/api/models", api_models),
                             Route("/api/runs", api_runs), Route("/api/translate", api_translate, methods=["POST"])])


def serve(app, host: str, port: int, ready=None) -> None:
    """Run uvicorn on an already bound socket, so that port 0 gives a free port and the address printed is real."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise PipelineError(f"cannot listen on {host}:{port} ({exc.strerror}); give another --port (0 = any free one)") from None
    address = f"http://{host}:{sock.getsockname()[1]}/"
    print(f"wenyan-mt page: {address}  (Ctrl+C stops it)", flush=True)
    if ready is not None:
        ready(address)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    server.run(sockets=[sock])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", "-m", type=Path, action="append", default=[],
                        help="a trained model directory or exported .gguf to offer first (repeatable)")
    parser.add_argument("--root", type=Path, default=Path("."), help="the project directory (models/, reports/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = a free one)")
    parser.add_argument("--parallel", type=int, default=16, help="GGUF: sentences llama.cpp decodes at once")
    parser.add_argument("--threads", type=int, default=None, help="GGUF: CPU threads (default: all)")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        raise PipelineError(f"--parallel must be >= 1; got {args.parallel}")
    for path in args.model:
        if not path.exists():
            raise PipelineError(f"{path}: model not found (a trained model directory or an exported .gguf)")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise PipelineError(f"the web page needs {exc.name}: pip install -e .") from None
    serve(make_app(args.root.resolve(), args.model, args.parallel, args.threads), args.host, args.port)


def cli() -> None:
    from wenyan import gguf

    gguf.quiet_openmp()
    run_main(main)


if __name__ == "__main__":
    cli()
