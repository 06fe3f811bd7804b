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
     as many lines as the input (empty input, empty output; \n, \r\n and a lone \r each end a line, as in
     ingest). A piece with nothing to translate (only punctuation or symbols) passes through as it is; so
     does a line with none (empty, spaces, ……). --output is checked before the model is loaded: never the
     input file (under any name), inside the model, a directory, or a place that cannot be written.

The input is read, translated and written CHUNK_LINES lines at a time, so memory stays bounded whatever its
length. To stdout (or a device such as /dev/null, a pipe) each chunk is written as it is done. To a file: into a
temporary file of this run's own beside it (mkstemp; the file's mode kept; through a symlink --output to its
target), renamed onto the output at the end, so the output changes once, whole, and two runs to one output each
leave it whole. While it runs the same file is hard-linked at <output>.partial (by rename: a link planted there is
replaced, never followed; an --input or stdin of that name is refused before the model loads); if the run is
interrupted (Ctrl-C, kill, an error at line 90,000), <output>.partial keeps the lines done and
<output>.partial.json which input lines they are, and the same command run again continues from the next line
(same model and settings, an --input file whose first lines are unchanged), from a copy of them. A full disk is
one error: no partial file is kept, the output is as it was. Standard input or output closed, a path the system
refuses (a name too long, a link loop): one error line naming it.

