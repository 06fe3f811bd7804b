"""The local web page (tools/serve.py): its pages and API in-process, and end to end in a real headless Chromium
(Selenium + the system's chromium and chromedriver): translate two sentences with a tiny model, the aligned output,
the runs view's numbers from a committed metrics.json, and no request to anything but the page's own server;
the runs view's nested runs (reports/runs/<run>/<arm>), its DVC experiments (a tiny git + DVC project made in the
test, two `dvc exp run -S`) and its model/copy/base colours (those of .dvc/plots/*.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import REPO

from tools import serve
from tools.plots import requested_urls

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny tensors gain nothing from threads

TWO = "子曰：学而时习之，不亦说乎？有朋自远方来，不亦乐乎？"
RUN = "h200-cjk-vocab-full-2ep"  # a committed run: reports/runs/<RUN>/metrics.json
ARM = "h200-pretrain-arms/C"  # a committed nested run: reports/runs/<run>/<arm>/metrics.json
# Screenshots go to the test's tmp_path, or to WENYAN_SCREENSHOTS (reports/screenshots/ holds the committed ones)
SCREENSHOTS_ENV = "WENYAN_SCREENSHOTS"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("serve"))


def expected_pieces(model: Path, text: str) -> list[str]:
    """What the translate command produces for each sentence (the same Translator, in-process)."""
    from wenyan.translation import Translator

    translator = Translator(model)
    plan = translator.plan(text)
    got = {}
    translator.translate(plan, lambda i, t: got.__setitem__(i, t))
    return [got[i] for i in range(len(plan.pieces))]


# ----------------------------------------------------------------------------------------------
# In-process (Starlette's test client)


BASE = "http://127.0.0.1:8765"  # the page's own address: its Host and Origin


def client(root: Path, models: list[Path], **settings):
    from starlette.testclient import TestClient

    return TestClient(serve.make_app(root, models, **settings), base_url=BASE)


def test_translate_api_streams_plan_pieces_and_the_output(tiny_model):
    with client(REPO, [tiny_model]) as c:
        resp = c.post("/api/translate", json={"model": str(tiny_model), "text": TWO + "\n\n……"})
        assert resp.status_code == 200
        events = [json.loads(line) for line in resp.text.splitlines()]
    assert events[0]["event"] == "plan" and events[0]["total"] == 2
    assert [[p["source"] for p in line] for line in events[0]["lines"]] == [
        ["子曰：学而时习之，不亦说乎？", "有朋自远方来，不亦乐乎？"], [], ["……"]]
    pieces = [e for e in events if e["event"] == "piece"]
    assert sorted(e["i"] for e in pieces) == [0, 1] and pieces[-1]["done"] == 2
    done = events[-1]
    assert done["event"] == "done"
    texts = {e["i"]: e["text"] for e in pieces}
    assert done["output"] == texts[0] + texts[1] + "\n\n……\n"  # one output line per input line, as the command writes
    assert [texts[0], texts[1]] == expected_pieces(tiny_model, TWO)


def test_translate_api_errors_are_one_line(tmp_path):
    (tmp_path / "models").mkdir()
    with client(tmp_path, []) as c:
        events = [json.loads(x) for x in c.post("/api/translate", json={"model": "models/nope", "text": "子曰。"}).text.splitlines()]
        assert events == [{"event": "error", "message": f"{serve.real_path(tmp_path) / 'models' / 'nope'}: model directory not found; train one "
                           "first (dvc repro train) or pass --model DIR (models/adapter from the train stage, models/export/hf "
                           "from the export stage)"}]
        assert c.post("/api/translate", content=b"not json").status_code == 400


def committed_runs() -> list[str]:
    """Every folder under reports/runs/ with a metrics.json, by its path there, but a run's own train/ (or
    evaluate/, pretrain/) report; in the page's order: the top-level runs, then each parent folder's arms."""
    runs = REPO / "reports" / "runs"
    folders = {p.parent.relative_to(runs).as_posix() for p in runs.rglob("metrics.json")}
    found = [f for f in folders if not (f.rpartition("/")[2] in ("train", "evaluate", "pretrain") and f.rpartition("/")[0] in folders)]
    return sorted(found, key=lambda f: (f.split("/")[:-1], f))


def test_runs_view_has_every_committed_run_with_its_numbers():
    with client(REPO, [], experiments=False) as c:  # no dvc exp show in this repository (the tiny repo below has it)
        page = c.get("/runs").text
        runs = c.get("/api/runs").json()
    committed = committed_runs()
    assert ARM in committed and f"{ARM}/train" not in committed  # nested arms, not their own train/ reports
    assert [r["name"] for r in runs] == ["current (reports/)"] + committed
    assert [r["group"] for r in runs] == [""] + [n.rpartition("/")[0] for n in committed]
    by_book = curves = 0
    for folder in [REPO / "reports"] + [REPO / "reports" / "runs" / n for n in committed]:
        m = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        if "bleu" not in m:  # a pretrain run or a speed arm: its row says so
            assert f"<tr data-run='{folder.relative_to(REPO / 'reports' / 'runs').as_posix()}' class='other'>" in page
            continue
        assert f"<strong>{m['bleu']:.2f}</strong>" in page
        assert f"{m['baselines']['copy']['bleu']:.2f} / {m['baselines']['copy']['chrf']:.2f}" in page
        by_book += (folder / "evaluate" / "by_book.csv").is_file()
    for folder in [REPO / "reports"] + [REPO / "reports" / "runs" / n for n in committed]:
        curves += any((folder / p).is_file() for p in ("train/plots/metrics/train/loss.tsv", "plots/metrics/train/loss.tsv",
                                                       "loss.tsv", "train/plots/metrics/eval/loss.tsv"))
    assert page.count("aria-label='BLEU by book'") == by_book and page.count("aria-label='loss curves'") == curves
    for group in {r["group"] for r in runs} - {""}:
        assert page.count(f"<tr class='group' data-group='{group}'>") == 1, group  # each parent's arms together


def test_pages_reference_nothing_outside_the_server(tiny_model):
    with client(REPO, [tiny_model], experiments=False) as c:
        for url in ("/", "/runs"):
            text = c.get(url).text
            assert "://" not in text, url  # no absolute URL at all: fonts, scripts and plots are inline
            assert "<script src" not in text and "<link rel='stylesheet'" not in text and "@import" not in text, url


# ----------------------------------------------------------------------------------------------
# In a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
NO_CHROMIUM = "no chromium + chromedriver on PATH (the README's set-up installs them: apt-get install chromium chromium-driver)"


def needs_chromium(test):
    """Skipped, visibly, without Chromium; under CI (CI=true, as .ci/run sets) its absence is a failure instead:
    the README's set-up installs it, so a CI run without it has not tested the page."""
    if CHROMIUM and CHROMEDRIVER:
        return test
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return pytest.mark.usefixtures("chromium_required")(test)
    return pytest.mark.skip(reason=NO_CHROMIUM)(test)


