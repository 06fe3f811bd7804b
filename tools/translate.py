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
     through gguf.generate: the same prompt ids, budgets and stop tokens, greedy, --parallel sentences decoded
     at once in llama.cpp batches (the prompts' shared prefix computed once).
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
import stat
import sys
import tempfile
from pathlib import Path

from wenyan.translation import (  # noqa: F401 - re-exported: the splitting is this command's API too
    CLAUSE_END, CLOSERS, SENTENCE_END, Plan, Translator, assemble, build_prompts, fit_sentence, has_text, plan_lines,
    prompt_messages, split_clauses, split_input_lines, split_sentences,
)
from wenyan import gguf
from wenyan.errors import get_logger, PipelineError, run_main
from wenyan.files import file_kind, nearest_existing, write_text

log = get_logger("translate")

DEFAULT_MODEL = "models/adapter"
MAX_FACTOR = 100.0  # --max-new-tokens-factor: a translation 100 x its source's tokens is no translation
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
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sentences per generation batch (default 16 on CPU; on a CUDA GPU 256 slots of the "
                        "slot loop, a sentence leaving its slot when it ends)")
    parser.add_argument("--parallel", type=int, default=16,
                        help="GGUF only: sentences decoded at once by llama.cpp (batched; 1 = one after the other)")
    parser.add_argument("--max-new-tokens-factor", type=float, default=3.0,
                        help="each sentence may produce factor x its own tokens + 16 tokens")
    args = parser.parse_args(argv)
    bad_batch = args.batch_size is not None and args.batch_size < 1
    if bad_batch or not 0 < args.max_new_tokens_factor <= MAX_FACTOR:  # NaN fails this too
        raise PipelineError(f"--batch-size must be >= 1 and --max-new-tokens-factor in (0, {MAX_FACTOR}]; got "
                            f"{args.batch_size} and {args.max_new_tokens_factor}")
    if args.parallel < 1:
        raise PipelineError(f"--parallel must be >= 1; got {args.parallel}")

    # 1. what to translate, with what (cheap checks first: no model is loaded before they pass)
    text, source_name = read_input(args.text, args.input)
    output = check_output(args.output, args.input if args.text is None else "")
    translator = Translator(args.model, factor=args.max_new_tokens_factor, batch_size=args.batch_size,
                            parallel=args.parallel)
    plan = translator.plan(text, source_name)
    write_output(translator.translate(plan), output)
    if args.output:
        log.info("wrote %d line(s) to %s", len(plan.lines), args.output)


def cli() -> None:
    """Entry point of the `wenyan-translate` console script."""
    gguf.quiet_openmp()
    run_main(main)


if __name__ == "__main__":
    cli()