Device: CUDA when available (bf16 or fp16; unsloth's inference for a model trained with unsloth), else
CPU in fp32. Everything is local: no network.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import stat
import sys
import tempfile
from pathlib import Path

from wenyan.translation import (  # noqa: F401 - re-exported: the splitting is this command's API too
    CLAUSE_END, CLOSERS, SENTENCE_END, Plan, Translator, assemble, build_prompts, fit_sentence, has_text, plan_lines,
    prompt_messages, split_clauses, split_input_lines, split_sentences,
)
from wenyan import gguf, models
from wenyan.errors import get_logger, PipelineError, run_main
from wenyan import files
from wenyan.files import (TEMP_SUFFIX, check_paths, file_kind, nearest_existing, shown_path,
                          with_path_errors,
                          write_failure, write_json)

log = get_logger("translate")

DEFAULT_MODEL = "models/adapter"
MAX_FACTOR = 100.0  # --max-new-tokens-factor: a translation 100 x its source's tokens is no translation
# ----------------------------------------------------------------------------------------------
# Input and output


PIPE_PATHS = ("/dev/stdin", "/dev/fd/", "/proc/self/fd/")  # `--input <(cmd)` names a pipe like these
CHUNK_LINES = 256  # input lines planned, translated and written at a time: memory stays bounded by this


@dataclasses.dataclass
class Source:
    """Where the text comes from: lines() yields its lines one at a time (memory bounded by a line), as ingest
    reads text: \\n, \\r\\n and a lone \\r each end a line, a final line ending ends the last line, a BOM dropped."""

    name: str
    path: str | None = None  # an --input file
    text: str | None = None  # the argument

    def lines(self):
        if self.text is not None:
            yield from split_input_lines(self.text)
            return
        if self.path is not None:
            try:
                raw = open(self.path, "rb")
            except OSError as exc:  # vanished or unreadable since the check
                raise PipelineError(f"{self.path}: cannot read the input file ({exc.strerror})") from None
        else:
            raw = sys.stdin.buffer
        stream = io.TextIOWrapper(raw, encoding="utf-8-sig", newline=None)  # universal newlines: \r, \r\n, \n
        number = 0
        try:
            for number, line in enumerate(stream, 1):
                yield line[:-1] if line.endswith("\n") else line
        except UnicodeDecodeError as exc:
            raise PipelineError(f"{self.name}:{number + 1}: not UTF-8 text ({exc.reason}); convert it first, "
                                f"e.g. iconv -f GBK -t UTF-8") from None
        finally:
            if self.path is not None:
                stream.close()
            else:
                stream.detach()

    def count_lines(self) -> int | None:
        """The number of lines (for the progress bar); reading a regular input file through once, before any model
        loads, also finds text that is not UTF-8 (one error naming the line). None for stdin and pipes."""
        if self.text is not None:
            return len(split_input_lines(self.text))
        if self.path is None or not os.path.isfile(self.path):
            return None
        return sum(1 for _ in self.lines())



def line_hasher(lines=()):
    """A running sha256 of input lines (the resume record's check that the input begins as it did)."""
    hasher = hashlib.sha256()
    for line in lines:
        hasher.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return hasher


def read_input(text: str | None, input_path: str | None) -> Source:
    """The positional text, the --input file ('-' = stdin), or stdin; checked, not read yet."""
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
        return Source("argument", text=text)
    if input_path is not None and input_path != "-":
        check_input_file(input_path)
        return Source(input_path, path=input_path)
    if sys.stdin is None:  # started with standard input closed (`<&-`)
        raise PipelineError("standard input is closed: give a sentence, or --input FILE")
    if input_path is None and sys.stdin.isatty():
        raise PipelineError("nothing to translate: give a sentence, --input FILE, or pipe text on standard input")
    return Source("stdin")


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


class Writer:
    """Translations written as they come, a chunk of lines at a time. stdout and a device or pipe: in place.
    A file: into a temporary file of this run's own beside it (mkstemp: a name no other run or planted link has),
    fsynced each chunk and renamed onto the output at the end (the output changes once, whole). While it runs, the
    same file is hard-linked at <output>.partial (put there by rename, so a link already there is replaced, never
    followed), and <output>.partial.json records which input lines are done: a run that was interrupted (Ctrl-C,
    kill, a too-long clause found at line 90,000) continues where it stopped when run again with the same model and
    the same beginning of the input, from a copy of those lines (the old file is only read). Two runs to one output
    each write their own file: each output they leave is whole. A full disk: one error, no partial file kept."""

    def __init__(self, output: Output, run_key: dict):
        self.output, self.run_key, self.done, self.file = output, run_key, 0, None
        self.hasher = line_hasher()
        self.can_resume = False
        self.partial = self.state = self.tmp = None
        self.identity = None  # (st_dev, st_ino) of this run's file: what is ours at <output>.partial
        self.linked = self.link_failed = False
        if output.path is not None and output.atomic:
            self.partial = output.path.with_name(output.path.name + ".partial")
            self.state = output.path.with_name(output.path.name + ".partial.json")

    def check(self, input_path: str | None) -> None:
        """The resume files, before any model loads: never the input (under any name, or stdin redirected from
        it), never a directory or a device (a planted link is replaced, not followed; one to the input is refused)."""
        if self.partial is None:
            return
        for path in (self.partial, self.state):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise PipelineError(f"{path}: cannot use this resume file of --output ({exc.strerror})") from None
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise PipelineError(f"{path}: is {file_kind(st.st_mode)}, where translate keeps the lines done of "
                                    f"--output {self.output.path}; move it, or give another --output")
            try:
                target = os.stat(path)
            except OSError:
                continue  # a dangling link: replaced
            if same_file(target, input_path):
                shown = "standard input" if input_path in (None, "-") else f"the input file {input_path}"
                raise PipelineError(f"{path}: is {shown}, and translate keeps the lines done of --output "
                                    f"{self.output.path} under this name, which would replace it. Give another --output")

    def ours(self, path: Path) -> bool:
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return self.identity is not None and (st.st_dev, st.st_ino) == self.identity

    def resumable(self, source: Source) -> int:
        """Input lines a previous interrupted run of this same command translated already (0 = none)."""
        self.can_resume = source.path is not None  # stdin and an argument cannot be read again
        if self.partial is None or source.path is None:
            return 0
        try:
            if not (stat.S_ISREG(os.lstat(self.partial).st_mode) and stat.S_ISREG(os.lstat(self.state).st_mode)):
                return 0  # a link or something else there: not a resume record this command wrote
            state = json.loads(self.state.read_text(encoding="utf-8"))
            done, digest = int(state["lines"]), state["input_sha256"]
            same = state.get("run") == self.run_key
            fd = os.open(self.partial, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        if not same or done < 0 or data.count(b"\n") < done:
            return 0
        lines = source.lines()
        hasher = line_hasher(itertools.islice(lines, done))
        lines.close()
        if hasher.hexdigest() != digest:  # (an input shorter than done lines hashes differently too)
            return 0
        self.create()
        try:  # a copy of exactly the lines recorded as done: the old file is never written
            with open(self.tmp, "wb") as f:
                f.write(b"".join(data.splitlines(keepends=True)[:done]))
        except OSError as exc:
            self.discard()
            raise PipelineError(write_failure(self.output.path, exc)) from None
        self.done, self.hasher = done, hasher
        return done

    def create(self) -> None:
        """This run's own temporary file beside the output (the output's mode; missing directories made)."""
        try:
            self.tmp = files._temp_beside(self.output.path)
            st = os.lstat(self.tmp)
        except OSError as exc:
            raise PipelineError(f"{self.output.path}: cannot write the output ({exc.strerror})") from None
        self.identity = (st.st_dev, st.st_ino)

    def open(self) -> None:
        if self.output.path is None:
            return
        try:
            if self.partial is not None:
                if self.tmp is None:
                    self.create()
                self.file = open(self.tmp, "ab")
            else:
                self.file = open(self.output.path, "wb")
        except OSError as exc:
            raise PipelineError(f"{self.output.path}: cannot write the output ({exc.strerror})") from None

    def publish(self) -> None:
        """This run's file hard-linked at <output>.partial (by rename: whatever is there is replaced, not followed)."""
        if self.linked or self.link_failed:
            return
        aside = self.tmp.with_name(self.tmp.name[: -len(TEMP_SUFFIX)] + ".link" + TEMP_SUFFIX)
        try:
            os.link(self.tmp, aside, follow_symlinks=False)
            os.replace(aside, self.partial)
            self.linked = True
        except OSError:  # a filesystem without hard links: the file is put there when the run is interrupted
            self.link_failed = True
            aside.unlink(missing_ok=True)

    def write(self, lines: list[str], source_lines: list[str]) -> None:
        """lines: the translations of source_lines (the input lines), one each."""
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        try:
            if self.output.path is None:
                if sys.stdout is None:
                    raise PipelineError("standard output is closed; give --output FILE")
                sys.stdout.flush()
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            else:
                self.file.write(data)
                self.file.flush()
                if self.partial is not None:
                    os.fsync(self.file.fileno())
                    self.done += len(lines)
                    for line in source_lines:
                        self.hasher.update(line.encode("utf-8", "surrogatepass") + b"\n")
                    self.publish()
                    write_json(self.state, {"run": self.run_key, "lines": self.done, "input_sha256": self.hasher.hexdigest()})
        except PipelineError:
            self.discard()
            raise
        except OSError as exc:
            where = "standard output" if self.output.path is None else str(self.output.path)
            self.discard()
            kept = "" if self.output.path is None or not self.output.path.exists() else f"; {where} is as it was"
            raise PipelineError(f"{where}: cannot write the translation ({exc.strerror}){kept}") from None

    def finish(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.partial is None:
            return
        if self.tmp is None:  # nothing was written at all: an empty output
            self.open()
            self.file.close()
            self.file = None
        if self.output.path.exists() and not self.output.path.is_file():
            self.discard()
            raise PipelineError(f"{self.output.path}: is {file_kind(self.output.path.stat().st_mode)}, but this output is a file")
        try:
            os.replace(self.tmp, self.output.path)
        except OSError as exc:
            self.discard()
            raise PipelineError(write_failure(self.output.path, exc)) from None
        self.tmp = None
        if self.ours(self.partial):  # the resume record is this run's: done with
            self.partial.unlink(missing_ok=True)
            self.state.unlink(missing_ok=True)
        elif not os.path.lexists(self.partial):
            self.state.unlink(missing_ok=True)

    def interrupted(self) -> None:
        """A run stopped before its end: a file output keeps what is done, to continue from."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
        if self.tmp is None:
            return
        if self.done and self.can_resume:
            try:
                if self.linked and self.ours(self.partial):
                    self.tmp.unlink(missing_ok=True)  # <output>.partial is the same file
                else:
                    os.replace(self.tmp, self.partial)
                    write_json(self.state, {"run": self.run_key, "lines": self.done, "input_sha256": self.hasher.hexdigest()})
            except (OSError, PipelineError):
                self.discard()
                return
            self.tmp = None
            log.warning("%d line(s) translated so far are kept in %s; run the same command again to continue "
                        "from line %d", self.done, self.partial, self.done + 1)
        else:
            self.discard()

    def discard(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None
        if self.partial is not None and self.ours(self.partial):
            self.partial.unlink(missing_ok=True)
            self.state.unlink(missing_ok=True)
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


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
    source = read_input(args.text, args.input)
    total = source.count_lines()  # a file that is not UTF-8 fails here, before anything loads
    if args.output in (None, "-") and sys.stdout is None:
        raise PipelineError("standard output is closed: give --output FILE")
    check_model_path(args.model)
    output = check_output(args.output, args.input if args.text is None else "")
    if output.path is not None:  # never into the model it reads, nor its base (nor the input: check_output)
        inputs = models.model_inputs(args.model)
        model_labels = list(inputs)
        outputs = {"--output": output.path}
        if output.atomic:
            outputs |= {"--output's resume file": output.path.with_name(output.path.name + ".partial"),
                        "--output's resume record": output.path.with_name(output.path.name + ".partial.json")}
            if args.text is None and args.input not in (None, "-"):
                inputs["--input"] = args.input
        check_paths(inputs, outputs, dirs=model_labels)
        Writer(output, {}).check(args.input if args.text is None else "")  # the resume files: never the input
    translator = Translator(args.model, factor=args.max_new_tokens_factor, batch_size=args.batch_size,
                            parallel=args.parallel)
    run_key = {"model": os.path.realpath(args.model), "config": translator.cfg, "batch_size": args.batch_size,
               "max_new_tokens_factor": args.max_new_tokens_factor}
    writer = Writer(output, run_key)
    skip = writer.resumable(source)
    if skip:
        log.info("continuing %s from input line %d (lines 1-%d were translated by an interrupted run)", writer.partial,
                 skip + 1, skip)
    counts = translate_chunks(translator, source, writer, skip, total)
    log.info(
        "%d line(s), %d piece(s) translated%s; prompt from %s/training_config.json", counts["lines"], counts["pieces"],
        f" ({counts['split_up']} line(s) with a sentence split at ，、 to fit)" if counts["split_up"] else "",
        translator.model_dir,
    )
    if args.output:
        log.info("wrote %d line(s) to %s", counts["lines"], args.output)


def check_model_path(model: Path) -> None:
    """--model names something this process can look at (a name too long, a link loop, no permission: one line)."""
    try:
        os.stat(model)
    except FileNotFoundError:
        return  # the loader says what is missing, and how to get it
    except OSError as exc:
        raise PipelineError(f"{shown_path(model)}: cannot read --model ({exc.strerror})") from None


def translate_chunks(translator: Translator, source: Source, writer: Writer, skip: int, total: int | None) -> dict:
    """The input CHUNK_LINES lines at a time (bounded memory): planned with the previous pieces as context (as one
    pass would), translated, written; an interruption keeps what is done (Writer.interrupted)."""
    from tqdm.auto import tqdm

    n = translator.fmt["context_sentences"]
    counts = {"lines": skip, "pieces": 0, "split_up": 0}
    context: list[str] = []  # the last context_sentences pieces of the input so far
    writer.open()
    try:
        with tqdm(total=total, initial=skip, desc="translate", unit="line",
                  disable=total is not None and total < 2 * CHUNK_LINES) as bar:
            lines_iter = source.lines()
            for _ in itertools.islice(lines_iter, skip):  # done by the interrupted run
                pass
            while originals := list(itertools.islice(lines_iter, CHUNK_LINES)):
                plan = translator.plan_lines(originals, source.name, first=counts["lines"] + 1,
                                             context=context[-n:] if n else [], quiet=True)
                writer.write(translator.translate(plan), originals)
                context = (context + plan.pieces)[-n:] if n else []
                counts["pieces"] += len(plan.pieces)
                counts["split_up"] += plan.split_up
                counts["lines"] += len(originals)
                bar.update(len(originals))
    except BaseException:
        writer.interrupted()
        raise
    writer.finish()
    return counts


def cli() -> None:
    """Entry point of the `wenyan-translate` console script."""
    gguf.quiet_openmp()
    run_main(with_path_errors(main))


if __name__ == "__main__":
    cli()
