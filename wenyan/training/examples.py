"""Training examples for the train stage: conversations -> token ids with the reply-only mask, examples, rows a batch.

Loss on the reply only, the same for both backends: each conversation is tokenized with the chat template
(wenyan.prompt.encode_messages: the prompt exactly as at inference); the completion mask is 1 on exactly the
assistant text plus its end-of-turn token and 0 on the prompt and anything the template adds after it.
SFTTrainer gets a pre-tokenized dataset {input_ids, completion_mask} with completion_only_loss=True and turns the
mask into labels (-100 elsewhere); unsloth's dataset preparation does the same with the same columns.
"""

from __future__ import annotations

import os

from wenyan import token_cache
from wenyan.errors import PipelineError, get_logger
from wenyan.prompt import control_token_text, encode_messages, end_of_turn_id, end_of_turn_token

log = get_logger("training")


def check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or len(messages) < 2:
        raise PipelineError(f"{where}: 'messages' must be a list [system?, user, assistant]")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PipelineError(f"{where}: each message needs a string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise PipelineError(f"{where}: the last message must be the assistant's reply, got role {messages[-1]['role']!r}")
    if messages[-2]["role"] != "user":
        raise PipelineError(f"{where}: the reply must follow a user message, got role {messages[-2]['role']!r}")


def tokenize_conversations(tokenizer, conversations: list[list[dict]], eot_id: int, names: list[str] | None = None):
    """Tokenize whole conversations (encode_messages: the prompt exactly as at inference); return
    [(input_ids, completion_mask, retokenized)], the mask 1 on exactly the last assistant reply plus its
    end-of-turn token, 0 on the prompt and on anything the template adds after the end-of-turn token."""
    names = names or [f"conversation {i}" for i in range(len(conversations))]
    out = []
    for name, (prompt, reply, retokenized) in zip(names, encode_messages(tokenizer, conversations, names)):
        if eot_id not in reply:
            raise PipelineError(
                f"{name}: the chat template puts no end-of-turn token ({tokenizer.convert_ids_to_tokens(eot_id)}) "
                f"after the reply, so the model could not learn to stop; use a chat template that does (train.chat_template)"
            )
        end = reply.index(eot_id) + 1  # keep the reply and its end-of-turn token, mask what follows ("\n")
        out.append((prompt + reply, [0] * len(prompt) + [1] * end + [0] * (len(reply) - end), retokenized))
    return out


PARALLEL_ROWS = 20_000  # rows per process at least before tokenizing goes parallel (the whole corpus: 543k rows)


_WORKER: tuple = ()  # (tokenizer, eot_id) for the forked tokenizing processes


def _tokenize_chunk(chunk):
    conversations, names = chunk
    tokenizer, eot_id = _WORKER
    return tokenize_conversations(tokenizer, conversations, eot_id, names)


def tokenize_in_parallel(tokenizer, conversations: list[list[dict]], eot_id: int, names: list[str]):
    """tokenize_conversations over contiguous chunks in forked processes (one per CPU core, at least
    PARALLEL_ROWS rows each), results in the input order: rendering the chat template is Python (Jinja), and
    one process takes minutes for the whole corpus, which on a lent GPU is minutes of GPU time."""
    processes = min(os.cpu_count() or 1, len(conversations) // PARALLEL_ROWS)
    if processes < 2 or "fork" not in __import__("multiprocessing").get_all_start_methods():
        return tokenize_conversations(tokenizer, conversations, eot_id, names)
    import multiprocessing

    global _WORKER
    _WORKER = (tokenizer, eot_id)
    size = -(-len(conversations) // processes)
    chunks = [(conversations[i : i + size], names[i : i + size]) for i in range(0, len(conversations), size)]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process; the processes are the parallelism
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            parts = pool.map(_tokenize_chunk, chunks)
    finally:
        _WORKER = ()
    log.info("tokenized %d conversations in %d processes", len(conversations), processes)
    return [item for part in parts for item in part]


def tokenize_rows(tokenizer, rows: list[dict], max_seq_length: int, source: str) -> list[tuple]:
    """One (example {input_ids, completion_mask} or None, truncated, retokenized) per row, truncated to
    max_seq_length; None where truncation left no completion token (such a row is dropped, never kept with no
    loss)."""
    for i, row in enumerate(rows):
        check_messages(row.get("messages"), f"{source}:{i + 1} (id {row.get('id', '?')})")
    eot_id = end_of_turn_id(tokenizer)
    names = [f"{source} id {row.get('id', i)}" for i, row in enumerate(rows)]
    out = []
    conversations = [row["messages"] for row in rows]
    tokenized = token_cache.cached(tokenizer, conversations, eot_id,  # tokenise once: wenyan/token_cache.py
                                   lambda c: tokenize_in_parallel(tokenizer, c, eot_id, names))
    for ids, mask, retokenized in tokenized:
        truncated = len(ids) > max_seq_length
        if truncated:
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
        keep = not truncated or any(mask)
        out.append(({"input_ids": ids, "completion_mask": mask} if keep else None, truncated, retokenized))
    return out


def build_examples(tokenizer, rows: list[dict], max_seq_length: int, source: str) -> tuple[list[dict], dict]:
    """Tokenized examples {input_ids, completion_mask} of all rows (tokenize_rows) with their stats; logged."""
    tokenized = tokenize_rows(tokenizer, rows, max_seq_length, source)
    examples = [example for example, _, _ in tokenized if example is not None]
    dropped = len(tokenized) - len(examples)
    stats = {
        "rows": len(rows),
        "retokenized_at_reply": sum(r for _, _, r in tokenized),
        "examples": len(examples),
        "dropped_truncation": dropped,
        "truncated_kept": sum(1 for e, truncated, _ in tokenized if truncated and e is not None),
        "tokens": sum(len(e["input_ids"]) for e in examples),
        "completion_tokens": sum(sum(e["completion_mask"]) for e in examples),
        # texts spelling a control token (<|im_end|> in a reply): encoded as text, so the reply is trained whole
        "rows_with_control_token_text": control_token_text(tokenizer, [row["messages"] for row in rows]),
    }
    if stats["rows_with_control_token_text"]:
        log.warning("%s: %d conversation(s) spell a control token (such as %s) in their text; encoded as plain text, "
                    "never as the token", source, stats["rows_with_control_token_text"], end_of_turn_token(tokenizer))
    if stats["retokenized_at_reply"]:
        log.info(
            "%s: %d conversations tokenize differently across the prompt/reply boundary; their reply is "
            "tokenized after the prompt's tokens, as the model produces it at inference",
            source, stats["retokenized_at_reply"],
        )
    log.info(
        "%s: kept %d/%d examples; %d dropped (prompt fills max_seq_length %d, no reply token left), "
        "%d kept with a truncated reply; %d tokens, %d of them trained (reply + end of turn)",
        source, stats["examples"], stats["rows"], dropped, max_seq_length, stats["truncated_kept"],
        stats["tokens"], stats["completion_tokens"],
    )
    return examples, stats


def rows_per_batch(lengths: list[int], batch_tokens: int, batch_size: int) -> int:
    """Batch by tokens: rows per micro-batch so that a batch holds ~batch_tokens real tokens
    (short classical sentences would otherwise leave the GPU launch-bound). batch_tokens 0 = batch_size rows."""
    if batch_tokens <= 0 or not lengths:
        return batch_size
    return max(1, int(batch_tokens / (sum(lengths) / len(lengths))))

