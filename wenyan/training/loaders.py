"""Loading a base model for training (train and pretrain), one function per backend: load_unsloth (GPU: fused
kernels, "unsloth" gradient checkpointing, 4-bit) and load_hf (transformers + peft: the CPU path). Both set the chat
template, trim (train.trim_vocab) and extend (extend_vocab) the vocabulary, then wrap the model in LoRA unless the
method is full. What they read is a Loading: train builds it from its section (Loading.for_train), pretrain from
its own (full fine-tuning, no chat template, no trimming).
"""

from __future__ import annotations

import dataclasses

from wenyan import vocab
from wenyan.distributed import world
from wenyan.errors import PipelineError, get_logger
from wenyan.models import check_chat_template, load_model, materialize
from wenyan.prompt import apply_chat_template_override, fix_special_tokens

log = get_logger("models")


@dataclasses.dataclass(frozen=True)
class Loading:
    """What loading a base for training reads (error messages name the train.* key, as train sets them)."""

    model: str  # what models.materialize loads: a built-in name, a directory, a .gguf, a hub id
    max_seq_length: int
    method: str  # lora | qlora | full (full: no LoRA, fp32 master weights on the hf path)
    load_in_4bit: bool
    gradient_checkpointing: object  # auto | unsloth | true | false
    seed: int  # LoRA's initialisation and unsloth's random_state
    chat_template: str | None  # a name in prompt.CHAT_TEMPLATES, or None: the model's own
    extend_vocab: object  # auto | none | a minimum count (vocab.decide)
    trim_vocab: str = "none"  # auto | none | always (wenyan/trim.py)
    lora: dict | None = None  # LoraConfig's r, lora_alpha, lora_dropout, target_modules, bias, use_rslora

    @classmethod
    def for_train(cls, cfg: dict) -> "Loading":
        """From the train: section (training_config.json's keys)."""
        return cls(model=cfg["model"], max_seq_length=cfg["max_seq_length"], method=cfg["method"],
                   load_in_4bit=cfg["load_in_4bit"], gradient_checkpointing=cfg["gradient_checkpointing"],
                   seed=cfg["seed"], chat_template=cfg["chat_template"], extend_vocab=cfg["extend_vocab"],
                   trim_vocab=cfg.get("trim_vocab", "none"), lora=lora_kwargs(cfg) if cfg["method"] != "full" else None)


def resolve_dtype(setting: str, backend: str):
    """The training dtype for train.dtype / pretrain.dtype (auto | bf16 | fp16 | fp32) on this machine."""
    import torch

    if not torch.cuda.is_available():
        if setting == "bf16":  # CPU autocast; fast only where the CPU has bf16 instructions (AVX512-BF16, AMX)
            return torch.bfloat16
        if setting == "fp16":
            log.warning("train.dtype fp16 ignored on CPU: training in fp32")
        return torch.float32
    if setting == "auto":
        if backend == "unsloth":
            from unsloth import is_bfloat16_supported

            bf16 = is_bfloat16_supported()
        else:
            bf16 = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setting]


def lora_kwargs(cfg: dict) -> dict:
    return dict(
        r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        target_modules=list(cfg["target_modules"]),
        bias=cfg["lora_bias"],
        use_rslora=cfg["use_rslora"],
    )


def training_texts(rows: list[dict]) -> list[str]:
    """Every message of the training rows, each distinct text once (the system prompt is in every row)."""
    return list(dict.fromkeys(m["content"] for row in rows for m in row["messages"] if isinstance(m, dict)
                              and isinstance(m.get("content"), str)))


def load_for_training(cfg: dict, backend: str, dtype, on_gpu: bool, train_rows: list[dict]):
    """(model ready to train (vocabulary extended from the train rows if so set, LoRA wrapped unless method
    full), tokenizer, what loading decided)."""
    texts = training_texts(train_rows)  # the train split only: never a character seen only in valid or test
    if backend == "unsloth":
        return load_unsloth(Loading.for_train(cfg), dtype, texts, train_rows)
    return load_hf(Loading.for_train(cfg), dtype, on_gpu, texts, train_rows)


TRIM_RENDERED = 2000  # train conversations rendered whole for train.trim_vocab (the template's tokens, boundaries)


def trim_vocabulary(load: Loading, model, tokenizer, texts: list[str], train_rows: list[dict]):
    """train.trim_vocab (wenyan/trim.py): the vocabulary cut to the tokens of the train split's texts (each message,
    and a spread of whole rendered conversations) + single CJK characters, bytes and specials; (tokenizer, kept ids
    or None, stats)."""
    from wenyan import trim

    setting = load.trim_vocab
    if not trim.wanted(setting, tokenizer):
        return tokenizer, None, {"setting": setting, "trimmed": False, "vocab_size": len(tokenizer)}
    step = max(1, len(train_rows) // TRIM_RENDERED)
    rendered = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in train_rows[::step]]
    return trim.apply(setting, model, tokenizer, texts + rendered)


def new_template_ids(tokenizer, chat_template: str | None) -> list[int]:
    """train.chat_template set on the tokenizer; the ids it added (its special tokens missing from the vocabulary).
    By ids, not by the vocabulary's size: a vocabulary may spell one piece twice (Gemma's GGUF has two "\\t"), so
    len(get_vocab()) is below the embedding's rows and a size would take the last real token for a new one."""
    before = set(tokenizer.get_vocab().values())
    apply_chat_template_override(tokenizer, chat_template)
    return sorted(set(tokenizer.get_vocab().values()) - before)


