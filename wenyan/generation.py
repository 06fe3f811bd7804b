"""Generation: backend choice, device and dtype, generate() (batched, left padding, stops at the end of turn), on
CPU greedy decoding this module's own loop (greedy_batch: reports/benchmarks/generation.md), on CUDA greedy decoding
the slot loop (slot_greedy, below; issue #24: reports/benchmarks/generation_gpu.md).

The slot loop (slot_greedy):

What it does (issue #24), and what it takes from transformers 5.17 or adds:
  - the model's own forward (any decoder whose attention goes through transformers' attention interface and
    which takes a prepared 4-D mask and explicit position ids: Llama, SmolLM2, Qwen2, ...), in the model's
    dtype (bf16 weights on CUDA: device_and_dtype);
  - SlotCache (added here): per layer one key and one value tensor [slots, kv_heads, columns, head_dim],
    allocated once per batch shape. transformers' StaticCache writes every row of the batch at the same
    running position and cannot take a new sentence into one row while the others go on, which is what this
    needs: each slot holds one sentence, and a sentence that ends (end-of-turn token or its own budget) leaves
    its slot at once; waiting sentences join the free slots in one prefill (length-sorted, longest first), and
    when none wait the batch shrinks (halves) to a smaller cache;
  - columns: [shared prefix | ring of R columns]. The token prefix every prompt shares (chat template, system
    prompt, instruction) is computed once and written once into every slot; the rest of a prompt and its
    generated tokens go round a ring of R = longest rest + largest budget columns, all slots writing the same
    column at a step. Keys are cached after their rotary embedding, so where a key sits in the cache does not
    matter: each slot's attention mask (its own columns) and position ids (0, 1, 2, ... as in an unpadded
    prompt) make the computation that of the sentence alone;
  - decode attention (added here, "slot_sdpa" in transformers' attention interface, used while this runs when
    the model uses sdpa): one query token per row, so the query heads that share a key/value head are laid out
    as that head's query rows and torch's scaled_dot_product_attention reads the cache once, instead of
    transformers' sdpa path copying every key and value head group-fold (repeat_kv) at every step;
  - cuda_graph=True (CUDA only, off by default): the decode step of each batch shape is captured once as a CUDA
    graph and replayed (a 135M model is bound by kernel launches at batch 512). The first replay of each shape
    is checked against the eager step it replaces; a capture that fails or disagrees is logged and the eager
    step is used from then on.
transformers' own generate_batch (paged continuous batching) ran 52.5 sentences/s and generate() with
cache_implementation="static" 19.5/s on an H200 (the report of commit 9061d8c): not fast enough; the new
report measures generate_batch again in the same run.
Greedy outputs equal generate()'s in fp32 (tests/test_slot_generation.py); in bf16 they differ where rounding
differs, as generate()'s own outputs do between batch sizes (benchmarks/generation_gpu.py measures both).
"""

from __future__ import annotations

from collections import deque

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


