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
from wenyan.params import Int, Param, Str


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
    # Gemma 3's own (google/gemma-3-*-it): the system message opens the first user turn, the assistant is "model",
    # each message trimmed; the base GGUF (gemma-3-270m) ships no template, so train.chat_template names this one.
    "gemma-3": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] | trim + '\n\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
        " + '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}


# The special tokens each named template needs as single tokens.
TEMPLATE_SPECIAL_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "qwen-2.5": ["<|im_start|>", "<|im_end|>"],
    "llama-3.1": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "gemma-3": ["<start_of_turn>", "<end_of_turn>"],  # in Gemma's vocabulary already: marked special, no new ids
}
# Tokens that end a reply besides the template's end-of-turn token and eos (fix_special_tokens makes eos the
# end-of-turn token, so the model's own eos would be lost): Gemma ends a turn with <end_of_turn>, a text with <eos>.
TEMPLATE_STOP_TOKENS = {"gemma-3": ["<end_of_turn>", "<eos>"]}


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
            raise PipelineError(f"the model's tokenizer has no chat template; set train.chat_template ({', '.join(CHAT_TEMPLATES)})")
        return False
    if name not in CHAT_TEMPLATES:
        raise PipelineError(f"train.chat_template '{name}' is unknown; choose one of: {', '.join(CHAT_TEMPLATES)} (or null)")
    vocab = tokenizer.get_vocab()
    missing = [t for t in TEMPLATE_SPECIAL_TOKENS[name] if t not in vocab]
    specials = set(control_strings(tokenizer))
    plain = [t for t in TEMPLATE_SPECIAL_TOKENS[name] if t in vocab and t not in specials]
    if missing or plain:  # a token of the vocabulary that is not special yet keeps its id (Gemma's <start_of_turn>)
        tokenizer.add_special_tokens({"additional_special_tokens": missing + plain}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    fix_special_tokens(tokenizer)
    return bool(missing)


# ----------------------------------------------------------------------------------------------
# A sentence -> messages (format writes them, translate builds them for new text), messages -> token ids (train,
# evaluate and translate alike), and the tokens that end a turn.


PROMPT_SCHEMA = {  # params.yaml format: (values and comments there)
    "system_prompt": Str(),  # "" = no system message (SmolLM2's template then adds its own)
    # a template is a string or the list of its lines, joined with newlines (join_templates): params.yaml lists them,
    # so that no param value holds a newline (`dvc exp show` would print every row on two lines)
    "user_template": Param((str, list), items=str),  # with {classical}: check_templates
    "context_sentences": Int(min=0, max=100),  # previous sentences a prompt: 100 already overflow max_seq_length 512
    "context_template": Param((str, list), items=str),  # with {context} when context_sentences > 0
}


PROMPT_KEYS = tuple(PROMPT_SCHEMA)


TEMPLATE_FIELDS = {"user_template": "classical", "context_template": "context"}  # each template's one placeholder


def join_templates(params: dict) -> dict:
    """The format section with each template as one string: a list of lines joined with newlines (the form
    params.yaml uses), a string as it is. Run right after the section's check_params, so that what is recorded with
    the model (training_config.json) and every prompt built from it is the same string either way."""
    return {**params, **{key: "\n".join(params[key]) for key in TEMPLATE_FIELDS if isinstance(params.get(key), list)}}


def check_templates(params: dict) -> None:
    """Each template holds its one placeholder, plain: `{classical}` (user_template), `{context}` (context_template),
    once or more, and no other. A conversion, format spec, attribute or index (`{classical!r}`, `{classical:>9}`,
    `{classical.__class__}`, `{classical[0]}`) is refused: str.format would run it on every sentence (a width of 1e8
    is 100 MB a prompt; an attribute reads Python internals into the prompt). Literal braces are written {{ and }}.
    context_template is checked where context_sentences > 0 (it is used only then)."""
    import string

    params = join_templates(params)
    for key, field in TEMPLATE_FIELDS.items():
        template = params[key]
        if key == "context_template" and params["context_sentences"] == 0:
            continue
        where = f"params.yaml 'format.{key}' {template!r} does not format with only {{{field}}}"
        try:
            parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                      if name is not None]  # (None: literal text only)
        except ValueError as exc:  # a lone { or }
            raise PipelineError(f"{where} ({exc}); write literal braces as {{{{ and }}}}") from None
        def named(name: str) -> str:  # classical of classical.x, classical[0]
            return name.split(".")[0].split("[")[0]

        if not any(named(name) == field for name, _, _ in parsed):
            raise PipelineError(f"params.yaml 'format.{key}' should contain {{{field}}}, got {template!r}")
        bad = sorted((p for p in parsed if p != (field, "", None)), key=lambda p: named(p[0]) != field)
        if bad:  # {classical!r}, {classical.x}, {classical[0]} named first, then any other placeholder
            name, spec, conversion = bad[0]
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise PipelineError(f"{where}: {shown} is not allowed (its one placeholder is {{{field}}}, plain: no "
                                f"!conversion, :format spec, .attribute or [index]); write literal braces as "
                                f"{{{{ and }}}}")
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
    names = names or [f"conversation {i}" for i in range(len(conversations))]
    with_reply = [bool(c) and c[-1].get("role") == "assistant" for c in conversations]
    prompts = [tokenizer.apply_chat_template(c[:-1] if r else c, tokenize=False, add_generation_prompt=True)
               for c, r in zip(conversations, with_reply)]
    controls = control_strings(tokenizer)
    unsafe = {i for i, c in enumerate(conversations)
              if any(isinstance(m.get("content"), str) and controls_in(m["content"], controls) for m in c)}
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
        prompt_ids[i] = encode_segments(tokenizer, segments(tokenizer, messages, prompts[i], True, names[i]))
        if i in fulls:
            full_parts[i] = segments(tokenizer, conversations[i], fulls[i], False, names[i])
            full_ids[i] = encode_segments(tokenizer, full_parts[i])
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
            reply = encode_segments(tokenizer, after(full_parts[i], len(prompt)))
        else:
            reply = tokenizer(full[len(prompt) :], add_special_tokens=False).input_ids
        out.append((p, reply, retokenized))
    return out