@pytest.fixture
def chromium_required():
    pytest.fail(NO_CHROMIUM)


@pytest.fixture
def server(tiny_model, tmp_path):
    """python -m tools.serve on a free port, in a subprocess; yields its address."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tools.serve", "--port", "0", "--root", str(REPO), "--model", str(tiny_model),
           "--no-experiments"]  # no dvc exp show in this repository
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(tmp_path / "serve.log", "wb"), env=env, cwd=REPO)
    try:
        line = proc.stdout.readline().decode()
        assert "http://127.0.0.1:" in line, (tmp_path / "serve.log").read_text()
        yield line.split()[2]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-default-apps", "--disable-extensions", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def not_local(urls: list[str], address: str) -> list[str]:
    """URLs that would leave the machine: any but the page's own server, data: and blob: URLs, and the browser's
    built-in chrome:// pages (its new-tab page loads those from inside the browser before the test's first page)."""
    own = urlparse(address).netloc
    return [u for u in urls if not (urlparse(u).scheme in ("data", "blob", "about", "chrome") or urlparse(u).netloc == own)]


@needs_chromium
def test_in_chromium_translate_two_sentences_then_the_runs_view(server, tiny_model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    expected = expected_pieces(tiny_model, TWO)
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    driver = browser(tmp_path)
    try:
        driver.get(server)
        Select(driver.find_element(By.ID, "model")).select_by_value(str(tiny_model))
        driver.find_element(By.ID, "text").send_keys(TWO)
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "status").text.startswith("done")
                                         or d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "error").text == ""
        rows = driver.find_elements(By.CSS_SELECTOR, "#aligned tr")
        cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
        # each sentence beside its own translation, in order (what the translate command gives for it)
        assert [c[0] for c in cells] == ["子曰：学而时习之，不亦说乎？", "有朋自远方来，不亦乐乎？"]
        assert [c[1] for c in cells] == [t.strip() for t in expected]
        assert driver.find_element(By.ID, "status").text.startswith("done: 2 sentences")
        assert driver.find_element(By.ID, "download").is_enabled() and driver.find_element(By.ID, "copy").is_enabled()
        driver.save_screenshot(str(shots / "translate.png"))

        driver.find_element(By.ID, "path").send_keys("/etc")  # refused (403): the page says why
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "error").text)
        assert "/etc: not one of this project's models" in driver.find_element(By.ID, "error").text

        driver.get(server.rstrip("/") + "/runs")
        m = json.loads((REPO / "reports" / "runs" / RUN / "metrics.json").read_text(encoding="utf-8"))
        row = driver.find_element(By.CSS_SELECTOR, f"#runs tr[data-run='{RUN}']")
        assert row.find_element(By.CSS_SELECTOR, "td.bleu").text == f"{m['bleu']:.2f}"
        assert row.find_element(By.CSS_SELECTOR, "td.chrf").text == f"{m['chrf']:.2f}"
        assert f"{m['baselines']['copy']['bleu']:.2f} / {m['baselines']['copy']['chrf']:.2f}" in row.text
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.chart")) >= 2
        arm = json.loads((REPO / "reports" / "runs" / ARM / "metrics.json").read_text(encoding="utf-8"))
        nested = driver.find_element(By.CSS_SELECTOR, f"#runs tr[data-run='{ARM}']")
        assert nested.find_element(By.CSS_SELECTOR, "td.bleu").text == f"{arm['bleu']:.2f}"
        driver.save_screenshot(str(shots / "runs.png"))
        urls = requested_urls(driver)
    finally:
        driver.quit()
    assert any(u.endswith("/runs") for u in urls) and len(urls) >= 3, urls  # the log really saw the page's requests
    assert not_local(urls, server) == [], f"the page asked for non-local URLs: {not_local(urls, server)}"


def test_the_bleu_signature_comes_from_scores_csv_or_an_old_metrics_json(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    (new / "evaluate").mkdir(parents=True)
    old.mkdir()
    (new / "metrics.json").write_text(json.dumps({"bleu": 20.0, "chrf": 30.0, "baselines": {}}), encoding="utf-8")
    (new / "evaluate" / "scores.csv").write_text(
        "system,n,bleu,chrf,bleu_signature\ncopy,8,1.0,2.0,copy-sig\nmodel,8,20.0,30.0,nrefs:1|tok:zh|new\n",
        encoding="utf-8")
    (old / "metrics.json").write_text(json.dumps({"bleu": 10.0, "chrf": 20.0, "baselines": {},
                                                  "bleu_signature": "nrefs:1|tok:zh|old"}), encoding="utf-8")
    assert serve.load_run("new", new)["bleu_signature"] == "nrefs:1|tok:zh|new"  # the model's row, not copy's
    assert serve.load_run("old", old)["bleu_signature"] == "nrefs:1|tok:zh|old"
    assert "nrefs:1|tok:zh|new" in serve.runs_page([serve.load_run("new", new), serve.load_run("old", old)])


# ----------------------------------------------------------------------------------------------
# Hardening (issue 29): other sites, typed paths, bodies, abandoned jobs, damaged reports, a bad --port


def asgi(app, method: str, path: str, headers: dict | list = (), chunks: list[bytes] = (b"",)):
    """One request straight to the ASGI app, headers exactly as given (none added): (status, body, how many
    times the app asked for the request body)."""
    import asyncio

    headers = list(headers.items()) if isinstance(headers, dict) else list(headers)
    chunks, sent, asked = list(chunks), [], [0]

    async def call():
        done = asyncio.Event()

        async def receive():
            asked[0] += 1
            if chunks:
                body = chunks.pop(0)
                return {"type": "http.request", "body": body, "more_body": bool(chunks)}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8765)}
        await app(scope, receive, send)

    asyncio.run(call())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), asked[0]