# Long (~80 lines, a quarter of them the docstring): one batch loop shared by both decoding loops.
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
    cuda_graph: bool | None = None,
) -> tuple[list[str], list[bool]]:
    """Translate each prompt; returns (texts, hit_limit) in the order of `prompts`.

    Prompts are sorted by length (longest first, so an out-of-memory error shows at once) and
    batched with left padding; each output is sliced off at the padded input length, cut at the first
    end-of-turn token and at the sentence's own budget. hit_limit[i] is True when sentence i reached
    its budget without ending its turn.

    loop: "own" = greedy_batch below (greedy only), "slot" = slot_greedy below (greedy only: batch_size slots, a
    sentence leaves its slot when it ends and a waiting one takes it; the GPU path), "hf" = transformers'
    generate(), "auto" = own for greedy decoding on CPU, slot for greedy on CUDA, hf for beam search.
    cuda_graph: the slot loop's decode step as CUDA graphs (None = CUDA_GRAPH).

    shard=(rank, processes) (evaluate.num_gpus): this process runs only batches rank, rank + processes, ...
    of the length-sorted batches, the others' places come back None (distributed.gather_shards fills them).
    Whole batches, cut as one process cuts them, with the shared prefix of all prompts: every sentence is
    computed with the same padded batch as in a one-process run, and the longest batches go one to each
    process, so the shards take about as long as each other. The slot loop takes the same shard's sentences."""
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
        loop = "hf" if num_beams != 1 else "slot" if device.type == "cuda" else "own"
    if loop in ("own", "slot") and num_beams != 1:
        raise PipelineError(f"the {loop} generation loop is greedy only; use loop='hf' for beam search")
    rank, processes = shard
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)][rank::processes]
    if loop == "slot":  # one "batch" of this shard's sentences: the slots take them longest first
        batches = [[i for batch in batches for i in batch]] if batches else []
    outputs: list[str | None] = [None] * len(prompts)
    hit_limit: list[bool | None] = [None] * len(prompts)
    with torch.inference_mode(), tqdm(total=sum(map(len, batches)), desc=desc, unit="sent") as bar:
        prefix = shared_prefix(model, input_ids) if loop == "own" and batches else None
        for batch in batches:
            if loop == "slot":
                new_tokens = slot_greedy(model, [input_ids[i] for i in batch], [budgets[i] for i in batch], eos, pad_id,
                                         batch_size=batch_size, progress=bar.update, stats=LAST_SLOT_RUN,
                                         cuda_graph=CUDA_GRAPH if cuda_graph is None else cuda_graph)
            elif loop == "own":
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
            if loop != "slot":  # the slot loop counts each sentence as it ends
                bar.update(len(batch))
    return outputs, hit_limit


def shared_prefix(model, input_ids: list[list[int]]):
    """(length, KV cache) of the token prefix that every prompt shares (chat template + system prompt +
    instruction: 112 of ~156 tokens with the default params), computed once; (0, None) if there is none.
    At least one token of each prompt is left out of it, so each prompt has logits to start from."""
    from transformers import DynamicCache
    import torch

    first, length = input_ids[0], common_prefix(input_ids)
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


# ----------------------------------------------------------------------------------------------
# The GPU path: greedy decoding over a fixed set of batch slots (slot_greedy; the module docstring says what it
# takes from transformers and what it adds)


ATTENTION_NAME = "slot_sdpa"
CUDA_GRAPH = True  # default of generate(cuda_graph=None): on one H200 537 vs 186 sentences/s at 512 slots, same outputs (reports/benchmarks/generation_gpu.md)
LAST_SLOT_RUN: dict = {}  # generate()'s last slot run: decode steps, prefills, graph replays, ... (for benchmarks)


