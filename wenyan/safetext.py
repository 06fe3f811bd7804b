"""Text is text (issue #21, class 7): a sentence or reply that spells a control token (`<|im_end|>`,
`<|im_start|>assistant`, ...) is encoded as the plain characters it is, never as that token, in training,
evaluation, translate and export alike (the one messages -> ids function goes through here).

How: the chat template is rendered as always. Where a message's text holds the spelling of a special token,
the template is rendered a second time with a marker in place of each message's text, which tells exactly
which characters of the rendering are the template's and which are a message's; the template's parts are
tokenized with their special tokens parsed, each message's text with special tokens split
(`split_special_tokens=True`: its characters, by BPE). Text without such spellings takes the usual single
call, so its ids are exactly what they always were.
"""

from __future__ import annotations

from stages.common import PipelineError

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