def post_json(app, value, headers: dict | None = None):
    body = json.dumps(value).encode()
    given = {"host": "127.0.0.1:8765", "content-type": "application/json", "content-length": str(len(body)), **(headers or {})}
    return asgi(app, "POST", "/api/translate", {k: v for k, v in given.items() if v is not None}, [body])


LOCAL_HOSTS = ["127.0.0.1:8765", "localhost:8765", "[::1]:8765", "LocalHost:8765", "127.0.0.1", "localhost", "[::1]",
               "localhost:1"]
FOREIGN_HOSTS = ["evil.com", "evil.com:8765", "localhost.evil.com", "localhost.evil.com:8765", "127.0.0.1.evil.com",
                 "127.0.0.1.nip.io:8765", "::1", "[::1", "localhost:99999", "localhost:0", "localhost:", "a@localhost:8765",
                 "localhost:8765/x", "localhost 8765", "", "0.0.0.0:8765", "[::2]:8765"]


@pytest.mark.parametrize("host", LOCAL_HOSTS)
def test_the_page_answers_to_this_machines_names(tmp_path, host):
    app = serve.make_app(tmp_path, [])
    for url in ("/", "/runs", "/api/models", "/api/runs", "/api/experiments"):
        assert asgi(app, "GET", url, {"host": host})[0] == 200, url


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_a_foreign_host_is_refused_dns_rebinding(tmp_path, host):
    app = serve.make_app(tmp_path, [])
    for url in ("/", "/runs", "/api/models", "/api/runs", "/api/experiments"):
        status, body, _ = asgi(app, "GET", url, {"host": host})
        assert status == 403 and "is not this machine" in json.loads(body)["error"], url
    status, _, asked = post_json(app, {"model": "models/x", "text": "子曰。"}, {"host": host})
    assert status == 403 and asked == 0  # refused before the body is read


def test_a_missing_or_doubled_host_is_refused(tmp_path):
    app = serve.make_app(tmp_path, [])
    assert asgi(app, "GET", "/", {})[0] == 403
    assert asgi(app, "GET", "/", [("host", "127.0.0.1:8765"), ("host", "evil.com")])[0] == 403


def test_host_given_with_host_is_allowed_too(tmp_path):
    app = serve.make_app(tmp_path, [], hosts=("192.168.1.5",))
    assert asgi(app, "GET", "/", {"host": "192.168.1.5:8765"})[0] == 200
    assert asgi(app, "GET", "/", {"host": "192.168.1.6:8765"})[0] == 403


FOREIGN_ORIGINS = ["http://evil.com", "null", "http://127.0.0.1:9999", "https://127.0.0.1:8765", "http://localhost:8765",
                   "http://127.0.0.1:8765.evil.com", "http://evil.com/http://127.0.0.1:8765", "http://127.0.0.1:8765/x",
                   "file://", "", "http://127.0.0.1:8765@evil.com"]


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
def test_a_request_from_another_origin_is_refused(tmp_path, origin):
    app = serve.make_app(tmp_path, [])
    status, body, asked = post_json(app, {"model": "models/x", "text": "子曰。"}, {"origin": origin})
    assert status == 403 and "not this page's own" in json.loads(body)["error"] and asked == 0
    assert asgi(app, "GET", "/api/runs", {"host": "127.0.0.1:8765", "origin": origin})[0] == 403


def test_the_pages_own_origin_and_no_origin_pass(tmp_path):
    app = serve.make_app(tmp_path, [])
    bad_body = {"model": "", "text": "子曰。"}  # gets past the checks to the handler's own 400
    assert post_json(app, bad_body, {"origin": "http://127.0.0.1:8765"})[0] == 400
    assert post_json(app, bad_body, {"origin": "HTTP://127.0.0.1:8765", "host": "127.0.0.1:8765"})[0] == 400
    assert post_json(app, bad_body, {"origin": "http://localhost", "host": "localhost:80"})[0] == 400
    assert post_json(app, bad_body)[0] == 400  # no Origin: curl, or a same-origin GET
    assert post_json(app, bad_body, {"sec-fetch-site": "same-origin"})[0] == 400
    assert post_json(app, bad_body, {"sec-fetch-site": "cross-site"})[0] == 403  # a browser that left Origin out
    assert asgi(app, "GET", "/", {"host": "127.0.0.1:8765", "sec-fetch-site": "cross-site"})[0] == 200  # a link


def test_a_cross_site_form_cannot_post(tmp_path):
    """A form another site submits can only be text/plain, urlencoded or multipart: refused before reading."""
    app = serve.make_app(tmp_path, [])
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        status, _, asked = post_json(app, {"model": "models/x", "text": "子曰。"}, {"content-type": kind})
        assert status == 400 and asked == 0, kind


@pytest.fixture
def project(tmp_path, tiny_model):
    """A project whose models/adapter is a copy of the tiny model; the original stays outside it."""
    root = tmp_path / "project"
    shutil.copytree(tiny_model, root / "models" / "adapter")
    (root / "models" / "export").mkdir()
    return root


def translate(c, model: str, text: str = TWO):
    resp = c.post("/api/translate", json={"model": model, "text": text})
    return resp.status_code, [json.loads(line) for line in resp.text.splitlines()] if resp.status_code == 200 else resp.json()