def load_unsloth(load: Loading, dtype, texts: list[str], train_rows: list[dict] = ()):
    """unsloth's FastLanguageModel: fused kernels, "unsloth" gradient checkpointing, 4-bit via bitsandbytes;
    the vocabulary extended from `texts` (train.extend_vocab) before LoRA wraps the model."""
    from unsloth import FastLanguageModel

    gc = load.gradient_checkpointing
    gc = "unsloth" if gc in ("auto", "unsloth") else bool(gc)
    extra = {}
    if world()[2] > 1:  # DDP: each process loads its copy onto its own GPU
        extra["device_map"] = {"": world()[1]}
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=materialize(load.model),
        max_seq_length=load.max_seq_length,
        dtype=dtype,
        load_in_4bit=load.load_in_4bit,
        full_finetuning=load.method == "full",
        use_gradient_checkpointing=gc,
        random_state=load.seed,
        **extra,
    )
    # the same named templates as the hf path (prompt.CHAT_TEMPLATES), so both backends train on the same text;
    # a base model without a template and none named: one error
    added = new_template_ids(tokenizer, load.chat_template)
    if added and max(added) >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(max(added) + 1)
    fix_special_tokens(tokenizer)
    check_chat_template(tokenizer, f"train.model {load.model}")
    tokenizer, kept, trim_stats = trim_vocabulary(load, model, tokenizer, texts, list(train_rows))
    new_ids, vocab_stats = extend_vocabulary(load, model, tokenizer, texts, "unsloth")
    if load.method != "full":
        model = FastLanguageModel.get_peft_model(
            model, **load.lora, use_gradient_checkpointing=gc, random_state=load.seed,
            max_seq_length=load.max_seq_length, **vocab.lora_vocab_kwargs(model, new_ids, load.method, "unsloth"),
        )
    return model, tokenizer, {"gradient_checkpointing": gc, "added_tokens": [], "vocab": vocab_stats,
                              "trim": trim_stats, "kept_ids": kept}


def load_hf(load: Loading, dtype, on_gpu: bool, texts: list[str], train_rows: list[dict] = ()):
    """transformers + peft: the CPU path, and the GPU baseline of benchmarks/train_backends.py; the vocabulary
    extended from `texts` (train.extend_vocab) before LoRA wraps the model."""
    import torch

    from transformers import AutoTokenizer

    # the model's own template or train.chat_template (a base model may have none: the override comes first),
    # eos = end of turn, a pad token; a named template's special tokens missing from the vocabulary are added
    tokenizer = AutoTokenizer.from_pretrained(materialize(load.model))
    added = new_template_ids(tokenizer, load.chat_template)
    fix_special_tokens(tokenizer)
    check_chat_template(tokenizer, f"train.model {load.model}")
    gc = load.gradient_checkpointing
    gc = False if gc == "auto" else bool(gc)  # "unsloth" means plain checkpointing here
    if load.load_in_4bit:
        if not on_gpu:
            raise PipelineError("train.load_in_4bit / method qlora needs a CUDA GPU (bitsandbytes); use method lora on CPU")
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = AutoModelForCausalLM.from_pretrained(
            materialize(load.model), quantization_config=quant, dtype=dtype,
            device_map={"": world()[1]},
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    else:
        # full fine-tuning keeps fp32 master weights (bf16/fp16 autocast); LoRA freezes a half-precision base
        load_dtype = torch.float32 if load.method == "full" else dtype
        model = load_model(load.model, dtype=load_dtype, device="cuda" if on_gpu else "cpu")
    if added and max(added) >= model.get_input_embeddings().num_embeddings:
        log.info("chat template %s added %d token(s): resizing the embeddings", load.chat_template, len(added))
        model.resize_token_embeddings(max(added) + 1)
    tokenizer, kept, trim_stats = trim_vocabulary(load, model, tokenizer, texts, list(train_rows))
    if kept is not None:  # the template's added rows are kept rows too: renumbered
        template_ids = set(added)
        added = [i for i, old in enumerate(kept) if old in template_ids]
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    new_ids, vocab_stats = extend_vocabulary(load, model, tokenizer, texts, "hf")
    if load.method != "full":
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(load.seed)  # LoRA's A matrices start random: seed them, or two runs differ from step 1

        # new rows (template tokens, whole characters) start untrained: LoRA trains exactly those rows too
        extra = vocab.lora_vocab_kwargs(model, added + new_ids, load.method)
        peft_config = LoraConfig(task_type="CAUSAL_LM", **load.lora, **extra)
        model = get_peft_model(model, peft_config)
    return model, tokenizer, {"gradient_checkpointing": gc, "added_tokens": added + new_ids, "vocab": vocab_stats,
                              "trim": trim_stats, "kept_ids": kept}


def extend_vocabulary(load: Loading, model, tokenizer, texts: list[str], backend: str) -> tuple[list[int], dict]:
    """train.extend_vocab: the training texts' frequent CJK characters become whole tokens (wenyan/vocab.py),
    each new embedding row the mean of its byte pieces; (new ids, stats for training_config and the summary).
    The extended tokenizer is saved with the model, so evaluate, translate and export load exactly it."""
    new_tokens, stats = vocab.decide(load.extend_vocab, tokenizer, texts)
    if not new_tokens:
        return [], stats
    if backend == "unsloth" and load.method != "full":  # unsloth's add_new_tokens flags embed/lm_head to train
        return vocab.extend_unsloth(model, tokenizer, new_tokens), stats
    pieces = vocab.piece_ids(tokenizer, new_tokens)  # the base vocabulary's byte pieces, before adding
    vocab.extend_tokenizer(tokenizer, new_tokens)
    return vocab.extend_embeddings(model, tokenizer, new_tokens, pieces), stats
