"""Base: the base model (train.model) as a plain model directory that train and evaluate_base load.

    python -m stages.base --out models/base        (what `dvc repro base` runs; tests add --params FILE)

A GGUF model (the built-in SmolLM2 default, or a .gguf file) is dequantised into models/base/<name>/
(config.json + weights + tokenizer; models.materialize): transformers refuses save_pretrained on a
GGUF-loaded model and unsloth wants a plain directory. A model directory or a hub id is loaded where it is;
models/base/base.json records what train.model resolved to either way. A DVC output, so DVC caches it,
restores it with `dvc checkout`, and nothing else writes under models/base inside the pipeline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wenyan import models
from wenyan.errors import get_logger, PipelineError, run_main
from wenyan.files import new_staging_dir, replace_dir, write_json
from wenyan.params import load_sections

log = get_logger("base")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="models/base")
    parser.add_argument("--params", default=None, help="params.yaml to read instead of DVC's (tests)")
    parser.add_argument("--check-params", action="store_true", help="only check the parameters, then exit (the check_params stage)")
    args = parser.parse_args(argv)
    spec = load_sections("base", ["train.model"], args.params)["train"]["model"]
    if not isinstance(spec, str):
        raise PipelineError(f"params.yaml: train.model should be str, got {spec!r}")
    if args.check_params:
        models.resolve_model(spec)  # a missing file or directory, an unknown built-in name
        return
    tmp = new_staging_dir(args.out)
    location = models.materialize(spec, cache_dir=tmp)
    plain = Path(location).parent == tmp
    write_json(tmp / "base.json", {"model": spec, "location": str(args.out / Path(location).name) if plain else location})
    replace_dir(tmp, args.out)
    log.info("train.model %s -> %s", spec, args.out if plain else location)


if __name__ == "__main__":
    run_main(main)
