"""The prompt: chat templates, a sentence -> messages, messages -> token ids, token budgets, the stop tokens.

  - build_messages: a source sentence -> [system?, user, assistant?] (format writes them, translate builds them
    for new text);
  - encode_messages: messages -> (prompt ids, reply ids): THE one function for training and inference alike
    (prompt_ids: its prompt half);
  - token_budgets: each sentence's max_new_tokens;
  - end_of_turn_ids: THE stop tokens (the template's end-of-turn token and eos), end_of_turn_id its first;
  - CHAT_TEMPLATES: templates selectable by name (train.chat_template), apply_chat_template_override sets one.
"""

from __future__ import annotations

import math

from wenyan.errors import PipelineError
from wenyan.params import Int, Str


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


def fix_special_tokens(tokenizer, config=None) -> None:
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
    fix_special_tokens(tokenizer)
    return bool(missing)


# ----------------------------------------------------------------------------------------------
# A sentence -> messages (format writes them, translate builds them for new text), messages -> token ids (train,
# evaluate and translate alike), and the tokens that end a turn.


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
    tokenized on its own after the prompt's tokens (retokenized=True): the sequence the model produces."""
    names = names or [f"conversation {i}" for i in range(len(conversations))]
    with_reply = [bool(c) and c[-1].get("role") == "assistant" for c in conversations]
    prompts = [tokenizer.apply_chat_template(c[:-1] if r else c, tokenize=False, add_generation_prompt=True)
               for c, r in zip(conversations, with_reply)]
    # The rendered text already holds the template's special tokens (bos included): add none.
    prompt_ids = tokenizer(prompts, add_special_tokens=False).input_ids if prompts else []
    trained = [i for i, r in enumerate(with_reply) if r]
    fulls = {i: tokenizer.apply_chat_template(conversations[i], tokenize=False) for i in trained}
    full_ids = dict(zip(trained, tokenizer([fulls[i] for i in trained], add_special_tokens=False).input_ids)) if trained else {}
    out = []
    for i, (name, prompt, p) in enumerate(zip(names, prompts, prompt_ids)):
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
        reply = tokenizer(full[len(prompt) :], add_special_tokens=False).input_ids if retokenized else f[len(p) :]
        out.append((p, reply, retokenized))
    return out


def prompt_ids(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """The generation prompt's token ids of each conversation (system? + user)."""
    return [p for p, _, _ in encode_messages(tokenizer, prompts)]


def token_budgets(tokenizer, sources: list[str], factor: float, extra: int) -> list[int]:
    """max_new_tokens of each sentence: ceil(factor x its source tokens) + extra."""
    return [math.ceil(factor * len(tokenizer(s, add_special_tokens=False).input_ids)) + extra for s in sources]


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
