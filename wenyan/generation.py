"""Generation: backend choice, device and dtype, generate() (batched, left padding, stops at the end of turn), and
on CPU greedy decoding this module's own loop (greedy_batch: reports/benchmarks/generation.md)."""

from __future__ import annotations

from wenyan.errors import PipelineError, get_logger
from wenyan.prompt import end_of_turn_ids, prompt_ids, token_budgets

log = get_logger("generation")


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


def own_gpu() -> dict:
    """unsloth's loading argument under torchrun (evaluate.num_gpus > 1): each process on its own GPU."""
    from wenyan.distributed import world

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


def generate_sharded(model, tokenizer, prompts, sources, **gen) -> tuple[list[str], list[bool]]:
    """generate() over all torchrun processes (evaluate.num_gpus): this one's shard, then everyone's outputs in
    prompt order (distributed.gather_shards); afterwards only rank 0 goes on."""
    from wenyan import distributed

    rank, _, processes = distributed.world()
    raw, hit = generate(model, tokenizer, prompts, sources, shard=(rank, processes), **gen)
    raw, hit = distributed.gather_shards(raw, hit)
    distributed.finish()  # what follows is rank 0's alone
    return raw, hit
