"""Translate: Classical Chinese (文言文) into modern Chinese with the fine-tuned model.

    echo '学而时习之，不亦说乎？有朋自远方来，不亦乐乎？' | python -m tools.translate
    python -m tools.translate '学而时习之，不亦说乎？'
    python -m tools.translate --input chapter.txt --output chapter.modern.txt
    wenyan-translate ...            (the same command, installed by `pip install -e .`)

Not a pipeline stage: the tool for using what the pipeline trained. --model is models/adapter (the
train stage's base + LoRA adapter, or its fully fine-tuned model) by default, or models/export/hf (the
export stage's merged model), or any directory with the train stage's training_config.json, or a GGUF
file the export stage wrote (models/export/model-Q4_K_M.gguf: run by llama.cpp through llama-cpp-python,
the prompt settings and tokenizer read from the training_config.json and tokenizer files beside it).

In order:
  1. Each input line is normalised as the training sources were (wenyan/text.py: whitespace,
     full-width punctuation, OpenCC with the config the model was trained with).
  2. Each line is split into sentences after 。！？； (a closing quote or bracket stays with its sentence).
  3. A sentence whose prompt is longer than max_seq_length tokens (training_config.json: the length the
     model was trained on) is split further after ，、 into the longest runs of clauses that fit; a clause
     that still does not fit is an error naming the input line. Nothing is ever truncated.
  4. Each prompt is the training prompt (build_messages with the system prompt, user template
     and, with context_sentences N, the N previous sentences of the input as context), read from the
     `prompt` the train stage recorded in the model's training_config.json, never from params.yaml.
  5. Generation is generation.generate, as in evaluate: batched longest first, left padding, greedy, stops at the
     end-of-turn token, each output sliced at the padded input length; a tqdm bar on stderr. A GGUF goes
     through gguf.generate: the same prompt ids, budgets and stop tokens, greedy, one sentence at a time.
  6. The translations of a line's sentences are joined into one output line, so the output has exactly
     as many lines as the input (empty input, empty output). A piece with nothing to translate (only
     punctuation or symbols) passes through as it is; so does a line with none (empty, spaces, ……).
     Written to stdout or, atomically (temporary file + rename, the file's mode kept), to --output; through
     a symlink to its target; to a device such as /dev/null in place. --output is checked before the model
     is loaded: never the input file (under any name), a directory, or a place that cannot be written.

Device: CUDA when available (bf16 or fp16; unsloth's inference for a model trained with unsloth), else
CPU in fp32. Everything is local: no network.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable

from wenyan import generation, gguf, models, text as text_lib
from wenyan.prompt import build_messages, end_of_turn_ids, prompt_ids
from wenyan.errors import get_logger, PipelineError, run_main
from wenyan.files import file_kind, nearest_existing, write_text

log = get_logger("translate")

DEFAULT_MODEL = "models/adapter"
MAX_FACTOR = 100.0  # --max-new-tokens-factor: a translation 100 x its source's tokens is no translation
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


_TEXT = re.compile("[\\w\ue000-\uf8ff]")  # a letter, digit or CJK character (the corpus keeps rare ones in the PUA)


def has_text(piece: str) -> bool:
    """Whether a piece has anything to translate; one of only punctuation, spaces or symbols passes through as it is."""
    return _TEXT.search(piece) is not None


def plan_lines(lines: list[str], fits: Callable[[str], bool], limit_hint: str, source_name: str = "input") -> list[list[str]]:
    """Per input line, its pieces (sentences, or parts of too-long sentences); those without text (has_text) are
    kept, to pass through untranslated."""
    planned = []
    for number, line in enumerate(lines, 1):
        pieces = []
        for sentence in split_sentences(line):
            if not has_text(sentence):
                pieces.append(sentence)
                continue
            pieces.extend(fit_sentence(sentence, fits, f"{source_name} line {number}", limit_hint))
        planned.append(pieces)
    return planned


def assemble(planned: list[list[str]], translations: list[str], originals: list[str] | None = None) -> list[str]:
    """Join each line's pieces (in order, no separator, as Chinese is written): a piece with text is replaced by
    the next translation, one without stays as it is; one output line per input line. A line with nothing to
    translate is its original (the input line before normalisation) where originals are given."""
    assert len(translations) == sum(has_text(p) for pieces in planned for p in pieces), "one translation per piece with text"
    out, k = [], 0
    for n, pieces in enumerate(planned):
        joined = []
        for piece in pieces:
            if has_text(piece):
                joined.append(translations[k])
                k += 1
            else:
                joined.append(piece)
        if originals is not None and not any(has_text(p) for p in pieces):
            joined = [originals[n]]
        out.append("".join(joined))
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
# Prompts: exactly the training prompts (build_messages, settings from training_config.json)


def prompt_messages(piece: str, context: list[str], fmt: dict) -> list[dict]:
    return build_messages(piece, None, context, fmt)  # the prompt only: no assistant turn


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


PIPE_PATHS = ("/dev/stdin", "/dev/fd/", "/proc/self/fd/")  # `--input <(cmd)` names a pipe like these


def read_input(text: str | None, input_path: str | None) -> tuple[str, str]:
    """(text, a name for messages): the positional text, the --input file ('-' = stdin), or stdin."""
    if text is not None and input_path is not None:
        raise PipelineError("give the text either as an argument or with --input, not both")
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes that were not UTF-8 reach argv as lone surrogates
            raise PipelineError(
                f"the text argument is not UTF-8 (character {exc.start + 1}); give UTF-8 text, or convert a file "
                f"with iconv and pass it with --input"
            ) from None
        return text, "argument"
    if input_path is not None and input_path != "-":
        check_input_file(input_path)
        try:
            data = Path(input_path).read_bytes()
        except OSError as exc:  # a file that vanished or cannot be read since the check
            raise PipelineError(f"{input_path}: cannot read the input file ({exc.strerror})") from None
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


def check_input_file(input_path: str) -> None:
    """A regular file (or a pipe that `--input <(cmd)` names); anything else is one clear error, before reading:
    a directory cannot be read, a named pipe would wait for a writer, a device could be endless."""
    try:
        mode = os.stat(input_path).st_mode
    except FileNotFoundError:
        raise PipelineError(f"{input_path}: input file not found; check the path (or give '-' to read standard input)") from None
    except OSError as exc:  # a link loop, a path through a regular file, a name too long, no permission
        raise PipelineError(f"{input_path}: cannot open the input file ({exc.strerror})") from None
    if stat.S_ISREG(mode) or input_path.startswith(PIPE_PATHS):
        return
    raise PipelineError(f"{input_path}: is {file_kind(mode)}; give a UTF-8 text file to --input, or pipe the text "
                        f"on standard input")


@dataclasses.dataclass(frozen=True)
class Output:
    """Where translations go: path None = stdout; atomic = a regular file (written beside, then renamed), else
    a device or pipe written in place (/dev/null stays a device). A symlink's target is written (the link stays)."""

    path: Path | None
    atomic: bool = True