def test_models_load_only_from_the_projects_models_and_those_given(project, tiny_model, tmp_path):
    (project / "models" / "link").symlink_to(tiny_model, target_is_directory=True)  # a link out of models/
    (project / "models" / "export" / "x.gguf").symlink_to(tmp_path / "outside.gguf")
    (project / "elsewhere").mkdir()
    refused = [str(tiny_model), os.path.relpath(tiny_model, project), "models/../elsewhere", "models/adapter/../..",
               "models/link", "models/link/", str(project / "models" / "link"), "models/export/x.gguf", "/etc",
               "/etc/passwd", "..", ".", "models/../../project/elsewhere", "models\x00/adapter", "~/models/adapter"]
    with client(project, []) as c:
        for spelling in refused:
            status, body = translate(c, spelling)
            assert status == 403 and "not" in body["error"], spelling
        assert c.app.state.models.cache == {}
        assert [m["path"] for m in c.get("/api/models").json()] == [str(project / "models" / "adapter")]
    with client(project, [tiny_model]) as c:  # given with --model: allowed
        status, events = translate(c, str(tiny_model))
        assert status == 200 and events[-1]["event"] == "done"


def test_every_spelling_of_a_model_is_one_loaded_model(project, tmp_path):
    adapter = project / "models" / "adapter"
    (tmp_path / "alias").symlink_to(adapter, target_is_directory=True)  # a link into models/: its real path is inside
    (project / "models" / "alias").symlink_to(adapter, target_is_directory=True)
    spellings = ["models/adapter", "models/adapter/", str(adapter), "./models/adapter", "models/x/../adapter",
                 "models/export/../adapter", str(tmp_path / "alias"), "models/alias", str(project / "models" / "alias") + "/"]
    with client(project, []) as c:
        outputs = set()
        for spelling in spellings:
            status, events = translate(c, spelling)
            assert status == 200 and events[-1]["event"] == "done", (spelling, events[-1])
            outputs.add(events[-1]["output"])
        assert list(c.app.state.models.cache) == [str(serve.real_path(adapter))]
        assert len(outputs) == 1
        assert [m["path"] for m in c.get("/api/models").json()] == [str(adapter)]  # not once per link


def test_a_changed_or_deleted_model_is_dropped_from_memory(project):
    adapter = project / "models" / "adapter"
    with client(project, []) as c:
        models = c.app.state.models
        assert translate(c, "models/adapter")[1][-1]["event"] == "done"
        first = models.cache[str(adapter)][1]
        assert translate(c, "models/adapter")[1][-1]["event"] == "done"
        assert models.cache[str(adapter)][1] is first  # unchanged: kept
        config = adapter / "training_config.json"
        os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**10))  # retrained
        assert translate(c, "models/adapter")[1][-1]["event"] == "done"
        second = models.cache[str(adapter)][1]
        assert second is not first
        (adapter / "extra.json").write_text("{}", encoding="utf-8")  # a file more: changed too
        assert translate(c, "models/adapter")[1][-1]["event"] == "done"
        assert models.cache[str(adapter)][1] is not second
        shutil.rmtree(adapter)  # deleted: no answer from memory
        status, events = translate(c, "models/adapter")
        assert status == 200 and events == [{"event": "error", "message": f"{adapter}: model directory not found; train one "
                                            "first (dvc repro train) or pass --model DIR (models/adapter from the train "
                                            "stage, models/export/hf from the export stage)"}]
        assert models.cache == {}


def test_only_the_last_models_used_stay_loaded(project):
    for name in ("b", "c"):
        shutil.copytree(project / "models" / "adapter", project / "models" / name)
    with client(project, []) as c:
        for name in ("adapter", "b", "c", "b"):
            assert translate(c, f"models/{name}")[1][-1]["event"] == "done"
        assert [Path(k).name for k in c.app.state.models.cache] == ["c", "b"]  # MODELS_KEPT, least recently used first


LENGTHS = [(None, 411), ("-1", 400), ("abc", 400), ("1e3", 400), ("0x10", 400), ("+5", 400), ("", 400), ("5, 6", 400),
           (str(serve.MAX_BODY_BYTES + 1), 413), ("9" * 30, 413)]


@pytest.mark.parametrize("length,status", LENGTHS)
def test_a_body_without_a_sane_content_length_is_refused_before_reading(tmp_path, length, status):
    app = serve.make_app(tmp_path, [])
    headers = {"host": "127.0.0.1:8765", "content-type": "application/json"}
    if length is not None:
        headers["content-length"] = length
    got, body, asked = asgi(app, "POST", "/api/translate", headers, [b'{"model": "models/x", "text": "a"}'])
    assert (got, asked) == (status, 0) and json.loads(body)["error"]


def test_two_content_lengths_are_refused(tmp_path):
    app = serve.make_app(tmp_path, [])
    headers = [("host", "127.0.0.1:8765"), ("content-type", "application/json"), ("content-length", "2"),
               ("content-length", "3")]
    assert asgi(app, "POST", "/api/translate", headers, [b"{}"])[::2] == (400, 0)


def test_reading_stops_at_the_content_length(tmp_path):
    app = serve.make_app(tmp_path, [])
    headers = {"host": "127.0.0.1:8765", "content-type": "application/json", "content-length": "10"}
    status, body, asked = asgi(app, "POST", "/api/translate", headers, [b"x" * 1000] * 1000)
    assert status == 400 and "longer than its Content-Length" in json.loads(body)["error"] and asked == 1
    status, body, _ = asgi(app, "POST", "/api/translate", {**headers, "content-length": "100"}, [b"{}"])
    assert status == 400 and "shorter" in json.loads(body)["error"]


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"null", b'{"model": ["models/x"], "text": "a"}',
                                  b'{"model": "models/x", "text": 5}', b'{"model": "models/x"}', b'{"text": "\xff"}',
                                  b"[" * 100_000, b'{"model": {"a": 1}, "text": "a"}',
                                  b'{"model": "models/x", "text": "\\ud800"}', b'{"model": "models/\\udfff", "text": "a"}'])
def test_a_body_that_is_not_model_and_text_is_400(tmp_path, body):
    app = serve.make_app(tmp_path, [])
    headers = {"host": "127.0.0.1:8765", "content-type": "application/json", "content-length": str(len(body))}
    status, answer, _ = asgi(app, "POST", "/api/translate", headers, [body])
    assert status == 400 and json.loads(answer)["error"]


def test_a_text_over_the_limit_is_413(tmp_path):
    with client(tmp_path, []) as c:
        resp = c.post("/api/translate", json={"model": "models/x", "text": "子" * (serve.MAX_TEXT_CHARS + 1)})
        assert resp.status_code == 413 and "at most" in resp.json()["error"]


