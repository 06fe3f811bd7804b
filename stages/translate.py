"""Translate: Classical Chinese (文言文) into modern Chinese with the fine-tuned model.

    echo '学而时习之，不亦说乎？有朋自远方来，不亦乐乎？' | python -m stages.translate
    python -m stages.translate '学而时习之，不亦说乎？'
    python -m stages.translate --input chapter.txt --output chapter.modern.txt
    wenyan-translate ...            (the same command, installed by `pip install -e .`)

Not a pipeline stage: the tool for using what the pipeline trained. --model is models/adapter (the
train stage's base + LoRA adapter, or its fully fine-tuned model) by default, or models/export/hf (the
export stage's merged model), or any directory with the train stage's training_config.json.

In order:
  1. Each input line is normalised as the training sources were (stages/clean.py: whitespace,
     full-width punctuation, OpenCC per clean.opencc).
  2. Each line is split into sentences after 。！？； (a closing quote or bracket stays with its sentence).
  3. A sentence whose prompt is longer than max_seq_length tokens (training_config.json: the length the
     model was trained on) is split further after ，、 into the longest runs of clauses that fit; a clause
     that still does not fit is an error naming the input line. Nothing is ever truncated.
  4. Each prompt is the training prompt (stages/format.py's build_messages: format.system_prompt,
     format.user_template and, with format.context_sentences N, the N previous sentences of the input as
     context), with settings from --params (default params.yaml), or, for an exported model, from the
     prompt recorded in its training_config.json.
  5. Generation is stages/evaluate.py's: batched longest first, left padding, greedy, stops at the
     end-of-turn token, each output sliced at the padded input length; a tqdm bar on stderr.
  6. The translations of a line's sentences are joined into one output line, so the output has exactly
     as many lines as the input (an empty line stays empty). Written to stdout or, atomically, to --output.

Device: CUDA when available (bf16 or fp16; unsloth's inference for a model trained with unsloth), else
CPU in fp32. Everything is local: no network.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

from stages.common import PipelineError, check_params, get_logger, load_params, run_main, write_text

log = get_logger("translate")

DEFAULT_MODEL = "models/adapter"
SENTENCE_END = "。！？；"
CLAUSE_END = "，、"
CLOSERS = "”’」』）》〉】〕\"'"  # a closing quote or bracket after the end punctuation stays with the sentence
_SENTENCE = re.compile(f"[^{SENTENCE_END}]+[{SENTENCE_END}]*[{CLOSERS}]*|[{SENTENCE_END}]+[{CLOSERS}]*")
_CLAUSE = re.compile(f"[^{CLAUSE_END}]+[{CLAUSE_END}]*|[{CLAUSE_END}]+")


# ----------------------------------------------------------------------------------------------
# Splitting: pure functions on text; "".join(pieces) is always the text itself.


def split_sentences(line: str) -> list[str]:
    """'甲。乙！丙' -> ['甲。', '乙！', '丙']; the punctuation stays with its sentence."""
    return _SENTENCE.findall(line)


def split_clauses(sentence: str) -> list[str]:
    """'甲，乙、丙。' -> ['甲，', '乙、', '丙。']."""
    return _CLAUSE.findall(sentence)


def fit_sentence(sentence: str, fits: Callable[[str], bool], where: str, limit_hint: str) -> list[str]:
    """[sentence] if its prompt fits, else the longest runs of its clauses (split after ，、) that fit.

    A single clause that does not fit is an error naming `where`: it is never cut silently."""
    if fits(sentence):
        return [sentence]
    pieces: list[str] = []
    current = ""
    for clause in split_clauses(sentence):
        if current and fits(current + clause):
            current += clause
            continue
        if current:
            pieces.append(current)
        if not fits(clause):
            shown = clause if len(clause) <= 24 else clause[:24] + "…"
            raise PipelineError(
                f"{where}: the clause '{shown}' ({len(clause)} characters) is too long to translate even after "
                f"splitting its sentence at ，、: its prompt is longer than {limit_hint}. Break the line up "
                f"(add punctuation), or train with a larger train.max_seq_length"
            )
        current = clause
    if current:
        pieces.append(current)
    return pieces


def plan_lines(lines: list[str], fits: Callable[[str], bool], limit_hint: str, source_name: str = "input") -> list[list[str]]:
    """Per input line, the pieces to translate (sentences, or parts of too-long sentences)."""
    planned = []
    for number, line in enumerate(lines, 1):
        pieces = []
        for sentence in split_sentences(line):
            pieces.extend(fit_sentence(sentence, fits, f"{source_name} line {number}", limit_hint))
        planned.append(pieces)
    return planned


def assemble(planned: list[list[str]], translations: list[str]) -> list[str]:
    """Join each line's translated pieces (in order, no separator, as Chinese is written): one output
    line per input line."""
    assert len(translations) == sum(len(p) for p in planned), "one translation per piece"
    out, k = [], 0
    for pieces in planned:
        out.append("".join(translations[k : k + len(pieces)]))
        k += len(pieces)
    return out


def split_input_lines(text: str) -> list[str]:
    """Lines as `wc -l` counts them: separated by \\n (\\r\\n accepted); a final newline ends the last line."""
    text = text.replace("\r\n", "\n")
    if not text:
        return []
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines


# ----------------------------------------------------------------------------------------------
# Prompts: exactly the training prompts (stages/format.py)


def prompt_settings(cfg: dict, model_dir: Path, params_file: Path | None) -> tuple[dict, str | None, str]:
    """(format params, clean.opencc, where they came from). An explicit --params wins; then the prompt an
    exported model records in training_config.json; then ./params.yaml."""
    from stages import format as format_stage

    recorded = cfg.get("prompt")
    if params_file is None and recorded:
        fmt, opencc, origin = recorded.get("format", {}), recorded.get("opencc"), f"{model_dir}/training_config.json"
    else:
        path = Path(params_file or "params.yaml")
        if not path.is_file():
            raise PipelineError(
                f"{path}: not found; translate builds its prompts from params.yaml's format: and clean.opencc "
                f"(the settings the model was trained with): run it from the project directory or pass --params FILE"
            )
        fmt, opencc, origin = load_params("format", path), load_params("clean", path).get("opencc", "t2s"), str(path)
    fmt = check_params(fmt, format_stage.DEFAULTS, "format")
    format_stage.check_templates(fmt)
    return fmt, opencc, origin


def prompt_messages(piece: str, context: list[str], fmt: dict) -> list[dict]:
    from stages.format import build_messages

    return build_messages(piece, "", context, fmt)[:-1]  # without the assistant's turn


def build_prompts(pieces: list[str], fmt: dict, count_tokens: Callable[[list[dict]], int], max_tokens: int | None) -> list[list[dict]]:
    """One prompt per piece; with format.context_sentences N, the N previous pieces of the input as
    context, oldest dropped first where the prompt would pass max_tokens (each piece fits on its own)."""
    n = fmt["context_sentences"]
    prompts = []
    for i, piece in enumerate(pieces):
        context = pieces[max(0, i - n) : i] if n else []
        messages = prompt_messages(piece, context, fmt)
        while context and max_tokens is not None and count_tokens(messages) > max_tokens:
            context = context[1:]
            messages = prompt_messages(piece, context, fmt)
        prompts.append(messages)
    return prompts


# ----------------------------------------------------------------------------------------------
# Input and output


def read_input(text: str | None, input_path: str | None) -> tuple[str, str]:
    """(text, a name for messages): the positional text, the --input file ('-' = stdin), or stdin."""
    if text is not None and input_path is not None:
        raise PipelineError("give the text either as an argument or with --input, not both")
    if text is not None:
        return text, "argument"
    if input_path is not None and input_path != "-":
        try:
            data = Path(input_path).read_bytes()
        except FileNotFoundError:
            raise PipelineError(f"{input_path}: input file not found; check the path (or give '-' to read standard input)") from None
        except IsADirectoryError:
            raise PipelineError(f"{input_path}: is a directory; give a UTF-8 text file to --input") from None
        name = input_path
    else:
        if input_path is None and sys.stdin.isatty():
            raise PipelineError("nothing to translate: give a sentence, --input FILE, or pipe text on standard input")
        data = sys.stdin.buffer.read()
        name = "stdin"
    try:
        return data.decode("utf-8-sig"), name
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start}); convert it first, e.g. iconv -f GBK -t UTF-8") from None


def write_output(lines: list[str], output: str | None) -> None:
    text = "".join(line + "\n" for line in lines)
    if output is None or output == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.buffer.flush()
    else:
        write_text(output, text)  # temporary file + rename: never a half-written output


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="Reads standard input when given neither TEXT nor --input."
    )
    parser.add_argument("text", nargs="?", help="the Classical Chinese text to translate (may hold several lines)")
    parser.add_argument("--input", "-i", help="a UTF-8 text file to translate, line by line ('-' = stdin)")
    parser.add_argument("--output", "-o", help="write here (atomically) instead of to stdout")
    parser.add_argument("--model", "-m", type=Path, default=Path(DEFAULT_MODEL),
                        help=f"adapter or model directory (default {DEFAULT_MODEL}; or models/export/hf)")
    parser.add_argument("--params", type=Path, default=None,
                        help="params.yaml with the training prompt (format:, clean.opencc); default ./params.yaml")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per generation batch")
    parser.add_argument("--max-new-tokens-factor", type=float, default=3.0,
                        help="each sentence may produce factor x its own tokens + 16 tokens")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens_factor <= 0:
        raise PipelineError("--batch-size must be >= 1 and --max-new-tokens-factor > 0")

    # 1. what to translate, with what (cheap checks first: no model is loaded before they pass)
    text, source_name = read_input(args.text, args.input)
    model_dir = args.model
    if not model_dir.is_dir():
        raise PipelineError(
            f"{model_dir}: model directory not found; train one first (dvc repro train) or pass --model DIR "
            f"(models/adapter from the train stage, models/export/hf from the export stage)"
        )
    from stages import evaluate

    cfg = evaluate.read_training_config(model_dir)
    fmt, opencc, origin = prompt_settings(cfg, model_dir, args.params)
    from stages.clean import make_converter, normalise_lines

    converter = make_converter(opencc)
    lines = normalise_lines(split_input_lines(text), converter)

    # 2. tokenizer (after pick_backend: unsloth must be imported before transformers), then the plan
    backend = evaluate.pick_backend(cfg)
    tokenizer = evaluate.load_tokenizer(model_dir)

    def count_tokens(messages: list[dict]) -> int:  # as evaluate.generate tokenizes a prompt
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(rendered, add_special_tokens=False).input_ids)

    max_tokens = cfg.get("max_seq_length")
    no_context = dict(fmt, context_sentences=0)
    fits = (lambda piece: True) if not max_tokens else (
        lambda piece: count_tokens(prompt_messages(piece, [], no_context)) <= max_tokens
    )
    limit_hint = f"max_seq_length {max_tokens} tokens ({model_dir}/training_config.json)"
    planned = plan_lines(lines, fits, limit_hint, source_name)
    pieces = [p for line_pieces in planned for p in line_pieces]
    split_up = sum(len(line_pieces) > len(split_sentences(line)) for line, line_pieces in zip(lines, planned))
    log.info(
        "%d line(s), %d piece(s) to translate%s; prompt from %s",
        len(lines), len(pieces), f" ({split_up} line(s) with a sentence split at ，、 to fit)" if split_up else "", origin,
    )
    if not pieces:
        write_output(lines, args.output)  # nothing but empty lines: no model needed
        return

    # 3. generate
    prompts = build_prompts(pieces, fmt, count_tokens, max_tokens)
    model, is_adapter = evaluate.load_finetuned(model_dir, cfg, tokenizer, backend)
    log.info("model: %s (%s on %s, backend %s, %s)", model_dir, "LoRA adapter" if is_adapter else "full model",
             cfg["model"], backend, next(model.parameters()).device)
    raw, hit_limit = evaluate.generate(
        model, tokenizer, prompts, pieces, batch_size=args.batch_size, factor=args.max_new_tokens_factor,
        extra=16, eos_token_ids=evaluate.end_of_turn_ids(tokenizer), desc="translate",
    )
    translations = normalise_lines(raw, converter)  # one line each, the training targets' script
    if any(hit_limit):
        piece_line = [n for n, line_pieces in enumerate(planned, 1) for _ in line_pieces]
        cut = sorted({piece_line[i] for i, hit in enumerate(hit_limit) if hit})
        log.warning(
            "%d translation(s) reached the token budget without ending, so may be cut short (%s line(s) %s); "
            "raise --max-new-tokens-factor", sum(hit_limit), source_name, ", ".join(map(str, cut[:20])),
        )
    write_output(assemble(planned, translations), args.output)
    if args.output:
        log.info("wrote %d line(s) to %s", len(lines), args.output)


def cli() -> None:
    """Entry point of the `wenyan-translate` console script."""
    run_main(main)


if __name__ == "__main__":
    cli()
