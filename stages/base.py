"""Base: the base model (train.model) as a plain model directory that train and evaluate_base load.

    python -m stages.base --out models/base        (what `dvc repro base` runs; tests add --params FILE)

A GGUF model (the built-in SmolLM2 default, or a .gguf file) is dequantised into models/base/<name>/
(config.json + weights + tokenizer; models.materialize): transformers refuses save_pretrained on a
GGUF-loaded model and unsloth wants a plain directory. A model directory or a hub id is loaded where it is;
models/base/base.json records what train.model resolved to either way. A DVC output, so DVC caches it,
restores it with `dvc checkout`, and nothing else writes under models/base inside the pipeline. Built in
a directory of its own beside it (models/.base.<pid>-<random>.tmp) and put in place whole, with the manifest of
what it wrote (naming this stage); an --out that another stage wrote (models/adapter, models/pretrain: their
manifests say so), that holds files this stage did not write, that is a symbolic link, or that is (or holds, or
lies inside) the model it reads, is refused before anything runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wenyan import models
from wenyan.errors import get_logger, PipelineError, run_main
from wenyan.files import check_output_path, check_owned_dir, check_paths, staged_dir, with_path_errors, write_json
from wenyan.params import add_params_options, load_sections

log = get_logger("base")
SIGNATURE = "base.json"  # what marks a directory as this stage's output (written before output manifests too)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="models/base")
    add_params_options(parser)
    args = parser.parse_args(argv)
    check_output_path(args.out, directory=True)
    spec = load_sections("base", ["train.model"], args.params)["train"]["model"]
    if not isinstance(spec, str):
        raise PipelineError(f"params.yaml: train.model should be str, got {spec!r}")
    if args.check_params:
        models.resolve_model(spec)  # a missing file or directory, an unknown built-in name
        return
    location, gguf_file = models.resolve_model(spec)
    model_path = Path(location) / gguf_file if gguf_file else Path(location)
    check_paths({"train.model": model_path if model_path.exists() else None, "--params": args.params},
                {"--out": args.out}, dirs=["train.model"])  # never dequantise into (or over) the model read
    check_owned_dir(args.out, "--out", "base", signature=SIGNATURE)
    with staged_dir(args.out, "base", signature=SIGNATURE) as tmp:
        location = models.materialize(spec, cache_dir=tmp)
        plain = Path(location).parent == tmp
        write_json(tmp / SIGNATURE, {"model": spec, "location": str(args.out / Path(location).name) if plain else location})
    log.info("train.model %s -> %s", spec, args.out if plain else location)


if __name__ == "__main__":
    run_main(with_path_errors(main))