MANY = (TWO + "\n") * 2000  # 4,000 sentences: ~40 s for the tiny model, far longer than any test waits


def test_a_cancelled_job_stops_at_the_next_token_and_frees_the_model(project):
    path = serve.real_path(project / "models" / "adapter")
    models = serve.Models(16, None)
    with models.lock:
        model = models.get(path).load()
    job, events, forwards = serve.Job(600), [], []

    def page_closed(module, args):  # runs before the job's own hook: the page goes away during the first token
        forwards.append(1)
        job.cancel("the page was closed")

    mine = model.register_forward_pre_hook(page_closed)
    try:
        serve.run_job(models, path, MANY, job, events.append)
    finally:
        mine.remove()
    assert events[0]["event"] == "plan" and events[-1] is None
    assert events[-2] == {"event": "error", "message": "translation stopped: the page was closed"}
    assert forwards == [1] and not any(e["event"] == "piece" for e in events[:-1])  # not even the first batch's end
    assert not models.lock.locked() and not model._forward_pre_hooks  # the lock and the job's hook are gone with it

    job, events = serve.Job(600), []  # cancelled between sentences (as llama.cpp is): stops at the next one
    serve.run_job(models, path, TWO, job, lambda e: (events.append(e), e and e["event"] == "plan" and job.cancel("gone")))
    assert [e and e["event"] for e in events] == ["plan", "error", None] and not models.lock.locked()


def test_a_job_waiting_for_the_model_gives_up_when_cancelled_or_timed_out(project):
    models = serve.Models(16, None)
    path = serve.real_path(project / "models" / "adapter")
    models.lock.acquire()  # another job holds the model
    try:
        job, events = serve.Job(0.3), []
        serve.run_job(models, path, TWO, job, events.append)
        assert events == [{"event": "error", "message": "translation stopped: it ran past 0.3 s (--timeout)"}, None]
        job, events = serve.Job(600), []
        job.cancel("the page was closed")
        serve.run_job(models, path, TWO, job, events.append)
        assert events[0]["message"] == "translation stopped: the page was closed"
        assert models.lock.locked()  # still the other job's: a job that never got it releases nothing
    finally:
        models.lock.release()


def test_a_job_past_its_timeout_stops(project):
    import time

    with client(project, [], timeout=2.0) as c:
        started = time.monotonic()
        status, events = translate(c, "models/adapter", MANY)
        assert status == 200 and time.monotonic() - started < 30
        assert events[0]["event"] == "plan" and events[-1] == {
            "event": "error", "message": "translation stopped: it ran past 2 s (--timeout)"}
        assert sum(e["event"] == "piece" for e in events) < events[0]["total"]
        assert not c.app.state.models.lock.locked()
        assert translate(c, "models/adapter")[1][-1]["event"] == "done"  # the next job gets the model


@pytest.fixture
def live(project):
    """The app on a real uvicorn server in a thread (client disconnects are real): yields (app, port)."""
    import threading
    import time

    import uvicorn

    app = serve.make_app(project, [])
    sock = serve.bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield app, sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(20)


