"""wenyan/device.py: the CPU kernels pinned at import (so CPU training gives the same bits on another x86-64 CPU),
and benchmarks/cpu_determinism.py, which measures that."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX2 = X86 and "avx2" in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")

PROBE = ("import os, wenyan.device, torch; torch.ones(3).sum(); "
         "print(os.environ.get('ATEN_CPU_CAPABILITY'), os.environ.get('MKL_CBWR'), torch.backends.cpu.get_cpu_capability())")


def probe(**env) -> tuple[list[str], str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "WENYAN_CPU_KERNELS")}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**clean, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split(), proc.stderr


@pytest.mark.skipif(not AVX2, reason="the pin is for x86-64 CPUs with AVX2")
def test_importing_wenyan_device_pins_torch_and_mkl_to_avx2():
    (aten, mkl, used), _ = probe()
    assert (aten, mkl, used) == ("avx2", "AVX2", "AVX2")


@pytest.mark.skipif(not X86, reason="x86-64 only")
def test_as_is_leaves_the_choice_to_torch_and_mkl_and_a_users_own_setting_stays():
    (aten, mkl, _), _ = probe(WENYAN_CPU_KERNELS="as-is")
    assert (aten, mkl) == ("None", "None")
    (aten, mkl, used), _ = probe(ATEN_CPU_CAPABILITY="default")
    assert (aten, mkl, used) == ("default", "AVX2", "DEFAULT")


@pytest.mark.skipif(not X86, reason="x86-64 only")
def test_an_unknown_choice_warns_and_pins():
    (aten, _, _), err = probe(WENYAN_CPU_KERNELS="fast")
    assert aten == "avx2"
    assert "WENYAN_CPU_KERNELS=fast is not one of avx2, as-is; using avx2" in err


@pytest.mark.skipif(not AVX2, reason="the benchmark's pinned kernels need AVX2")
def test_determinism_benchmark_gives_one_hash_for_every_thread_count(tmp_path):
    out = tmp_path / "det.json"
    proc = subprocess.run([sys.executable, "benchmarks/cpu_determinism.py", "--threads", "1,2", "--settings", "pinned,default",
                           "--out", out],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    pinned = [r for r in result["rows"] if r["setting"] == "pinned"]
    assert len(pinned) == 2 and len({r["md5"] for r in pinned}) == 1
    assert {r["capability"] for r in pinned} == {"AVX2"}
    default = {r["md5"] for r in result["rows"] if r["setting"] == "default"}
    assert default and default != {pinned[0]["md5"]}  # the kernel choice changes the bits: why the pin exists
