"""GGUF by hand: llama.cpp's converter setup, conversion, quantization and an Ollama Modelfile (wenyan/gguf.py does the work).

    python -m tools.gguf setup     # llama.cpp's convert_hf_to_gguf.py (+ conversion/, gguf-py) of the SAME
                                   # llama-cpp-python version, from its sdist, into ~/.cache/wenyan-mt/
    python -m tools.gguf setup --build   # first build + install llama-cpp-python from source (if missing), with a
                                         # progress bar (pip's own shows only "still running..." for ~4-5 minutes)
    python -m tools.gguf convert models/export/hf model-f16.gguf --outtype f16
    python -m tools.gguf quantize model-f16.gguf model-Q4_K_M.gguf Q4_K_M
    python -m tools.gguf modelfile model-Q4_K_M.gguf models/export/hf --system "..." > Modelfile

The export stage does all of this (dvc repro export/dvc.yaml).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wenyan import gguf
from wenyan.errors import run_main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("setup", help="fetch llama.cpp's converter of the installed llama-cpp-python version into the cache")
    p.add_argument("--sdist", type=Path, help="a llama-cpp-python .tar.gz at hand (else pip downloads it)")
    p.add_argument("--version", help="llama-cpp-python version (default: the installed one)")
    p.add_argument("--force", action="store_true", help="fetch again even if cached (with --build: build again too)")
    p.add_argument("--build", action="store_true",
                   help=f"build and install llama-cpp-python (default {gguf.PINNED_VERSION}) from source first when it is "
                        "not installed, showing the build's progress")
    p = sub.add_parser("convert", help="transformers model directory -> GGUF (convert_hf_to_gguf.py)")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--outtype", default="f16", choices=gguf.OUTTYPES)
    p = sub.add_parser("quantize", help="GGUF -> quantized GGUF (llama_model_quantize)")
    p.add_argument("in_gguf", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("qtype", help="Q8_0, Q4_K_M, Q5_K_M, ...")
    p = sub.add_parser("modelfile", help="print an Ollama Modelfile for a GGUF and the model's tokenizer")
    p.add_argument("gguf", type=Path)
    p.add_argument("hf_dir", type=Path, help="the model directory whose tokenizer (chat template) the GGUF came from")
    p.add_argument("--system", required=True, help="the system prompt the model was trained with")
    args = parser.parse_args(argv)

    if args.command == "setup":
        if args.build and (args.force or gguf.missing()):
            gguf.build(args.version or gguf.PINNED_VERSION)
        print(gguf.setup(args.version, args.sdist, args.force))
    elif args.command == "convert":
        print(json.dumps(gguf.convert(args.hf_dir, args.out, args.outtype)))
    elif args.command == "quantize":
        print(json.dumps(gguf.quantize(args.in_gguf, args.out, args.qtype)))
    else:
        from transformers import AutoTokenizer

        sys.stdout.write(gguf.render_modelfile(args.gguf.name, AutoTokenizer.from_pretrained(str(args.hf_dir)), args.system))


if __name__ == "__main__":
    run_main(main)
