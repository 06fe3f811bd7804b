"""Does CPU training give the same bits on another machine? (issue 30 item 1: a clone reproduces dvc.lock.)

A small Llama-like model (embedding, RMSNorm, attention, SiLU MLP, cross-entropy; weights from numpy's frozen
legacy RandomState, so every torch version and CPU starts from the same bits) takes 3 AdamW steps on the CPU; the
script prints an MD5 of the losses and of the trained weights, for each kernel choice and thread count, each in a
fresh process (torch reads ATEN_CPU_CAPABILITY and MKL reads MKL_CBWR once, at start-up):

- `unpinned`: what torch and MKL pick for this CPU (AVX-512 where the CPU has it, AVX2 on most others);
- `pinned`: wenyan's choice (wenyan/device.py's CPU_KERNELS: ATEN_CPU_CAPABILITY=avx2, MKL_CBWR=AVX2), the same
  kernels on every x86-64 CPU with AVX2;
- `default`: ATEN_CPU_CAPABILITY=default (no vector kernels), to show that the kernel choice changes the bits.

Run it on two machines and compare the `pinned` rows: equal hashes = the same training bits.

    python benchmarks/cpu_determinism.py --out reports/benchmarks/cpu_determinism.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

SETTINGS = ("unpinned", "pinned", "default")


def setting_env(name: str) -> dict:
    """The two variables for a setting (None: unset); `pinned` is wenyan's own choice, read from wenyan.device."""
    from wenyan.device import CPU_KERNELS

    unset = {"ATEN_CPU_CAPABILITY": None, "MKL_CBWR": None}
    return {"unpinned": unset, "pinned": {**unset, **CPU_KERNELS["avx2"]},
            "default": {**unset, "ATEN_CPU_CAPABILITY": "default"}}[name]


def train_once(threads: int) -> dict:
    import hashlib

    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    rs = np.random.RandomState(0)
    vocab, dim, layers, seq, batch = 512, 128, 2, 64, 8

    def weight(*shape, scale=0.02):
        return torch.from_numpy((rs.standard_normal(shape) * scale).astype(np.float32)).requires_grad_()

    params = {"emb": weight(vocab, dim)}
    for i in range(layers):
        for name, shape in (("q", (dim, dim)), ("k", (dim, dim)), ("v", (dim, dim)), ("o", (dim, dim)),
                            ("up", (4 * dim, dim)), ("gate", (4 * dim, dim)), ("down", (dim, 4 * dim))):
            params[f"{i}.{name}"] = weight(*shape)
        params[f"{i}.n1"] = torch.ones(dim, requires_grad=True)
        params[f"{i}.n2"] = torch.ones(dim, requires_grad=True)
    tokens = torch.from_numpy(rs.randint(0, vocab, size=(3, batch, seq + 1)).astype(np.int64))

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def forward(ids):
        x = F.embedding(ids, params["emb"])
        for i in range(layers):
            h = rms(x, params[f"{i}.n1"])
            q, k, v = (F.linear(h, params[f"{i}.{n}"]).view(batch, seq, 4, dim // 4).transpose(1, 2) for n in "qkv")
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, dim)
            x = x + F.linear(a, params[f"{i}.o"])
            h = rms(x, params[f"{i}.n2"])
            x = x + F.linear(F.silu(F.linear(h, params[f"{i}.gate"])) * F.linear(h, params[f"{i}.up"]), params[f"{i}.down"])
        return F.linear(x, params["emb"])

    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    losses = []
    start = time.perf_counter()
    for step in range(3):
        ids = tokens[step]
        loss = F.cross_entropy(forward(ids[:, :-1]).reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    digest = hashlib.md5(np.array(losses).tobytes())
    for p in params.values():
        digest.update(p.detach().numpy().tobytes())
    return {"losses": losses, "md5": digest.hexdigest(), "seconds": round(seconds, 3),
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return f"{name} ({'avx512f' if 'avx512f' in flags else 'no avx512f'}, {'avx2' if 'avx2' in flags else 'no avx2'})"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":  # one setting, every thread count, in this process
        print(json.dumps([train_once(int(t)) for t in sys.argv[2].split(",")]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the rows as JSON here too")
    ap.add_argument("--threads", default="1,2,4", help="torch thread counts, comma-separated")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}, comma-separated")
    args = ap.parse_args()
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        ap.error(f"--settings: unknown {', '.join(sorted(unknown))} (known: {', '.join(SETTINGS)})")
    rows = []
    for name in args.settings.split(","):
        env_set = setting_env(name)
        env = {k: v for k, v in os.environ.items() if k not in env_set}
        env.update({k: v for k, v in env_set.items() if v is not None})
        env["WENYAN_CPU_KERNELS"] = "as-is"  # this script sets the choice itself
        proc = subprocess.run([sys.executable, __file__, "--child", args.threads], env=env, capture_output=True,
                              text=True, check=True)
        for threads, measured in zip(map(int, args.threads.split(",")), json.loads(proc.stdout.strip().splitlines()[-1])):
            row = {"setting": name, "threads": threads, **measured}
            rows.append(row)
            print(f"{name:9} threads={threads} capability={row['capability']:8} md5={row['md5'][:16]} "
                  f"loss={row['losses'][-1]!r} {row['seconds']} s", flush=True)
    result = {"machine": cpu_name(), "arch": platform.machine(), "python": platform.python_version(), "rows": rows}
    print(result["machine"])
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