class SlotCache:
    """The KV cache of a slot batch; transformers' attention layers call update(keys, values, layer_idx).

    mode "prefill": rows = slot indices (a tensor), cols = ring columns of the new tokens; the new keys and
    values are written there and returned after the shared prefix's (the prefill attends to the prefix and to
    itself). mode "decode": one token a slot, written at column `col` (a 1-element tensor, so a CUDA graph can
    replay it) of every slot; the whole cache is returned, the mask says which columns each slot sees."""

    is_compileable = False

    def __init__(self, slots: int, columns: int, prefix: int):
        self.slots, self.columns, self.prefix = slots, columns, prefix
        self.keys: list = []
        self.values: list = []
        self.mode = "decode"
        self.rows = self.cols = self.col = None

    def allocate_like(self, layer_idx: int, key_states, value_states) -> None:
        import torch

        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is None:
            k, v = key_states.shape, value_states.shape
            self.keys[layer_idx] = torch.zeros((self.slots, k[1], self.columns, k[3]), dtype=key_states.dtype,
                                               device=key_states.device)
            self.values[layer_idx] = torch.zeros((self.slots, v[1], self.columns, v[3]), dtype=value_states.dtype,
                                                 device=value_states.device)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        import torch

        self.allocate_like(layer_idx, key_states, value_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.mode == "decode":
            keys.index_copy_(2, self.col, key_states)
            values.index_copy_(2, self.col, value_states)
            return keys, values
        # prefill: advanced indices in dims 0 and 2 around a slice put the indexed dims first: [rows, cols, heads, dim]
        rows, cols = self.rows[:, None], self.cols[None, :]
        keys[rows, :, cols] = key_states.transpose(1, 2)
        values[rows, :, cols] = value_states.transpose(1, 2)
        if self.prefix == 0:
            return key_states, value_states
        return (torch.cat([keys[self.rows, :, : self.prefix], key_states], dim=2),
                torch.cat([values[self.rows, :, : self.prefix], value_states], dim=2))

    def write_prefix(self, prefix_cache) -> None:
        """The shared prefix's keys and values (a DynamicCache of batch 1) into columns [0, prefix) of every slot."""
        for layer_idx, layer in enumerate(prefix_cache.layers):
            self.allocate_like(layer_idx, layer.keys, layer.values)
            self.keys[layer_idx][:, :, : self.prefix] = layer.keys
            self.values[layer_idx][:, :, : self.prefix] = layer.values

    def select(self, index, slots: int) -> "SlotCache":
        """A smaller cache with the slots `index` (a tensor), in that order."""
        smaller = SlotCache(slots, self.columns, self.prefix)
        smaller.keys = [k.index_select(0, index) for k in self.keys]
        smaller.values = [v.index_select(0, index) for v in self.values]
        return smaller

    # what transformers' model code may ask a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def __len__(self) -> int:
        return len(self.keys)


def grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa for one query token a row without repeating the key/value heads: query [B, H, 1, D] -> [B, KV, H/KV, D]
    (query head h uses key/value head h // (H/KV), as repeat_kv lays them out), mask [B, 1, 1, L] broadcast.
    Anything else goes to transformers' sdpa_attention_forward."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or attention_mask is None or attention_mask.dim() != 4 or heads == kv_heads or heads % kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, 1, heads, value.shape[-1]), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, grouped_decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def common_prefix(input_ids: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving at least one token of each prompt out (its logits start it)."""
    first, length = input_ids[0], min(len(ids) for ids in input_ids) - 1
    for ids in input_ids:
        length = next((k for k in range(length) if ids[k] != first[k]), length)
    return max(length, 0)


class _Graph:
    """A captured decode step of one batch shape (CUDA graphs); None when capture failed."""

    def __init__(self, run):
        import torch

        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph, as torch asks
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(self.graph):
            self.out = run()


def slot_greedy(model, input_ids: list[list[int]], budgets: list[int], eos: set[int], pad_id: int, *,
                batch_size: int = 512, refill: float = 0.125, share_prefix: bool = True, cuda_graph: bool = False,
                grouped_attention: bool = True, min_batch: int = 8, progress=None,
                stats: dict | None = None) -> list[list[int]]:
    """Greedy decoding of every prompt; returns each one's new tokens (in prompt order), ending with its first
    end-of-turn token (in `eos`) or at its budget, as greedy_batch does.

    batch_size slots at most; waiting prompts (longest first) join in one prefill once refill x batch_size
    slots are free (or none is busy); with no prompt waiting the batch halves whenever half of it is free, down
    to min_batch. progress(n): called with the number of sentences just finished. stats: a dict filled with
    what ran (decode_steps, prefills, shrinks, graph_replays, columns, shared_prefix, slots, grouped_attention)."""
    import torch

    n = len(input_ids)
    if n == 0:
        return []
    budgets = [max(1, b) for b in budgets]  # one token at least, as greedy_batch gives (the caller cuts at the budget)
    device = next(model.parameters()).device
    order = deque(sorted(range(n), key=lambda i: (len(input_ids[i]), budgets[i]), reverse=True))
    p = common_prefix(input_ids) if share_prefix and n > 1 else 0
    ring = max(len(ids) - p for ids in input_ids) + max(budgets)
    columns = -(-(p + ring) // 64) * 64  # a multiple of 64 (aligned mask rows for the attention kernels)
    ring = columns - p
    slots = max(1, min(batch_size, n))

    config = getattr(model, "config", None)
    previous_attention = getattr(config, "_attn_implementation", None)
    use_grouped = grouped_attention and previous_attention == "sdpa"
    if use_grouped:
        register_attention()
        config._attn_implementation = ATTENTION_NAME
    counts = {"slots": slots, "columns": columns, "shared_prefix": p, "grouped_attention": use_grouped,
              "decode_steps": 0, "prefills": 0, "shrinks": 0, "graph_replays": 0}
    if stats is not None:
        stats.clear()
        stats.update(counts)
        counts = stats
    try:
        return _run(model, input_ids, budgets, eos, pad_id, order, p, ring, columns, slots, refill, min_batch,
                    cuda_graph and device.type == "cuda", device, progress, counts)
    finally:
        if use_grouped:
            config._attn_implementation = previous_attention


# Long (~140 lines): the slot loop's one decode loop: admit, step (eager or CUDA graph), retire, refill, shrink share
# the slot state (ring, columns, positions); split into functions it would pass a dozen tensors back and forth.
def _run(model, input_ids, budgets, eos, pad_id, order, p, ring, columns, slots, refill, min_batch, cuda_graph,
         device, progress, counts):
    import torch
    from transformers import DynamicCache

    prefix_cache = None
    if p:
        prefix_cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([input_ids[order[0]][:p]], device=device), past_key_values=prefix_cache,
              use_cache=True, logits_to_keep=1)

    def new_state(size):
        state = {
            "cache": SlotCache(size, columns, p),
            "mask": torch.zeros((size, 1, 1, columns), dtype=torch.bool, device=device),
            "tokens": torch.full((size, 1), pad_id, dtype=torch.long, device=device),
            "positions": torch.zeros((size, 1), dtype=torch.long, device=device),
            "col": torch.zeros(1, dtype=torch.long, device=device),
        }
        state["mask"][:, :, :, :p] = True
        state["cache"].col = state["col"]
        return state

    state = new_state(slots)
    if prefix_cache is not None:
        state["cache"].write_prefix(prefix_cache)
    graphs: dict[int, object] = {}
    graph_ok = [cuda_graph]

    outputs: list[list[int]] = [[] for _ in input_ids]
    slot_row = [-1] * slots  # the sentence in each slot, -1 = free
    t = 0  # decode steps so far; the step writes ring column t % ring

    def finish():
        if progress is not None:
            progress(1)

    def admit(free: list[int]):
        """Prefill the next waiting prompts into the free slots (one forward), take their first token."""
        counts["prefills"] += 1
        take = [order.popleft() for _ in range(min(len(free), len(order)))]
        free = free[: len(take)]
        rests = [input_ids[i][p:] for i in take]
        width = max(map(len, rests))
        cols = p + (t - width + torch.arange(width)) % ring  # the columns before this step's, in ring order
        ids = torch.full((len(take), width), pad_id, dtype=torch.long)
        valid = torch.zeros((len(take), width), dtype=torch.bool)
        for row, rest in enumerate(rests):
            ids[row, width - len(rest):] = torch.tensor(rest)
            valid[row, width - len(rest):] = True
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0) + p
        valid_d = valid.to(device)
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        own = causal[None] & valid_d[:, None, :]
        own |= torch.eye(width, dtype=torch.bool, device=device)[None]  # a padding row sees itself: no row without a key
        mask4 = torch.cat([torch.ones((len(take), width, p), dtype=torch.bool, device=device), own], dim=2)[:, None]
        cache = state["cache"]
        rows_t = torch.tensor(free, device=device)
        cache.mode, cache.rows, cache.cols = "prefill", rows_t, cols.to(device)
        try:
            logits = model(input_ids=ids.to(device), attention_mask=mask4, position_ids=positions.to(device),
                           past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        finally:
            cache.mode = "decode"
        first = logits[:, -1].argmax(-1)
        mask = state["mask"]
        mask[rows_t, :, :, p:] = False
        valid_cols = torch.zeros((len(take), columns), dtype=torch.bool, device=device)
        valid_cols[:, cols.to(device)] = valid_d
        mask[rows_t, 0, 0, :] |= valid_cols
        state["tokens"][rows_t, 0] = first
        state["positions"][rows_t, 0] = torch.tensor([len(input_ids[i]) for i in take], device=device)
        for slot, i, token in zip(free, take, first.tolist()):
            outputs[i].append(token)
            if token in eos or budgets[i] <= 1:
                finish()
            else:
                slot_row[slot] = i

    def step_eager(st):
        return model(input_ids=st["tokens"], attention_mask=st["mask"], position_ids=st["positions"],
                     past_key_values=st["cache"], use_cache=True).logits[:, -1].argmax(-1)

    def step(st):
        size = len(slot_row)
        if not graph_ok[0]:
            return step_eager(st)
        if size not in graphs:
            expected = step_eager(st)  # the step itself; a replay of the same inputs rewrites the same column
            try:
                graph = _Graph(lambda: step_eager(st))
                graph.graph.replay()
                if not torch.equal(graph.out, expected):
                    raise RuntimeError("the replayed step disagrees with the eager step")
                graphs[size] = graph
            except Exception as exc:  # noqa: BLE001  (any capture problem: the eager step works)
                log.warning("CUDA graph of the decode step (batch %d) not used: %s", size, exc)
                graph_ok[0] = False
                graphs.clear()
            return expected
        graphs[size].graph.replay()
        counts["graph_replays"] += 1
        return graphs[size].out.clone()

    while True:
        free = [s for s, i in enumerate(slot_row) if i < 0]
        busy = len(slot_row) - len(free)
        if order and (busy == 0 or len(free) >= max(1, int(refill * len(slot_row)))):
            admit(free)
            continue
        if busy == 0:
            break
        if not order and busy <= len(slot_row) // 2 and len(slot_row) > min_batch:
            keep = [s for s, i in enumerate(slot_row) if i >= 0]
            size = max(len(slot_row) // 2, min_batch)
            keep += [s for s, i in enumerate(slot_row) if i < 0][: size - len(keep)]  # free ones fill it up
            index = torch.tensor(keep, device=device)
            smaller = {"cache": state["cache"].select(index, size), "mask": state["mask"][index].clone(),
                       "tokens": state["tokens"][index].clone(), "positions": state["positions"][index].clone(),
                       "col": state["col"]}
            smaller["cache"].col = state["col"]
            state = smaller
            slot_row = [slot_row[s] for s in keep]
            graphs.clear()  # a graph holds the tensors (and memory) it was captured with
            counts["shrinks"] += 1
            continue
        column = p + t % ring
        state["col"].fill_(column)
        state["mask"][:, :, :, column] = True
        next_ids = step(state)
        counts["decode_steps"] += 1
        t += 1
        state["positions"] += 1
        state["tokens"][:, 0] = next_ids
        for slot, token in enumerate(next_ids.tolist()):  # the one host sync of a step
            i = slot_row[slot]
            if i < 0:
                continue
            outputs[i].append(token)
            if token in eos or len(outputs[i]) >= budgets[i]:
                slot_row[slot] = -1
                finish()
    return outputs


def generate_sharded(model, tokenizer, prompts, sources, **gen) -> tuple[list[str], list[bool]]:
    """generate() over all torchrun processes (evaluate.num_gpus): this one's shard, then everyone's outputs in
    prompt order (distributed.gather_shards); afterwards only rank 0 goes on."""
    from wenyan import distributed

    rank, _, processes = distributed.world()
    raw, hit = generate(model, tokenizer, prompts, sources, shard=(rank, processes), **gen)
    raw, hit = distributed.gather_shards(raw, hit)
    distributed.finish()  # what follows is rank 0's alone
    return raw, hit