def test_a_client_that_goes_away_frees_the_model(live):
    import http.client
    import socket
    import time

    app, port = live
    body = json.dumps({"model": "models/adapter", "text": MANY}).encode()
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(f"POST /api/translate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    seen = b""
    while b'"event": "piece"' not in seen:  # the job is translating
        chunk = conn.recv(65536)
        assert chunk, seen[-500:]
        seen += chunk
    assert app.state.models.lock.locked()
    conn.close()  # the page closed
    started = time.monotonic()
    while app.state.models.lock.locked() and time.monotonic() - started < 20:
        time.sleep(0.05)
    assert not app.state.models.lock.locked()
    assert time.monotonic() - started < 10  # ~40 s of sentences were left

    other = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    other.request("POST", "/api/translate", json.dumps({"model": "models/adapter", "text": TWO}),
                  {"Content-Type": "application/json"})
    events = [json.loads(line) for line in other.getresponse().read().decode().splitlines()]
    assert events[-1]["event"] == "done"


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


GOOD = {"bleu": 21.5, "chrf": 20.25, "n_sentences": 8, "bleu_ci95": {"low": 19.0, "high": 24.0},
        "baselines": {"copy": {"bleu": 13.5, "chrf": 15.0}, "base": {"bleu": 8.0, "chrf": 12.0}}}
DAMAGED = {  # run name: metrics.json bytes
    "string-bleu": json.dumps({**GOOD, "bleu": "abc"}),
    "nan-bleu": '{"bleu": NaN, "chrf": 1.0}',
    "inf-ci": json.dumps({**GOOD, "bleu_ci95": {"low": float("-inf"), "high": 2.0}}),
    "list-chrf": json.dumps({**GOOD, "chrf": [1.0]}),
    "bool-bleu": json.dumps({**GOOD, "bleu": True}),
    "string-baseline": json.dumps({**GOOD, "baselines": {"copy": "13.5"}}),
    "nan-elsewhere": '{"bleu": 1.0, "hit_max_new_tokens": NaN}',
    "huge": '{"bleu": 1' + "0" * 400 + "}",
    "negative-n": json.dumps({**GOOD, "n_sentences": -3}),
    "top-list": "[1, 2]",
    "not-json": '{"bleu": 21.5,',
    "not-utf8": b'{"bleu": 21.5, "note": "\xff\xfe"}',
    "deep": "[" * 100_000 + "]" * 100_000,
}


@pytest.fixture
def reports(tmp_path):
    root = tmp_path / "project"
    reports = root / "reports"
    write(reports / "metrics.json", json.dumps(GOOD))
    for name, data in DAMAGED.items():
        write(reports / "runs" / name / "metrics.json", data)
    (reports / "runs" / "a-directory" / "metrics.json").mkdir(parents=True)  # unreadable as a file
    partly = reports / "runs" / "partly"
    write(partly / "metrics.json", json.dumps({**GOOD, "bleu": 30.0}))
    write(partly / "train" / "metrics.json", '{"step": "thirty", "eval": {"loss": 1.0}}')
    write(partly / "train" / "summary.json", '{"steps": 30, "final_train_loss": NaN}')
    write(partly / "evaluate" / "by_book.csv", "book,n,bleu,chrf,base_bleu,base_chrf,copy_bleu,copy_chrf\n"
          "史记,60,22.0,20.0,8.0,10.0,16.0,17.0\n论语,ten,1,1,1,1,1,1\n孟子,5,nan,1,1,1,1,1\n庄子,5,1,1,1,1,inf,1\n"
          "老子,5,abc,1,1,1,1,1\n荀子,5,1,1,1,1,1,1,extra\n")
    write(partly / "evaluate" / "scores.csv", b"system,bleu_signature\nmodel,\xff\n")
    write(partly / "train" / "plots" / "metrics" / "train" / "loss.tsv", "step\tloss\n1\t4.5\n2\tnan\n3\tinf\n4\tx\n5\t3.5\n")
    write(partly / "train" / "plots" / "metrics" / "eval" / "loss.tsv", b"step\tloss\n1\t\xff\n")
    return root


def test_a_damaged_report_is_marked_on_its_run_not_a_broken_page(reports):
    with client(reports, []) as c:
        page = c.get("/runs")
        api = c.get("/api/runs")
    assert page.status_code == 200 and api.status_code == 200
    runs = {r["name"]: r for r in json.loads(api.text, parse_constant=lambda c: pytest.fail(f"{c} in /api/runs"))}
    assert set(runs) == {"current (reports/)", "partly", "a-directory"} | set(DAMAGED)
    assert "<strong>21.50</strong>" in page.text and "<strong>30.00</strong>" in page.text  # the good ones still shown
    for name in set(DAMAGED) | {"a-directory"}:
        error = runs[name]["error"]
        assert "metrics.json" in error and name in error and "\n" not in error, name
        assert f"<tr data-run='{name}' class='damaged'>" in page.text
    assert "field 'bleu'" in runs["string-bleu"]["error"] and "field 'bleu_ci95.low'" in runs["inf-ci"]["error"]
    assert "field 'hit_max_new_tokens'" in runs["nan-elsewhere"]["error"] and "not UTF-8" in runs["not-utf8"]["error"]
    assert "not valid JSON" in runs["not-json"]["error"] and "cannot read it" in runs["a-directory"]["error"]

    partly = runs["partly"]
    assert [row["book"] for row in partly["by_book"]] == ["史记"]  # the other rows left out, each said why
    assert partly["train"] == {} and partly["summary"] == {} and partly["bleu_signature"] == ""
    problems = "\n".join(partly["problems"])
    for what in ("train/metrics.json: field 'step'", "summary.json: field 'final_train_loss'", "by_book.csv:3: field 'n'",
                 "by_book.csv:4: field 'bleu'", "by_book.csv:5: field 'copy_bleu'", "by_book.csv:6: field 'bleu'",
                 "by_book.csv:7: not the header's columns", "scores.csv: not UTF-8", "eval/loss.tsv: not UTF-8"):
        assert what in problems, what
    assert serve.load_run("partly", reports / "reports" / "runs" / "partly")["curves"]["train loss"] == [(1.0, 4.5), (5.0, 3.5)]
    import re

    charts = re.findall(r"<svg.*?</svg>", page.text)
    assert charts and not any(w in chart.lower() for chart in charts for w in ("nan", "inf"))  # no NaN coordinate


# ----------------------------------------------------------------------------------------------
# Issue 30: nested runs, DVC experiments, the dvc plots colours


def test_nested_runs_are_listed_by_path_under_their_parent(tmp_path):
    root = tmp_path / "project"
    runs = root / "reports" / "runs"
    outside = tmp_path / "outside"
    write(outside / "metrics.json", json.dumps({**GOOD, "bleu": 99.0}))
    write(runs / "top" / "metrics.json", json.dumps(GOOD))
    write(runs / "top" / "train" / "metrics.json", '{"step": 5}')  # the run's own train report: not a run
    write(runs / "arms" / "notes.txt", "a folder of arms, itself no run")
    write(runs / "arms" / "A" / "metrics.json", json.dumps({**GOOD, "bleu": 31.0}))
    write(runs / "arms" / "C" / "metrics.json", json.dumps({**GOOD, "bleu": 32.0}))
    write(runs / "arms" / "C" / "evaluate" / "metrics.json", json.dumps(GOOD))  # C's own report folder
    write(runs / "arms" / "C" / "beam4" / "metrics.json", json.dumps({**GOOD, "bleu": 33.0}))  # an arm of an arm
    write(runs / "arms" / "P" / "metrics.json", '{"tokens": 4000, "loss": 4.5, "steps": 611}')  # a pretrain run
    write(runs / "arms" / "P" / "plots" / "metrics" / "train" / "loss.tsv", "step\tloss\n1\t5.0\n2\t4.5\n")
    write(runs / "a" / "b" / "c" / "d" / "metrics.json", json.dumps(GOOD))  # RUNS_DEPTH (4) deep: listed
    write(runs / "a" / "b" / "c" / "d" / "e" / "metrics.json", json.dumps(GOOD))  # deeper: not looked in
    (runs / "linked").symlink_to(outside, target_is_directory=True)  # a folder link: not followed
    (runs / "arms" / "L").mkdir()
    (runs / "arms" / "L" / "metrics.json").symlink_to(outside / "metrics.json")  # a file link out: not read
    (runs / "arms" / "A" / "train").mkdir()
    (runs / "arms" / "A" / "train" / "metrics.json").symlink_to(outside / "metrics.json")
    assert serve.RUNS_DEPTH == 4

    with client(root, []) as c:
        page = c.get("/runs").text
        got = c.get("/api/runs").json()
    names = ["top", "a/b/c/d", "arms/A", "arms/C", "arms/L", "arms/P", "arms/C/beam4"]  # each parent's arms together
    assert [r["name"] for r in got] == names
    assert [r["group"] for r in got] == ["", "a/b/c", "arms", "arms", "arms", "arms", "arms/C"]
    runs_by = {r["name"]: r for r in got}
    assert [runs_by[n]["metrics"]["bleu"] for n in ("arms/A", "arms/C", "arms/C/beam4")] == [31.0, 32.0, 33.0]
    assert "a link out of" in runs_by["arms/L"]["error"] and "not read" in runs_by["arms/L"]["error"]
    assert any("train/metrics.json: a link out of" in p for p in runs_by["arms/A"]["problems"])
    assert runs_by["arms/A"]["train"] == {}
    assert "99.0" not in page and "99.0" not in json.dumps(got)  # nothing outside reports/runs was read
    for group in ("a/b/c", "arms", "arms/C"):
        assert page.count(f"<tr class='group' data-group='{group}'>") == 1, group
    assert page.index("data-group='arms'") < page.index("data-run='arms/A'") < page.index("data-group='arms/C'") \
        < page.index("data-run='arms/C/beam4'")
    assert "<tr data-run='arms/L' class='damaged'>" in page
    assert "<tr data-run='arms/P' class='other'>" in page and "loss 4.5, steps 611" in page  # not an evaluation
    assert serve.load_run("arms/P", runs / "arms" / "P")["curves"]["train loss"] == [(1.0, 5.0), (2.0, 4.5)]


def template_scales() -> dict[str, dict[str, str]]:
    """{template file: {system: colour}} of every colour scale over model/copy/base in .dvc/plots/*.json."""
    found = {}
    for path in sorted((REPO / ".dvc" / "plots").glob("*.json")):
        stack = [json.loads(path.read_text(encoding="utf-8"))]
        while stack:
            value = stack.pop()
            if isinstance(value, dict):
                if "model" in value.get("domain", []):
                    found[path.name] = dict(zip(value["domain"], value["range"]))
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)
    return found


