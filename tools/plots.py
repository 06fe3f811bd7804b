"""Plots: `dvc plots show` / `dvc plots diff` pages that render offline, and PNGs of them for the README.

    dvc plots show                      # dvc_plots/index.html: works offline (.dvc/config plots.html_template)
    dvc plots diff main HEAD            # the same page for two revisions side by side
    python -m tools.plots png           # reports/plots/<plot>.png: each plot of the workspace, headless Chromium
    python -m tools.plots png main HEAD --out reports/plots/diff
    python -m tools.plots vendor vega-5.33.1.tgz vega-lite-5.23.0.tgz vega-embed-6.29.0.tgz   # rebuild the template

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so without the network it is blank.
.dvc/config points `plots.html_template` at .dvc/plots/offline.html, a page with the three libraries inline
(their npm releases, BSD-3-Clause, licence headers kept; `npm pack vega@5.33.1 vega-lite@5.23.0
vega-embed@6.29.0` fetches them, `vendor` writes the page). dvc-render fills `{plot_divs}` with the plots and
puts its CDN <script> tags only where a template says `{scripts}`, which this one does not.

`png` renders the page (`dvc plots show` / `dvc plots diff REVS`) in headless Chromium (selenium + the system's
chromium and chromedriver) with every non-file request refused, and photographs each plot's element: a picture
only comes out if the page works offline.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from wenyan.errors import PipelineError, get_logger, run_main

log = get_logger("plots")

TEMPLATE = Path(".dvc/plots/offline.html")
LIBRARIES = {  # npm package -> the browser build inside its tarball (package/...)
    "vega": "build/vega.min.js",
    "vega-lite": "build/vega-lite.min.js",
    "vega-embed": "build/vega-embed.min.js",
}
# vega, vega-lite and vega-embed are BSD-3-Clause; their npm tarballs carry no LICENSE file, so the page carries it
BSD3 = """Copyright (c) 2015-2024, University of Washington Interactive Data Lab. All rights reserved.
Redistribution and use in source and binary forms, with or without modification, are permitted provided that the
following conditions are met: 1. Redistributions of source code must retain the above copyright notice, this list of
conditions and the following disclaimer. 2. Redistributions in binary form must reproduce the above copyright notice,
this list of conditions and the following disclaimer in the documentation and/or other materials provided with the
distribution. 3. Neither the name of the copyright holder nor the names of its contributors may be used to endorse or
promote products derived from this software without specific prior written permission.
THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED WARRANTIES,
INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL,
SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY,
WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE."""
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot (offline)</title>
    <!-- wenyan-mt: `dvc plots` page with vega, vega-lite and vega-embed inline (no CDN), so it renders offline.
         Written by `python -m tools.plots vendor` from the npm packages {versions}; each one's licence is
         beside its code below. -->
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
{scripts_inline}
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def read_package(tgz: Path) -> tuple[str, str, str, str]:
    """(name, version, browser build, licence text) of an npm tarball (`npm pack NAME@VERSION`)."""
    try:
        with tarfile.open(tgz) as tar:
            meta = json.load(tar.extractfile("package/package.json"))
            name = meta["name"]
            if name not in LIBRARIES:
                raise PipelineError(f"{tgz}: npm package {name!r} is not one of {', '.join(LIBRARIES)}")
            code = tar.extractfile(f"package/{LIBRARIES[name]}").read().decode("utf-8")
            licence = next((tar.extractfile(m).read().decode("utf-8") for m in tar.getmembers()
                            if m.name.lower() in ("package/license", "package/license.md", "package/license.txt")), "")
    except (tarfile.TarError, KeyError, OSError, ValueError) as exc:
        raise PipelineError(f"{tgz}: not an npm tarball of vega, vega-lite or vega-embed ({exc})") from None
    if not licence and meta.get("license") == "BSD-3-Clause":
        licence = BSD3
    if not licence:
        raise PipelineError(f"{tgz}: {name} is not BSD-3-Clause ({meta.get('license')}) and carries no licence file")
    return name, meta["version"], code, licence


def build_template(tarballs: list[Path]) -> str:
    """The offline page: the three libraries inline, in load order (vega, vega-lite, vega-embed)."""
    packages = {}
    for tgz in tarballs:
        name, version, code, licence = read_package(tgz)
        if "</script" in code.lower() or re.search(r"\{(plot_divs|scripts|refresh_tag)\}", code):
            raise PipelineError(f"{tgz}: its code contains '</script' or a dvc-render placeholder; cannot inline it")
        packages[name] = (version, code, licence)
    missing = [n for n in LIBRARIES if n not in packages]
    if missing:
        raise PipelineError(f"missing npm tarball(s) of {', '.join(missing)} (npm pack vega@5 vega-lite@5 vega-embed@6)")
    scripts = []
    for name in LIBRARIES:
        version, code, licence = packages[name]
        scripts.append(f"    <!-- {name} {version}\n{licence.replace('--', '- -').strip()}\n    -->\n"
                       f"    <script type=\"text/javascript\">\n{code}\n    </script>")
    versions = ", ".join(f"{n}@{packages[n][0]}" for n in LIBRARIES)
    page = PAGE.replace("{{", "\0").replace("}}", "\1")
    page = page.replace("{versions}", versions).replace("{scripts_inline}", "\n".join(scripts))
    return page.replace("\0", "{").replace("\1", "}")


# ----------------------------------------------------------------------------------------------
# PNGs


def render_page(revs: list[str], out_dir: Path) -> Path:
    """`dvc plots show` (or `dvc plots diff REVS`) of every plot into out_dir; returns its index.html. One page for
    all plots: `dvc plots show TARGET` of one file loses its stage's props (x: step), so the plots are photographed
    on the whole page, each by its own element."""
    cmd = ["dvc", "plots", "diff", *revs] if revs else ["dvc", "plots", "show"]
    done = subprocess.run([*cmd, "-o", str(out_dir)], capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"{' '.join(cmd)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return out_dir / "index.html"


def png_name(div_id: str) -> str:
    """reports_evaluate_by_book_csv -> evaluate_by_book; reports_train_plots_metrics_train_loss_tsv -> train_loss."""
    stem = re.sub(r"^reports_", "", div_id)
    stem = re.sub(r"^train_plots_metrics_", "", stem)
    return re.sub(r"_(csv|tsv|json|yaml)$", "", stem)


def browser():
    """Headless Chromium through selenium, offline: every request but file:// and data: is refused."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise PipelineError("tools.plots png needs selenium (pip install selenium) and chromium + chromedriver "
                            "(apt-get install chromium chromium-driver)") from None
    chrome, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chrome or not driver:
        raise PipelineError("tools.plots png needs chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,4000",
                 "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--hide-scrollbars"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def requested_urls(drv) -> list[str]:
    """Every URL the page asked for (the DevTools Network.requestWillBeSent events of the performance log)."""
    urls = []
    for entry in drv.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def render_pngs(revs: list[str], out: Path) -> list[Path]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out.mkdir(parents=True, exist_ok=True)
    written = []
    drv = browser()
    try:
        with tempfile.TemporaryDirectory(prefix="plots-") as tmp:
            page = render_page(revs, Path(tmp))
            drv.get(page.resolve().as_uri())
            divs = [d.get_attribute("id") for d in drv.find_elements(By.CSS_SELECTOR, "body > div[id]")]
            if not divs:
                raise PipelineError("dvc found no plots to render" + (f" for {' '.join(revs)}" if revs else ""))
            WebDriverWait(drv, 60).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "body > div[id] svg, body > div[id] canvas")) >= len(divs))
            remote = [u for u in requested_urls(drv) if not u.startswith(("file:", "data:", "blob:", "about:"))]
            if remote:
                raise PipelineError(f"the plots page asked for {remote[0]}: it does not work offline")
            drv.execute_script("document.querySelectorAll('.vega-embed details').forEach(e => e.remove())")  # the ... menu
            for div in divs:
                element = drv.find_element(By.CSS_SELECTOR, f"div[id='{div}'] .vega-embed, div[id='{div}'].vega-embed")
                drv.execute_script("arguments[0].scrollIntoView()", element)
                if element.size["height"] < 40:  # no data at this revision (e.g. a file not written yet)
                    log.warning("%s: nothing drawn (no data); no PNG", div)
                    continue
                target = out / f"{png_name(div)}.png"
                element.screenshot(str(target))
                written.append(target)
                log.info("%s -> %s", div, target)
    finally:
        drv.quit()
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("vendor", help="write .dvc/plots/offline.html from the npm tarballs of vega, vega-lite, vega-embed")
    p.add_argument("tarballs", nargs=3, type=Path)
    p.add_argument("--out", type=Path, default=TEMPLATE)
    p = sub.add_parser("png", help="a PNG of each plot (workspace, or the revisions given), via headless Chromium")
    p.add_argument("revs", nargs="*", help="revisions to compare (dvc plots diff); none = the workspace (dvc plots show)")
    p.add_argument("--out", type=Path, default=Path("reports/plots"))
    args = parser.parse_args(argv)
    if args.command == "vendor":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(build_template(args.tarballs), encoding="utf-8")
        print(args.out)
    else:
        for path in render_pngs(args.revs, args.out):
            print(path)


if __name__ == "__main__":
    run_main(main)
