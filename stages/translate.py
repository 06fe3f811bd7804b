"""Translate: Classical Chinese (文言文) into modern Chinese with the fine-tuned model.

    echo '学而时习之，不亦说乎？有朋自远方来，不亦乐乎？' | python -m stages.translate
    python -m stages.translate '学而时习之，不亦说乎？'
    python -m stages.translate --input chapter.txt --output chapter.modern.txt
    wenyan-translate ...            (the same command, installed by `pip install -e .`)

Not a pipeline stage: the tool for using what the pipeline trained. --model is models/adapter (the
train stage's base + LoRA adapter, or its fully fine-tuned model) by default, or models/export/hf (the
export stage's merged model), or any directory with the train stage's training_config.json, or a GGUF
file the export stage wrote (models/export/model-Q4_K_M.gguf: run by llama.cpp through llama-cpp-python,
the prompt settings and tokenizer read from the training_config.json and tokenizer files beside it).

In order:
  1. Each input line is normalised as the training sources were (stages/text.py: whitespace,
     full-width punctuation, OpenCC with the config the model was trained with).
  2. Each line is split into sentences after 。！？； (a closing quote or bracket stays with its sentence).
  3. A sentence whose prompt is longer than max_seq_length tokens (training_config.json: the length the
     model was trained on) is split further after ，、 into the longest runs of clauses that fit; a clause
     that still does not fit is an error naming the input line. Nothing is ever truncated.
  4. Each prompt is the training prompt (modeling.build_messages with the system prompt, user template
     and, with context_sentences N, the N previous sentences of the input as context), read from the
     `prompt` the train stage recorded in the model's training_config.json, never from params.yaml.
  5. Generation is modeling.generate, as in evaluate: batched longest first, left padding, greedy, stops at the
     end-of-turn token, each output sliced at the padded input length; a tqdm bar on stderr. A GGUF goes
     through gguf.generate: the same prompt ids, budgets and stop tokens, greedy, one sentence at a time.
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

from stages import gguf, modeling, text as text_lib
from stages.common import PipelineError, get_logger, run_main, write_text

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
# Prompts: exactly the training prompts (modeling.build_messages, settings from training_config.json)


def prompt_messages(piece: str, context: list[str], fmt: dict) -> list[dict]:
    return modeling.build_messages(piece, None, context, fmt)  # the prompt only: no assistant turn


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
                        help=f"adapter or model directory (default {DEFAULT_MODEL}; or models/export/hf), or an exported .gguf")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per generation batch")
    parser.add_argument("--max-new-tokens-factor", type=float, default=3.0,
                        help="each sentence may produce factor x its own tokens + 16 tokens")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens_factor <= 0:
        raise PipelineError("--batch-size must be >= 1 and --max-new-tokens-factor > 0")

    # 1. what to translate, with what (cheap checks first: no model is loaded before they pass)
    text, source_name = read_input(args.text, args.input)
    gguf_file = args.model if args.model.suffix == ".gguf" else None
    if gguf_file is not None and not gguf_file.is_file():
        raise PipelineError(f"{gguf_file}: GGUF file not found; the export stage writes them (dvc repro export/dvc.yaml)")
    model_dir = gguf_file.parent if gguf_file is not None else args.model  # the GGUF's prompt and tokenizer
    if not model_dir.is_dir():
        raise PipelineError(
            f"{model_dir}: model directory not found; train one first (dvc repro train) or pass --model DIR "
            f"(models/adapter from the train stage, models/export/hf from the export stage)"
        )
    trained = modeling.load_trained(model_dir, model=False, backend="hf" if gguf_file else None)  # unsloth before transformers
    cfg, tokenizer = trained.config, trained.tokenizer
    fmt, opencc = trained.prompt["format"], trained.prompt["opencc"]  # what the model was trained with
    converter = text_lib.make_converter(opencc)
    lines = text_lib.normalise_lines(split_input_lines(text), converter)

    def count_tokens(messages: list[dict]) -> int:  # as generate tokenizes a prompt
        return len(modeling.prompt_ids(tokenizer, [messages])[0])

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
        "%d line(s), %d piece(s) to translate%s; prompt from %s/training_config.json",
        len(lines), len(pieces), f" ({split_up} line(s) with a sentence split at ，、 to fit)" if split_up else "", model_dir,
    )
    if not pieces:
        write_output(lines, args.output)  # nothing but empty lines: no model needed
        return

    # 3. generate
    prompts = build_prompts(pieces, fmt, count_tokens, max_tokens)
    if gguf_file is not None:
        n_ctx = gguf.context_size(tokenizer, prompts, pieces, args.max_new_tokens_factor, 16)
        llm = gguf.load_llama(gguf_file, n_ctx=n_ctx)
        log.info("model: %s (llama.cpp, context %d; trained on %s)", gguf_file, n_ctx, cfg["model"])
        raw, hit_limit = gguf.generate(llm, tokenizer, prompts, pieces, factor=args.max_new_tokens_factor, extra=16,
                                       desc="translate")
    else:
        model = modeling.load_trained_model(trained)
        log.info("model: %s (%s on %s, backend %s, %s)", model_dir, "LoRA adapter" if trained.is_adapter else "full model",
                 cfg["model"], trained.backend, next(model.parameters()).device)
        raw, hit_limit = modeling.generate(
            model, tokenizer, prompts, pieces, batch_size=args.batch_size, factor=args.max_new_tokens_factor,
            extra=16, eos_token_ids=modeling.end_of_turn_ids(tokenizer), desc="translate",
        )
    translations = text_lib.normalise_lines(raw, converter)  # one line each, the training targets' script
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