def control_token_text(tokenizer, conversations: list[list[dict]]) -> int:
    """How many conversations hold the spelling of a control token in a message's text (encoded as text)."""
    controls = control_strings(tokenizer)
    return sum(any(isinstance(m.get("content"), str) and controls_in(m["content"], controls) for m in c)
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
    named = next((name for name, template in CHAT_TEMPLATES.items() if tokenizer.chat_template == template), None)
    for token in (end_of_turn_token(tokenizer), tokenizer.eos_token, *TEMPLATE_STOP_TOKENS.get(named, [])):
        if token is not None:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
    if not ids:
        raise PipelineError("the tokenizer has neither an end-of-turn token nor an eos token to stop generation at")
    return ids


# ----------------------------------------------------------------------------------------------
# Text is text (issue #21, class 7): a sentence or reply that spells a control token (`<|im_end|>`,
# `<|im_start|>assistant`, ...) is encoded as the plain characters it is, never as that token, in training,
# evaluation, translate and export alike (encode_messages goes through here). The chat template is rendered as
# always; where a message's text holds the spelling of a special token, the template is rendered a second time
# with a marker in place of each message's text, which tells exactly which characters of the rendering are the
# template's and which a message's; the template's parts are tokenized with their special tokens parsed, each
# message's text with special tokens split (`split_special_tokens=True`: its characters, by BPE). Text without
# such spellings takes the usual single call, so its ids are exactly what they always were.

Segments = list[tuple[str, bool]]  # (text, is a message's text)


def control_strings(tokenizer) -> list[str]:
    """The spellings of the tokenizer's special tokens (the chat template's markers, eos, pad, ...), longest first.
    Tokens added as plain vocabulary (train.extend_vocab's characters) are not control tokens."""
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            specials.add(str(token))
    return sorted((s for s in specials if s), key=len, reverse=True)


def controls_in(text: str, controls: list[str]) -> list[str]:
    return [c for c in controls if c in text]


def encode_text(tokenizer, text: str) -> list[int]:
    """Plain text -> ids: a control token's spelling becomes its characters' tokens."""
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def segments(tokenizer, messages: list[dict], rendered: str, add_generation_prompt: bool, where: str) -> Segments:
    """The rendering cut into the template's text and each message's text (see the module docstring)."""
    markers = [f"\ue0f0WENYAN{k}\ue0f1" for k in range(len(messages))]
    marked = render(tokenizer, [{**m, "content": s} for m, s in zip(messages, markers)], add_generation_prompt)
    parts, rest = [], marked
    for marker in markers:
        head, sep, rest = rest.partition(marker)
        if not sep or marker in rest:
            raise PipelineError(f"{where}: a message holds the text of a control token and the chat template does not "
                                f"render each message's text once, so it cannot be kept plain text; remove it from the text")
        parts.append(head)
    for variant in (lambda c: c, str.strip):  # Llama 3.1's template trims each message
        texts = [variant(m["content"]) for m in messages]
        if "".join(p + t for p, t in zip(parts, texts)) + rest == rendered:
            out: Segments = []
            for p, t in zip(parts, texts):
                out += [(p, False), (t, True)]
            return [s for s in out + [(rest, False)] if s[0]]
    raise PipelineError(f"{where}: a message holds the text of a control token and the chat template changes message "
                        f"text, so it cannot be kept plain text; remove it from the text")


def encode_segments(tokenizer, parts: Segments) -> list[int]:
    ids: list[int] = []
    for text, is_message in parts:
        ids += encode_text(tokenizer, text) if is_message else tokenizer(text, add_special_tokens=False).input_ids
    return ids


def after(parts: Segments, offset: int) -> Segments:
    """The segments of the rendering from character `offset` on."""
    out, position = [], 0
    for text, is_message in parts:
        end = position + len(text)
        if end > offset:
            out.append((text[max(0, offset - position):], is_message))
        position = end
    return out
