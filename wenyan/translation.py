"""Translating a text with a trained model, as `wenyan-translate` (tools/translate.py) and the web page
(tools/serve.py) do: split into sentences (and clauses where a prompt would be too long), one training prompt
per sentence, generate (transformers, or llama.cpp for a GGUF), assemble one output line per input line.

    translator = Translator(Path("models/adapter"))      # or models/export/model-Q8_0.gguf
    plan = translator.plan(text)                         # pieces and prompts; errors name the line
    lines = translator.translate(plan, on_result)        # on_result(i, translation) as each piece is done
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

from wenyan import generation, gguf, models, text as text_lib
from wenyan.errors import PipelineError, get_logger
from wenyan.prompt import build_messages, end_of_turn_ids, prompt_ids

log = get_logger("translate")

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


def plan_lines(lines: list[str], fits: Callable[[str], bool], limit_hint: str, source_name: str = "input",
               first: int = 1) -> list[list[str]]:
    """Per input line, its pieces (sentences, or parts of too-long sentences); those without text (has_text) are
    kept, to pass through untranslated. first: the input line number of lines[0] (for messages)."""
    planned = []
    for number, line in enumerate(lines, first):
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


_LINE_END = re.compile("\r\n|\r|\n")


def split_input_lines(text: str) -> list[str]:
    """Lines as ingest reads them: \\n, \\r\\n and a lone \\r each end a line; a final line ending ends the last line."""
    if not text:
        return []
    lines = _LINE_END.split(text)
    if lines[-1] == "":
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
# The model and a text


@dataclasses.dataclass
class Plan:
    """A text ready to translate: its input lines, their normalised form, each line's pieces, and one prompt per
    piece with text (in order)."""

    originals: list[str]
    lines: list[str]
    planned: list[list[str]]
    pieces: list[str]
    prompts: list[list[dict]]
    source_name: str = "input"
    first: int = 1  # the input line number of originals[0] (a chunk of a longer input)
    split_up: int = 0  # lines with a sentence split at ，、 to fit


class Translator:
    """A trained model (a train/export directory, or a GGUF the export stage wrote) with the prompt, OpenCC config
    and tokenizer it was trained with; translate(text) does what the command does (steps 1-6 of the docstring).
    The model itself is loaded on first use and kept (the web page, tools/serve.py, translates many texts)."""

    def __init__(self, model: Path, *, factor: float = 3.0, batch_size: int | None = None, parallel: int = 16,
                 threads: int | None = None):
        self.path = Path(model)
        self.factor, self.batch_size, self.parallel, self.threads = factor, batch_size, parallel, threads
        self.gguf_file = self.path if self.path.suffix == ".gguf" else None
        if self.gguf_file is not None and not self.gguf_file.is_file():
            raise PipelineError(f"{self.gguf_file}: GGUF file not found; the export stage writes them (dvc repro export/dvc.yaml)")
        self.model_dir = self.gguf_file.parent if self.gguf_file is not None else self.path  # the GGUF's prompt and tokenizer
        if not self.model_dir.is_dir():
            raise PipelineError(
                f"{self.model_dir}: model directory not found; train one first (dvc repro train) or pass --model DIR "
                f"(models/adapter from the train stage, models/export/hf from the export stage)"
            )
        self.trained = models.load_trained(self.model_dir, model=False, backend="hf" if self.gguf_file else None)
        self.cfg, self.tokenizer = self.trained.config, self.trained.tokenizer
        self.fmt, opencc = self.trained.prompt["format"], self.trained.prompt["opencc"]  # what the model was trained with
        self.converter = text_lib.make_converter(opencc)
        self.max_tokens = self.cfg.get("max_seq_length")
        self.model = None  # transformers model or llama_cpp.Llama, once loaded

    def count_tokens(self, messages: list[dict]) -> int:  # as generate tokenizes a prompt
        return len(prompt_ids(self.tokenizer, [messages])[0])

    def plan(self, text: str, source_name: str = "input") -> Plan:
        return self.plan_lines(split_input_lines(text), source_name)

    def plan_lines(self, originals: list[str], source_name: str = "input", *, first: int = 1, context: list[str] = (),
                   quiet: bool = False) -> Plan:
        """plan() of input lines: a chunk of a longer input (tools/translate.py streams it) starts at line `first`,
        its first prompts get `context` (the input's previous pieces) as one pass over the whole input would."""
        lines = text_lib.normalise_lines(originals, self.converter)
        no_context = dict(self.fmt, context_sentences=0)
        fits = (lambda piece: True) if not self.max_tokens else (
            lambda piece: self.count_tokens(prompt_messages(piece, [], no_context)) <= self.max_tokens
        )
        limit_hint = f"max_seq_length {self.max_tokens} tokens ({self.model_dir}/training_config.json)"
        planned = plan_lines(lines, fits, limit_hint, source_name, first=first)
        pieces = [p for line_pieces in planned for p in line_pieces if has_text(p)]
        split_up = sum(len(line_pieces) > len(split_sentences(line)) for line, line_pieces in zip(lines, planned))
        (log.debug if quiet else log.info)(
            "%d line(s), %d piece(s) to translate%s; prompt from %s/training_config.json",
            len(lines), len(pieces), f" ({split_up} line(s) with a sentence split at ，、 to fit)" if split_up else "",
            self.model_dir,
        )
        carried = list(context)
        prompts = build_prompts(carried + pieces, self.fmt, self.count_tokens, self.max_tokens)[len(carried):] if pieces else []
        return Plan(originals, lines, planned, pieces, prompts, source_name, first, split_up)

    def load(self, n_ctx: int = 512):
        """The model, loaded once (a GGUF is loaded again only if one-at-a-time decoding needs a larger context)."""
        if self.gguf_file is not None:
            if self.model is None or self.model.n_ctx() < n_ctx:
                if self.model is not None:
                    self.model.close()
                self.model = gguf.load_llama(self.gguf_file, n_ctx=n_ctx, n_threads=self.threads)
                log.info("model: %s (llama.cpp; trained on %s)", self.gguf_file, self.cfg["model"])
        elif self.model is None:
            self.model = models.load_trained_model(self.trained)
            if self.batch_size is None:  # the slot loop on a CUDA GPU holds 256 sentences; 16 on CPU
                self.batch_size = 256 if next(self.model.parameters()).device.type == "cuda" else 16
            log.info("model: %s (%s on %s, backend %s, %s)", self.model_dir,
                     "LoRA adapter" if self.trained.is_adapter else "full model", self.cfg["model"], self.trained.backend,
                     next(self.model.parameters()).device)
        return self.model

    def generate(self, plan: Plan, on_result: Callable[[int, str], None] | None = None) -> tuple[list[str], list[bool]]:
        """Raw translations of plan.pieces and whether each hit its token budget; on_result(i, normalised text) as
        each piece is done (each sentence with llama.cpp, each batch with transformers)."""
        report = None if on_result is None else (
            lambda i, raw: on_result(i, text_lib.normalise_lines([raw], self.converter)[0]))
        if self.gguf_file is not None:
            n_ctx = 512 if self.parallel > 1 else gguf.context_size(self.tokenizer, plan.prompts, plan.pieces, self.factor, 16)
            llm = self.load(n_ctx)
            return gguf.generate(llm, self.tokenizer, plan.prompts, plan.pieces, factor=self.factor, extra=16,
                                 desc="translate", parallel=self.parallel,
                                 on_result=None if report is None else (lambda i, text, hit: report(i, text)))
        model = self.load()
        eos = end_of_turn_ids(self.tokenizer)
        step = len(plan.prompts) if report is None else self.batch_size  # with a listener: one batch at a time
        raw, hit_limit = [], []
        for at in range(0, len(plan.prompts), step):
            texts, hits = generation.generate(
                model, self.tokenizer, plan.prompts[at:at + step], plan.pieces[at:at + step], batch_size=self.batch_size,
                factor=self.factor, extra=16, eos_token_ids=eos, desc="translate",
            )
            raw += texts
            hit_limit += hits
            if report is not None:
                for k, text in enumerate(texts):
                    report(at + k, text)
        return raw, hit_limit

    def translate(self, plan: Plan, on_result: Callable[[int, str], None] | None = None) -> list[str]:
        """The output lines (one per input line) for a plan; warns about translations cut at their budget."""
        if not plan.pieces:
            return assemble(plan.planned, [], plan.originals)  # nothing to translate: no model needed
        raw, hit_limit = self.generate(plan, on_result)
        translations = text_lib.normalise_lines(raw, self.converter)  # one line each, the training targets' script
        if any(hit_limit):
            piece_line = [n for n, line_pieces in enumerate(plan.planned, plan.first) for p in line_pieces if has_text(p)]
            cut = sorted({piece_line[i] for i, hit in enumerate(hit_limit) if hit})
            log.warning(
                "%d translation(s) reached the token budget without ending, so may be cut short (%s line(s) %s); "
                "raise --max-new-tokens-factor", sum(hit_limit), plan.source_name, ", ".join(map(str, cut[:20])),
            )
        return assemble(plan.planned, translations, plan.originals)