def check_output(output: str | None, input_path: str | None) -> Output:
    """The --output, checked before any model is loaded: never the input file itself (under any name: another
    spelling, a symlink, a hard link, stdin redirected from it), never a directory or a path below a regular
    file, and a place this process can really create files in (a probe file, so root on a read-only place fails too)."""
    if output is None or output == "-":
        return Output(None)
    if not output:
        raise PipelineError("--output is empty; give a file name, or leave it out to write to standard output")
    path = Path(output)
    try:
        st = os.stat(path)  # through a symlink
    except FileNotFoundError:
        st = None
    except OSError as exc:  # a link loop, a path through a regular file, a name too long
        raise PipelineError(f"{output}: cannot write the output there ({exc.strerror})") from None
    target = Path(os.path.realpath(path)) if path.is_symlink() else path  # write through a link, keep the link
    if st is not None:
        if same_file(st, input_path):
            shown = "standard input" if input_path in (None, "-") else f"the input file {input_path}"
            raise PipelineError(f"{output}: is {shown}; writing the translation there would replace the text being "
                                f"translated. Give another --output")
        if stat.S_ISREG(st.st_mode):
            probe_directory(output, target.parent)
            return Output(target)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            return Output(target, atomic=False)  # /dev/null, /dev/stdout, a pipe: written in place
        raise PipelineError(f"{output}: is {file_kind(st.st_mode)}; --output takes a file name (or '-' for standard output)")
    directory = nearest_existing(target.parent)
    if not directory.is_dir():
        raise PipelineError(f"{output}: {directory} is a file, not a directory; give an --output in a directory")
    probe_directory(output, directory)
    return Output(target)


def same_file(st: os.stat_result, input_path: str | None) -> bool:
    """Whether the output (stat st) is the input: the --input file, or a file standard input is redirected from."""
    try:
        if input_path not in (None, "-"):
            other = os.stat(input_path)
        else:
            other = os.fstat(sys.stdin.fileno())
    except (OSError, AttributeError, ValueError):  # no stdin (closed, replaced by a test)
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)


