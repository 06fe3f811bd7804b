"""The local web page (tools/serve.py): its pages and API in-process, and end to end in a real headless Chromium
(Selenium + the system's chromium and chromedriver): translate two sentences with a tiny model, the aligned output,
the runs view's numbers from a committed metrics.json, and no request to anything but the page's own server."""

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
# Screenshots go to the test's tmp_path, or to WENYAN_SCREENSHOTS (reports/screenshots/ holds the committed ones)
SCREENSHOTS_ENV = "WENYAN_SCREENSHOTS"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from test_translate import make_tiny_model

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


def client(root: Path, models: list[Path]):
    from starlette.testclient import TestClient

    return TestClient(serve.make_app(root, models))


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
    with client(REPO, []) as c:
        events = [json.loads(x) for x in c.post("/api/translate", json={"model": str(tmp_path / "nope"), "text": "子曰。"}).text.splitlines()]
        assert events == [{"event": "error", "message": f"{tmp_path / 'nope'}: model directory not found; train one first "
                           "(dvc repro train) or pass --model DIR (models/adapter from the train stage, models/export/hf "
                           "from the export stage)"}]
        assert c.post("/api/translate", content=b"not json").status_code == 400


def test_runs_view_has_every_committed_run_with_its_numbers():
    with client(REPO, []) as c:
        page = c.get("/runs").text
        runs = c.get("/api/runs").json()
    committed = sorted(p.parent.name for p in (REPO / "reports" / "runs").glob("*/metrics.json"))
    assert [r["name"] for r in runs] == ["current (reports/)"] + committed
    for folder in [REPO / "reports"] + [REPO / "reports" / "runs" / n for n in committed]:
        m = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        assert f"<strong>{m['bleu']:.2f}</strong>" in page
        assert f"{m['baselines']['copy']['bleu']:.2f} / {m['baselines']['copy']['chrf']:.2f}" in page
    assert page.count("aria-label='BLEU by book'") == len(runs) and page.count("aria-label='loss curves'") == len(runs)


def test_pages_reference_nothing_outside_the_server(tiny_model):
    with client(REPO, [tiny_model]) as c:
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
    proc = subprocess.Popen([sys.executable, "-m", "tools.serve", "--port", "0", "--root", str(REPO), "--model", str(tiny_model)],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "serve.log", "wb"), env=env, cwd=REPO)
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

        driver.get(server.rstrip("/") + "/runs")
        m = json.loads((REPO / "reports" / "runs" / RUN / "metrics.json").read_text(encoding="utf-8"))
        row = driver.find_element(By.CSS_SELECTOR, f"#runs tr[data-run='{RUN}']")
        assert row.find_element(By.CSS_SELECTOR, "td.bleu").text == f"{m['bleu']:.2f}"
        assert row.find_element(By.CSS_SELECTOR, "td.chrf").text == f"{m['chrf']:.2f}"
        assert f"{m['baselines']['copy']['bleu']:.2f} / {m['baselines']['copy']['chrf']:.2f}" in row.text
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.chart")) >= 2
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