def test_model_copy_base_have_the_colours_of_the_dvc_plots_templates(reports):
    scales = template_scales()
    assert set(scales) == {"scores_by_group.json", "scores_overall.json"}
    for name, colours in scales.items():
        assert {s: colours[s] for s in ("model", "copy", "base")} == {s: serve.COLORS[s] for s in ("model", "copy", "base")}, name
    assert len({serve.COLORS[s] for s in ("model", "copy", "base")}) == 3
    with client(reports, []) as c:
        page = c.get("/runs").text
    for system, score in (("model", 22.0), ("copy", 16.0), ("base", 8.0)):  # partly's 史记 row; the bars' fill
        assert f"fill='{serve.COLORS[system]}'><title>史记 (60) {system}: BLEU {score:.2f}</title>" in page, system
        assert f"<i class='key' style='background:{serve.COLORS[system]}'></i>" in page  # its columns' heading
    assert page.index("史记 (60) model:") < page.index("史记 (60) copy:") < page.index("史记 (60) base:")  # dvc plots' order


def test_colours_come_from_the_template_or_say_it_is_missing(tmp_path):
    from wenyan.errors import PipelineError

    assert serve.plot_colors(serve.PLOT_TEMPLATE) == {s: serve.COLORS[s] for s in serve.SYSTEMS}
    template = tmp_path / "t.json"
    write(template, json.dumps({"spec": {"encoding": {"color": {"scale": {"domain": ["base", "copy", "model"],
                                                                            "range": ["#000001", "#000002", "#000003"]}}}}}))
    assert serve.plot_colors(template) == {"model": "#000003", "copy": "#000002", "base": "#000001"}
    write(template, json.dumps({"encoding": {"color": {"scale": {"domain": ["a", "b"], "range": ["#1", "#2"]}}}}))
    with pytest.raises(PipelineError, match="no colour scale"):
        serve.plot_colors(template)
    with pytest.raises(PipelineError, match="cannot read it"):
        serve.plot_colors(tmp_path / "absent.json")


DVC = [sys.executable, "-m", "dvc"]
EXP_STAGE = """import json, yaml
p = yaml.safe_load(open("params.yaml"))["train"]
json.dump({"bleu": float(p["lr"]) * 100,  # float("nan"): a NaN BLEU
           "chrf": p["steps"] * 1.5, "n_sentences": 8,
           "baselines": {"copy": {"bleu": 1.5, "chrf": 2.5}, "base": {"bleu": 3.5, "chrf": 4.5}}},
          open("reports/metrics.json", "w"))
"""