def probe_directory(output: str, directory: Path) -> None:
    """Create and remove a temporary file in directory: permissions, a read-only filesystem, /proc and /sys all
    fail here, before the model is loaded, as they would at the end."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".translate-probe-", dir=directory)
    except OSError as exc:
        raise PipelineError(f"{output}: cannot write in {directory} ({exc.strerror}); give another --output") from None
    os.close(fd)
    os.unlink(probe)


def write_output(lines: list[str], output: Output) -> None:
    text = "".join(line + "\n" for line in lines)
    if output.path is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.buffer.flush()
    elif output.atomic:
        write_text(output.path, text)  # temporary file + rename: never a half-written output; the file's mode kept
    else:
        try:
            with open(output.path, "wb") as f:
                f.write(text.encode("utf-8"))
        except OSError as exc:
            raise PipelineError(f"{output.path}: cannot write the output ({exc.strerror})") from None


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
    if args.batch_size < 1 or not 0 < args.max_new_tokens_factor <= MAX_FACTOR:  # NaN fails this too
        raise PipelineError(f"--batch-size must be >= 1 and --max-new-tokens-factor in (0, {MAX_FACTOR}]; got "
                            f"{args.batch_size} and {args.max_new_tokens_factor}")

    # 1. what to translate, with what (cheap checks first: no model is loaded before they pass)
    text, source_name = read_input(args.text, args.input)
    output = check_output(args.output, args.input if args.text is None else "")
    gguf_file = args.model if args.model.suffix == ".gguf" else None
    if gguf_file is not None and not gguf_file.is_file():
        raise PipelineError(f"{gguf_file}: GGUF file not found; the export stage writes them (dvc repro export/dvc.yaml)")
    model_dir = gguf_file.parent if gguf_file is not None else args.model  # the GGUF's prompt and tokenizer
    if not model_dir.is_dir():
        raise PipelineError(
            f"{model_dir}: model directory not found; train one first (dvc repro train) or pass --model DIR "
            f"(models/adapter from the train stage, models/export/hf from the export stage)"
        )
    trained = models.load_trained(model_dir, model=False, backend="hf" if gguf_file else None)  # unsloth before transformers
    cfg, tokenizer = trained.config, trained.tokenizer
    fmt, opencc = trained.prompt["format"], trained.prompt["opencc"]  # what the model was trained with
    converter = text_lib.make_converter(opencc)
    originals = split_input_lines(text)
    lines = text_lib.normalise_lines(originals, converter)

    def count_tokens(messages: list[dict]) -> int:  # as generate tokenizes a prompt
        return len(prompt_ids(tokenizer, [messages])[0])

    max_tokens = cfg.get("max_seq_length")
    no_context = dict(fmt, context_sentences=0)
    fits = (lambda piece: True) if not max_tokens else (
        lambda piece: count_tokens(prompt_messages(piece, [], no_context)) <= max_tokens
    )
    limit_hint = f"max_seq_length {max_tokens} tokens ({model_dir}/training_config.json)"
    planned = plan_lines(lines, fits, limit_hint, source_name)
    pieces = [p for line_pieces in planned for p in line_pieces if has_text(p)]
    split_up = sum(len(line_pieces) > len(split_sentences(line)) for line, line_pieces in zip(lines, planned))
    log.info(
        "%d line(s), %d piece(s) to translate%s; prompt from %s/training_config.json",
        len(lines), len(pieces), f" ({split_up} line(s) with a sentence split at ，、 to fit)" if split_up else "", model_dir,
    )
    if not pieces:
        write_output(assemble(planned, [], originals), output)  # nothing to translate: no model needed
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
        model = models.load_trained_model(trained)
        log.info("model: %s (%s on %s, backend %s, %s)", model_dir, "LoRA adapter" if trained.is_adapter else "full model",
                 cfg["model"], trained.backend, next(model.parameters()).device)
        raw, hit_limit = generation.generate(
            model, tokenizer, prompts, pieces, batch_size=args.batch_size, factor=args.max_new_tokens_factor,
            extra=16, eos_token_ids=end_of_turn_ids(tokenizer), desc="translate",
        )
    translations = text_lib.normalise_lines(raw, converter)  # one line each, the training targets' script
    if any(hit_limit):
        piece_line = [n for n, line_pieces in enumerate(planned, 1) for p in line_pieces if has_text(p)]
        cut = sorted({piece_line[i] for i, hit in enumerate(hit_limit) if hit})
        log.warning(
            "%d translation(s) reached the token budget without ending, so may be cut short (%s line(s) %s); "
            "raise --max-new-tokens-factor", sum(hit_limit), source_name, ", ".join(map(str, cut[:20])),
        )
    write_output(assemble(planned, translations, originals), output)
    if args.output:
        log.info("wrote %d line(s) to %s", len(lines), args.output)


def cli() -> None:
    """Entry point of the `wenyan-translate` console script."""
    run_main(main)


if __name__ == "__main__":
    cli()