def git_dvc(cmd: list, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def exp_repo(tmp_path_factory):
    """A git + DVC project with one trivial stage writing reports/metrics.json from params.yaml, committed, and two
    experiments: lr2 (train.lr=0.2) and broken (train.lr=nan: a NaN BLEU); ~3 s."""
    repo = tmp_path_factory.mktemp("exp") / "project"
    write(repo / "params.yaml", "train:\n  lr: 0.1\n  steps: 3\n  prompt: 翻译。\n")
    write(repo / "stage.py", EXP_STAGE)
    write(repo / "dvc.yaml", "stages:\n  evaluate:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [train]\n"
                             "    metrics:\n      - reports/metrics.json:\n          cache: false\n")
    (repo / "reports").mkdir()
    git_dvc(["git", "init", "-q"], repo)
    git_dvc(DVC + ["init", "-q"], repo)
    git_dvc(DVC + ["repro", "-q"], repo)
    git_dvc(["git", "add", "-A"], repo)
    git_dvc(["git", "commit", "-qm", "base"], repo)
    git_dvc(DVC + ["exp", "run", "-q", "-n", "lr2", "-S", "train.lr=0.2"], repo)
    git_dvc(DVC + ["exp", "run", "-q", "-n", "broken", "-S", "train.lr=nan"], repo)
    return repo


def test_dvc_experiments_are_listed_with_their_changed_params_and_scores(exp_repo):
    with client(exp_repo, []) as c:
        page = c.get("/runs")
        api = c.get("/api/experiments")
    assert page.status_code == 200 and api.status_code == 200
    got = json.loads(api.text, parse_constant=lambda c: pytest.fail(f"{c} in /api/experiments"))
    assert got["note"] == ""
    rows = {r["name"]: r for r in got["experiments"]}
    assert [r["kind"] for r in got["experiments"]][:2] == ["workspace", "baseline"]
    assert sorted(n for n, r in rows.items() if r["kind"] == "experiment") == ["broken", "lr2"]
    baseline = next(r for r in got["experiments"] if r["kind"] == "baseline")
    assert baseline["changed"] == [] and baseline["metrics"]["bleu"] == 10.0 and baseline["metrics"]["chrf"] == 4.5
    lr2 = rows["lr2"]
    assert lr2["changed"] == ["train.lr=0.2"] and lr2["baseline"] == baseline["name"] and lr2["error"] == ""
    assert lr2["metrics"] == {"bleu": 20.0, "chrf": 4.5, "n_sentences": 8,
                              "baselines": {"copy": {"bleu": 1.5, "chrf": 2.5}, "base": {"bleu": 3.5, "chrf": 4.5}}}
    assert rows["broken"]["changed"] == ["train.lr=NaN"] and rows["broken"]["metrics"] == {}
    assert "field 'bleu' should be a finite number" in rows["broken"]["error"]  # checked as a run's metrics are
    assert rows["workspace"]["changed"] == ["train.lr=NaN"]  # the last experiment is applied to the workspace

    html = page.text
    assert "<h2>DVC experiments</h2>" in html and "<table id='experiments'>" in html
    assert "<tr data-exp='lr2' class='experiment'>" in html and "<tr data-exp='broken' class='experiment damaged'>" in html
    start = html.index("<tr data-exp='lr2'")
    lr2_row = html[start:html.index("</tr>", start)]
    assert "train.lr=0.2" in lr2_row and "<strong>20.00</strong>" in lr2_row and "1.50 / 2.50" in lr2_row \
        and "3.50 / 4.50" in lr2_row and "+18.50" in lr2_row
    assert f"fill='{serve.COLORS['copy']}'><title>lr2 copy: BLEU 1.50</title>" in html  # the BLEU by experiment bars
    assert "aria-label='BLEU by experiment'" in html


def test_experiments_without_dvc_or_git_or_any_experiment_are_a_note(tmp_path, exp_repo):
    assert serve.load_experiments(tmp_path) == {
        "experiments": [], "note": f"no DVC experiments: {tmp_path} is not a DVC project (no .dvc/)"}
    no_git = tmp_path / "no-git"
    no_git.mkdir()
    git_dvc(DVC + ["init", "-q", "--no-scm"], no_git)
    got = serve.load_experiments(no_git)
    assert got["experiments"] == [] and got["note"].startswith("no DVC experiments: dvc exp show failed: ")
    assert "\n" not in got["note"] and "Git" in got["note"]
    with client(no_git, []) as c:
        page = c.get("/runs")
        assert page.status_code == 200 and "dvc exp show failed" in page.text
        assert c.get("/api/experiments").json() == got

    plain = tmp_path / "plain"  # git + DVC, one commit, no experiment yet
    plain.mkdir()
    git_dvc(["git", "init", "-q"], plain)
    git_dvc(DVC + ["init", "-q"], plain)
    git_dvc(["git", "commit", "-qm", "init"], plain)
    got = serve.load_experiments(plain)
    assert [r["kind"] for r in got["experiments"]] == ["workspace", "baseline"]
    assert got["note"] == "no DVC experiments yet (dvc exp run -S KEY=VALUE runs one)"

    assert "took over" in serve.load_experiments(exp_repo, timeout=0.01)["note"]  # a stuck dvc: stopped, a note
    with client(exp_repo, [], experiments=False) as c:  # --no-experiments: dvc is not run at all
        assert c.get("/api/experiments").json() == {
            "experiments": [], "note": "DVC experiments are not looked up (--no-experiments)"}


def test_experiment_rows_take_only_what_fits(tmp_path):
    entry = {"rev": "a" * 40, "name": "main", "data": {"params": {"params.yaml": {"data": {"train": {"lr": 0.1, "x": 1}}},
                                                                  "other.yaml": {"data": {"k": "v"}}},
                                                       "metrics": {"reports/metrics.json": {"data": {"bleu": 10.0}}}},
             "experiments": [
                 {"name": "gone", "revs": [{"rev": "b" * 40, "data": {"params": {"params.yaml": {"data": {"train": {"lr": 0.1}}}},
                                                                     "metrics": {"reports/metrics.json": {"data": {"bleu": "high"}}}}}]},
                 {"name": "queued", "executor": {"state": "queued"}, "revs": [{"rev": "c" * 40, "data": None,
                                                                              "error": {"type": "X", "msg": "not run yet"}}]},
                 {"revs": []}, "junk"]}
    rows = serve.experiment_rows([entry, "junk", {"rev": "workspace", "data": {}}])
    assert [(r["name"], r["kind"], r["state"]) for r in rows] == [
        ("main", "baseline", ""), ("gone", "experiment", ""), ("queued", "experiment", "queued"),
        ("workspace", "workspace", "")]
    gone = rows[1]
    assert gone["changed"] == ["train.x (removed)", "other.yaml:k (removed)"] and "field 'bleu' should be" in gone["error"]
    assert rows[2]["error"] == "queued: reports/metrics.json: not run yet" and rows[0]["metrics"] == {"bleu": 10.0}
    assert serve.changed_params({}, {"p": "长" * 100})[0] == "p=" + "长" * (serve.VALUE_CHARS - 1) + "…"
    json.dumps(rows, allow_nan=False)  # what /api/experiments sends: no NaN anywhere


@pytest.mark.parametrize("port", ["abc", "-1", "65536", "70000", "1.5", "", " ", "80x", "99999999999999999999", "0x50"])
def test_a_bad_port_is_one_error(tmp_path, port):
    from wenyan.errors import PipelineError

    with pytest.raises(PipelineError, match=r"^--port must be a whole number from 0 to 65535"):
        serve.main(["--root", str(tmp_path), "--port", port])


def test_a_port_in_use_is_one_error(tmp_path):
    import socket

    from wenyan.errors import PipelineError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PipelineError, match=rf"^cannot listen on 127.0.0.1:{port} \(in use by another program\)"):
            serve.main(["--root", str(tmp_path), "--port", str(port)])


@pytest.mark.parametrize("args", [["--port", "abc"], ["--port", "70000"], ["--timeout", "0"], ["--timeout", "nan"],
                                  ["--threads", "0"], ["--host", "no.such.host.invalid", "--port", "0"]])
def test_bad_arguments_are_one_error_line_and_exit_1(tmp_path, args):
    proc = subprocess.run([sys.executable, "-m", "tools.serve", "--root", str(tmp_path), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
