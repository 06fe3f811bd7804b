"""GGUF for local deployment: llama.cpp's own converter and quantizer, a llama.cpp runner, an Ollama Modelfile.

Install (offline from the package index alone; builds llama.cpp with this machine's cmake + C++ compiler):
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF" pip install -e '.[gguf]'
    python -m tools.gguf setup     # llama.cpp's convert_hf_to_gguf.py (+ conversion/, gguf-py) of the SAME
                                    # llama-cpp-python version, from its sdist, into ~/.cache/wenyan-mt/
Use:
    python -m tools.gguf convert models/export/hf model-f16.gguf --outtype f16
    python -m tools.gguf quantize model-f16.gguf model-Q4_K_M.gguf Q4_K_M
    python -m tools.gguf modelfile model-Q4_K_M.gguf models/export/hf --system "..." > Modelfile
The export stage does all of this (dvc repro export/dvc.yaml); translate runs a GGUF with generate() below
(wenyan-translate --model models/export/model-Q4_K_M.gguf ...).

The converter runs as a subprocess with the vendored gguf-py first on sys.path (the gguf release that
converter was written against). It names the BPE pre-tokenizer from a hash of a fixed text's token ids;
tokens added with `tokenizer.add_tokens` (e.g. CJK characters for a wider Chinese vocabulary) change
that hash although the pre-tokenizer is the same, so where the converter does not recognise the hash,
the pre-tokenizer is identified again with those added tokens left out. They are written to the GGUF as
user-defined tokens, which llama.cpp, like transformers, matches before BPE.

Quantization goes through llama-cpp-python's binding of llama_model_quantize (no llama-quantize binary).
The runner feeds llama.cpp the token ids of the prompt that the HF tokenizer's chat template renders, so
prompts are identical token for token, and decodes greedily up to the end-of-turn token.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from wenyan.errors import PipelineError, get_logger
from wenyan.files import sha256_file, staging_path

log = get_logger("gguf")

PACKAGE = "llama-cpp-python"
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")  # convert_hf_to_gguf.py --outtype (tq1_0/tq2_0: ternary models only)
INSTALL = (
    "pip install -e '.[gguf]' (builds llama.cpp; CMAKE_ARGS in wenyan/gguf.py's docstring shorten the build), "
    "then python -m tools.gguf setup"
)
# Inside the sdist, what the converter needs: the script, its model classes, and gguf-py.
SDIST_PARTS = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/",
               "vendor/llama.cpp/LICENSE")

# Runs in the converter's subprocess: the vendored gguf-py first, the pre-tokenizer fallback, then the
# converter's own main() with its own command line.
CONVERT_SHIM = r'''
import json, os, sys
root = sys.argv[1]
sys.path[:0] = [os.path.join(root, "gguf-py"), root]
import gguf
if not os.path.abspath(gguf.__file__).startswith(os.path.abspath(root)):
    sys.exit(f"error: the converter imported gguf from {gguf.__file__}, not the vendored gguf-py in {root}")
import convert_hf_to_gguf
from conversion.base import TextModel, logger

_identify = TextModel.get_vocab_base_pre


class _WithoutAddedTokens:
    """The tokenizer's BPE + pre-tokenizer without its non-special added tokens."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer
        data = json.loads(tokenizer.backend_tokenizer.to_str())
        data["added_tokens"] = [t for t in data["added_tokens"] if t["special"]]
        self.backend = Tokenizer.from_str(json.dumps(data))

    def encode(self, text):
        return self.backend.encode(text).ids


def get_vocab_base_pre(self, tokenizer):
    try:
        return _identify(self, tokenizer)
    except NotImplementedError:
        added = [t for t in tokenizer.added_tokens_decoder.values() if not t.special]
        if not added or not hasattr(tokenizer, "backend_tokenizer"):
            raise
        name = _identify(self, _WithoutAddedTokens(tokenizer))
        logger.info(f"BPE pre-tokenizer {name!r} identified with the {len(added)} added (non-special) tokens left out")
        return name


TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
convert_hf_to_gguf.main()
'''


# ----------------------------------------------------------------------------------------------
# Setup: the converter of the installed llama-cpp-python version


def installed_version() -> str:
    """The installed llama-cpp-python version; the converter must come from the same llama.cpp."""
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise PipelineError(f"{PACKAGE} is not installed; {INSTALL}") from None


def missing() -> str | None:
    """None when the gguf extra is installed; else what is missing and how to install it (for callers that
    treat GGUF as optional, like the export stage)."""
    import importlib.util

    absent = [name for name, module in ((PACKAGE, "llama_cpp"), ("sentencepiece", "sentencepiece"))
              if importlib.util.find_spec(module) is None]
    return f"{', '.join(absent)} not installed; {INSTALL}" if absent else None


def cache_root() -> Path:
    from wenyan.files import user_cache_dir

    return user_cache_dir()


def converter_dir(version: str | None = None) -> Path:
    return cache_root() / f"llama.cpp-{version or installed_version()}"


def fetch_sdist(version: str, dest: Path) -> Path:
    """pip download the sdist of llama-cpp-python==version (no deps, no wheel) into dest."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
           "-d", str(dest), f"{PACKAGE}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise PipelineError(f"could not download the {PACKAGE}=={version} sdist: {last_line(proc.stderr or proc.stdout)}")
    return found[0]


def extract_converter(sdist: Path, target: Path) -> list[str]:
    """Copy SDIST_PARTS (python files and the LICENSE) out of the sdist into target; returns their paths."""
    written = []
    try:
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = member.name.split("/", 1)[1] if "/" in member.name else ""
                part = next((p for p in SDIST_PARTS if rel.startswith(p)), None)
                if part is None or not member.isfile():
                    continue
                if not (rel.endswith((".py", ".toml")) or rel.endswith("LICENSE") or "/gguf-py/gguf/" in rel):
                    continue
                out = target / rel.removeprefix("vendor/llama.cpp/")
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                written.append(str(out.relative_to(target)))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PipelineError(f"{sdist}: not a readable {PACKAGE} sdist ({exc})") from None
    if "convert_hf_to_gguf.py" not in written:
        raise PipelineError(f"{sdist}: has no vendor/llama.cpp/convert_hf_to_gguf.py; is it the {PACKAGE} sdist?")
    return written


# ----------------------------------------------------------------------------------------------
# Building llama-cpp-python (llama.cpp) from source with a progress bar
#
# `pip install` of the sdist compiles llama.cpp for ~4-5 minutes on 2 cores and, without -v, prints only pip's
# "still running..." meanwhile. build() runs the same pip install with -v and turns the build tool's own progress
# ("[ 45%] Building CXX object ..." from make, "[57/160] ..." from ninja) into a tqdm bar with elapsed time and
# ETA; lines without a percentage keep the bar's elapsed time moving.

PINNED_VERSION = "0.3.36"  # pyproject.toml's gguf extra
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
              "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF")


def build_progress(line: str) -> float | None:
    """The build's progress in percent from one line of `pip install -v` output, or None."""
    found = re.search(r"\[\s*(\d{1,3})%\]", line)
    if found:
        return float(found.group(1))
    found = re.search(r"^\s*\[(\d+)/(\d+)\]", line)
    if found and int(found.group(2)) > 0:
        return 100.0 * int(found.group(1)) / int(found.group(2))
    return None


def follow_build(lines, bar) -> list[str]:
    """Move `bar` (tqdm, total 100) along the build's output lines; returns the last 40 lines (for an error)."""
    tail: list[str] = []
    for line in lines:
        tail = (tail + [line.rstrip()])[-40:]
        percent = build_progress(line)
        if percent is not None and percent > bar.n:
            bar.update(percent - bar.n)
        else:
            bar.refresh()  # elapsed time moves even while one file compiles
    return tail


def build(version: str = PINNED_VERSION, cmd: list[str] | None = None) -> None:
    """pip install llama-cpp-python==version from source (its sdist, CMAKE_ARGS above unless set), showing the
    build's progress. cmd: the command to run instead (tests)."""
    from tqdm.auto import tqdm

    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", CMAKE_ARGS)}
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    cmd = cmd or [sys.executable, "-m", "pip", "install", "-v", "--no-binary", PACKAGE, f"{PACKAGE}=={version}"]
    started = time.monotonic()
    with tqdm(total=100, desc=f"building {PACKAGE} {version}", unit="%", bar_format=(
            "{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, ETA {remaining}")) as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        tail = follow_build(proc.stdout, bar)
        code = proc.wait()
        if code == 0:
            bar.update(100 - bar.n)
    if code != 0:
        raise PipelineError(f"building {PACKAGE}=={version} failed (exit {code}): {last_line(chr(10).join(tail))}")
    log.info("built and installed %s==%s in %.0f s", PACKAGE, version, time.monotonic() - started)


def setup(version: str | None = None, sdist: Path | None = None, force: bool = False) -> Path:
    """Put llama.cpp's converter of `version` (default: the installed one) into the cache, once. Returns its
    directory. `sdist` is a llama-cpp-python .tar.gz already at hand (else pip downloads it)."""
    version = version or installed_version()
    target = converter_dir(version)
    marker = target / "source.json"
    if marker.is_file() and not force:
        return target
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        tmp = Path(tmp)
        if sdist is None:
            sdist = fetch_sdist(version, tmp)
        files = extract_converter(sdist, tmp / "tree")
        gguf_version = read_gguf_py_version(tmp / "tree")
        source = {"package": f"{PACKAGE}=={version}", "sdist": sdist.name, "sha256": sha256_file(sdist),
                  "gguf_py_version": gguf_version, "files": len(files)}
        (tmp / "tree" / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "tree", target)
    log.info("llama.cpp converter of %s==%s (gguf-py %s, %d files) in %s (%.1f s)", PACKAGE, version, gguf_version,
             len(files), target, time.monotonic() - started)
    return target


def read_gguf_py_version(root: Path) -> str | None:
    path = root / "gguf-py" / "pyproject.toml"
    found = re.search(r'^version\s*=\s*"([^"]+)"', path.read_text(encoding="utf-8"), re.M) if path.is_file() else None
    return found.group(1) if found else None


def last_line(text: str) -> str:
    """The last non-empty line of a tool's output: where Python tracebacks and llama.cpp put the reason."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# ----------------------------------------------------------------------------------------------
# Convert and quantize


def convert(hf_dir: Path, out_path: Path, outtype: str = "f16", converter: Path | None = None) -> dict:
    """Convert a transformers model directory to GGUF with llama.cpp's convert_hf_to_gguf.py (a subprocess).
    The file appears at out_path only when complete. Returns {path, bytes, outtype, seconds, tokenizer_pre}."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise PipelineError(f"GGUF outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    if not (hf_dir / "config.json").is_file():
        raise PipelineError(f"{hf_dir}: no config.json; convert needs a transformers model directory")
    root = Path(converter) if converter else setup()
    if not (root / "convert_hf_to_gguf.py").is_file():
        raise PipelineError(f"{root}: no convert_hf_to_gguf.py; run python -m tools.gguf setup --force")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(out_path)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.name}.src.") as staged:
        source = stage_model_dir(hf_dir, Path(staged))
        cmd = [sys.executable, "-c", CONVERT_SHIM, str(root), str(source), "--outfile", str(tmp), "--outtype", outtype]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise PipelineError(f"{hf_dir}: convert_hf_to_gguf.py --outtype {outtype} failed (exit {proc.returncode}): "
                            f"{last_line(proc.stderr or proc.stdout)}")
    os.replace(tmp, out_path)
    info = {"path": str(out_path), "bytes": out_path.stat().st_size, "outtype": outtype,
            "seconds": round(time.monotonic() - started, 1), "tokenizer_pre": read_metadata(out_path).get("tokenizer.ggml.pre")}
    log.info("%s -> %s (%s, %.1f MB, pre-tokenizer %s)", hf_dir, out_path, outtype, info["bytes"] / 1e6, info["tokenizer_pre"])
    return info


def plain_byte_level(tokenizer_json: dict) -> dict | None:
    """A byte-level BPE tokenizer.json as transformers writes it for a model loaded from GGUF has
    byte_fallback on and the decoder chain ByteFallback -> Fuse -> Replace -> ByteLevel; convert_hf_to_gguf.py
    then takes it for a SentencePiece-style Llama tokenizer (tokenizer.ggml.model 'llama'), which is wrong.
    Returns the same tokenizer as a plain byte-level BPE (byte_fallback off, ByteLevel decoder), or None
    when nothing needs changing. Encoding is unchanged: byte-level BPE has every byte in its vocabulary,
    so byte fallback never fires."""
    model, pre = tokenizer_json.get("model") or {}, json.dumps(tokenizer_json.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not model.get("byte_fallback") or '"ByteLevel"' not in pre:
        return None
    fixed = {**tokenizer_json, "model": {**model, "byte_fallback": False}}
    fixed["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return fixed


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, kind: int, payload) -> bytes:
    """One protobuf field: kind 0 varint (payload an int), 2 length-delimited (bytes), 5 fixed32 (float)."""
    import struct

    key = _varint(number << 3 | kind)
    if kind == 0:
        return key + _varint(payload)
    if kind == 5:
        return key + struct.pack("<f", payload)
    return key + _varint(len(payload)) + payload


SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_UNUSED, SP_BYTE = 1, 2, 3, 5, 6  # sentencepiece_model.proto SentencePiece.Type


def is_byte_piece(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def sentencepiece_model(tokenizer_json: dict) -> bytes | None:
    """A SentencePiece model (tokenizer.model, the protobuf that sentencepiece reads) with the pieces, scores and
    types of a Unigram tokenizer.json or of a SentencePiece-style BPE one (byte fallback, no byte-level
    pre-tokenizer: what transformers' GemmaTokenizer saves), or None for any other kind. transformers writes only tokenizer.json for Gemma
    loaded from GGUF (and for a trimmed vocabulary, train.trim_vocab), and convert_hf_to_gguf.py reads Gemma's vocabulary
    from tokenizer.model alone (without it, it takes the tokenizer for a GPT-2 BPE and fails): the GGUF gets the
    same pieces in the same order (its "llama" tokenizer). Special tokens are control pieces, <unk> the unknown
    piece, <0xNN> byte pieces; no normalisation (Gemma's: spaces are ▁ already, no dummy prefix)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") == "Unigram":
        vocab, unk = [(piece, float(score)) for piece, score in model["vocab"]], model.get("unk_id")
    elif model.get("type") == "BPE" and model.get("byte_fallback") and '"ByteLevel"' not in json.dumps(
            tokenizer_json.get("pre_tokenizer")):  # SentencePiece-style BPE (what transformers' GemmaTokenizer saves)
        by_id = {i: t for t, i in model["vocab"].items()}
        for t in tokenizer_json.get("added_tokens", []):
            by_id.setdefault(t["id"], t["content"])
        size = max(by_id) + 1 if by_id else 0
        # a missing id (a piece spelt twice) becomes an unused piece; scores rank earlier ids first, as merges do
        vocab = [(by_id.get(i, f"<unused_gap_{i}>"), -float(i)) for i in range(size)]
        unk = model["vocab"].get(model.get("unk_token") or "<unk>")
    else:
        return None
    special = {t["id"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    # sentencepiece wants all 256 byte pieces or none; a byte spelt as its character (Gemma's GGUF has "\t" where
    # <0x09> belongs) is that byte's piece again, the first such piece
    names = {piece for piece, _ in vocab}
    if any(is_byte_piece(p) for p in names):
        for b in range(256):
            if f"<0x{b:02X}>" not in names:
                i = next((i for i, (piece, _) in enumerate(vocab) if piece == chr(b)), None)
                if i is not None:
                    vocab[i] = (f"<0x{b:02X}>", vocab[i][1])
    names = {piece for piece, _ in vocab}
    all_bytes = all(f"<0x{b:02X}>" in names for b in range(256))
    pieces, has_bytes, seen = b"", False, set()
    for i, (piece, score) in enumerate(vocab):
        if piece in seen:  # a piece spelt twice (Gemma's "\t"): sentencepiece refuses it; the id stays, never produced
            piece, kind = f"<unused_duplicate_{i}>", SP_UNUSED
        elif piece.startswith("<unused_gap_"):
            kind = SP_UNUSED
        elif i == unk:
            kind = SP_UNKNOWN
        elif i in special:
            kind = SP_CONTROL
        elif is_byte_piece(piece) and all_bytes:  # with some bytes missing, sentencepiece takes none as bytes
            kind, has_bytes = SP_BYTE, True
        else:
            kind = SP_NORMAL
        seen.add(piece)
        pieces += _field(1, 2, _field(1, 2, piece.encode("utf-8")) + _field(2, 5, float(score)) + _field(3, 0, kind))
    trainer = _field(3, 0, 2) + _field(4, 0, len(vocab))  # model_type BPE (Gemma's), vocab_size
    if has_bytes:
        trainer += _field(35, 0, 1)  # byte_fallback: sentencepiece refuses byte pieces without it
    normalizer = _field(1, 2, b"identity") + _field(3, 0, 0) + _field(4, 0, 0) + _field(5, 0, 1)
    return pieces + _field(2, 2, trainer) + _field(3, 2, normalizer)


def stage_model_dir(hf_dir: Path, staged: Path) -> Path:
    """The directory the converter reads: links to hf_dir's files, and tokenizer.json as plain byte-level
    BPE where plain_byte_level says so, or a tokenizer.model beside a Unigram tokenizer.json where there is none
    (sentencepiece_model); hf_dir itself is left as it is."""
    path = hf_dir / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    fixed = plain_byte_level(spec) if spec is not None else None
    sp_model = sentencepiece_model(spec) if spec is not None and not (hf_dir / "tokenizer.model").exists() else None
    if fixed is None and sp_model is None:
        return hf_dir
    for item in hf_dir.iterdir():
        if not (item.name == "tokenizer.json" and fixed is not None):
            os.symlink(item.resolve(), staged / item.name)
    if fixed is not None:
        (staged / "tokenizer.json").write_text(json.dumps(fixed, ensure_ascii=False), encoding="utf-8")
        log.info("%s: byte-level BPE with byte_fallback on; the converter reads it with byte_fallback off", path)
    if sp_model is not None:
        (staged / "tokenizer.model").write_bytes(sp_model)
        log.info("%s: a SentencePiece-style vocabulary without tokenizer.model; the converter reads one made from it", path)
    return staged


def quantize_types() -> dict[str, int]:
    """llama.cpp's quantization types by name (Q8_0, Q4_K_M, ...) -> llama_ftype."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {name.removeprefix(prefix): getattr(llama_cpp, name) for name in dir(llama_cpp) if name.startswith(prefix)}


@contextlib.contextmanager
def captured_fds():
    """Redirect the C library's stdout/stderr (fds 1, 2) into a temporary file; yields a function reading it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def quantize(in_gguf: Path, out_gguf: Path, qtype: str, threads: int = 0) -> dict:
    """Quantize a GGUF (f32/f16/bf16) with llama.cpp's llama_model_quantize (through llama-cpp-python).
    Tensors whose rows don't fit a K-quant's 256-block fall back to a type llama.cpp picks (as llama-quantize does).
    Returns {path, bytes, qtype, seconds}."""
    in_gguf, out_gguf = Path(in_gguf), Path(out_gguf)
    if not in_gguf.is_file():
        raise PipelineError(f"{in_gguf}: GGUF file not found")
    try:
        import llama_cpp
    except ImportError:
        raise PipelineError(f"quantize needs {PACKAGE}: {INSTALL}") from None
    types = quantize_types()
    name = str(qtype).upper()
    if name not in types:
        raise PipelineError(f"unknown llama.cpp quantization type {qtype!r}; known: {', '.join(sorted(types))}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[name]
    params.nthread = threads
    out_gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(out_gguf)
    started = time.monotonic()
    with captured_fds() as output:
        rc = llama_cpp.llama_model_quantize(str(in_gguf).encode(), str(tmp).encode(), ctypes.byref(params))
        text = output()
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        reason = [line for line in text.splitlines() if "error" in line.lower() or "failed" in line.lower()]
        raise PipelineError(f"{in_gguf}: llama_model_quantize to {name} failed (code {rc}): "
                            f"{(reason[-1] if reason else last_line(text)).strip()}")
    os.replace(tmp, out_gguf)
    info = {"path": str(out_gguf), "bytes": out_gguf.stat().st_size, "qtype": name, "seconds": round(time.monotonic() - started, 1)}
    log.info("%s -> %s (%s, %.1f MB)", in_gguf, out_gguf, name, info["bytes"] / 1e6)
    return info


def read_metadata(path: Path) -> dict:
    """The GGUF's scalar and string metadata (token lists and merges left out)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors on a bad file
        raise PipelineError(f"{path}: not a readable GGUF file ({exc})") from None
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or len(field.data) != 1:
            continue
        meta[key] = field.contents()
    return meta


# ----------------------------------------------------------------------------------------------
# Running a GGUF with llama.cpp


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(flags.partition(":")[2].split())


def cpu_has_amx() -> bool:
    return "amx_int8" in cpu_flags()


@contextlib.contextmanager
def model_params(**overrides):
    """Llama() builds its llama_model_params from llama_model_default_params() and exposes only some of them;
    this sets others (e.g. use_extra_bufts) for the Llama() calls inside the block."""
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def patched():
        params = default()
        for key, value in overrides.items():
            setattr(params, key, value)
        return params

    low.llama_model_default_params = patched
    try:
        yield
    finally:
        low.llama_model_default_params = default


def quiet_openmp() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set: llama.cpp's CPU threads (OpenMP, torch's libgomp) then sleep at a barrier
    instead of spinning. On a machine whose cores are busy with other work, spinning threads wait for each other's
    time slices: a 4-sequence decode step took 0.7-5 s spinning and 0.2 s passive on 2 shared cores
    (benchmarks/gguf_local.py's report). Must run before torch or llama_cpp is imported (the commands' cli())."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_llama(gguf_path: Path, n_ctx: int = 2048, n_threads: int | None = None, extra_buffers: bool | None = None):
    """A llama_cpp.Llama on the GGUF (CPU), quiet. extra_buffers: llama.cpp's repacked/AMX weight buffers;
    None = on unless the CPU has AMX: a native build's AMX kernel (ggml_backend_amx_mul_mat) crashed with
    SIGSEGV on quantized types (Q8_0, Q4_K_M) on the AMX machine this was written on (llama-cpp-python 0.3.36)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise PipelineError(f"running a GGUF needs {PACKAGE}: {INSTALL}") from None
    if not Path(gguf_path).is_file():
        raise PipelineError(f"{gguf_path}: GGUF file not found")
    threads = n_threads or os.cpu_count() or 1
    extra = (not cpu_has_amx()) if extra_buffers is None else extra_buffers
    try:
        with model_params(use_extra_bufts=extra):
            return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0,
                         verbose=False)
    except ValueError as exc:  # llama-cpp-python: "Failed to load model from file: ..."
        raise PipelineError(f"{gguf_path}: llama.cpp could not load it ({exc})") from None


def greedy(llm, ids: list[int], stops: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ids (temperature 0), without the stop token; at most max_new_tokens."""
    if len(ids) + max_new_tokens > llm.n_ctx():
        raise PipelineError(f"prompt of {len(ids)} tokens + {max_new_tokens} new ones exceeds the llama.cpp context of {llm.n_ctx()}")
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if token in stops or len(out) >= max_new_tokens:
            break
        out.append(token)
    return out


def context_size(tokenizer, prompts: list[list[dict]], sources: list[str], factor: float, extra: int) -> int:
    """The llama.cpp context these prompts need: the longest prompt + its token budget, rounded up to 256."""
    from wenyan.prompt import prompt_ids, token_budgets

    lengths = [len(ids) for ids in prompt_ids(tokenizer, prompts)]
    budgets = token_budgets(tokenizer, sources, factor, extra)
    need = max((n + b for n, b in zip(lengths, budgets)), default=1)
    return max(512, -(-need // 256) * 256)


def shared_prefix_length(input_ids: list[list[int]]) -> int:
    """How many leading tokens every prompt has in common (the system prompt and the template's head), leaving
    each prompt at least one token of its own (its last token's logits start its reply)."""
    if not input_ids:
        return 0
    first, n = input_ids[0], min(len(ids) for ids in input_ids) - 1
    for ids in input_ids[1:]:
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


class _Batch:
    """A llama_batch (llama_batch_init) filled token by token: each token one position of one sequence."""

    def __init__(self, capacity: int):
        import llama_cpp

        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.raw.n_tokens = 0

    def clear(self) -> None:
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Appends a token; returns its index in the batch (where its logits are, if asked for)."""
        i = self.raw.n_tokens
        if i >= self.capacity:
            raise PipelineError(f"llama.cpp batch of {self.capacity} tokens is full (internal error)")
        b = self.raw
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq
        b.n_tokens = i + 1
        return i

    def free(self) -> None:
        import llama_cpp

        llama_cpp.llama_batch_free(self.raw)


def batched_context_size(prefix: int, needs: list[int], parallel: int) -> int:
    """KV cells for the shared prefix (once) + the `parallel` largest prompt-suffix + budget needs, rounded up to
    256: at any time at most `parallel` sequences hold cells of their own (a finished one frees its cells)."""
    top = sorted(needs, reverse=True)[:parallel]
    return max(512, -(-(prefix + sum(top) + len(top)) // 256) * 256)


# Long (~110 lines): one llama.cpp batch loop: the shared prefix, sequences joining and leaving their slots, one llama_batch a step.
def batched_greedy(llm, input_ids: list[list[int]], budgets: list[int], stops: list[int], *, parallel: int = 16,
                   on_done=None, timings: dict | None = None, share_prefix: bool = True, unified: bool = True,
                   flash_attn: bool | None = None) -> list[list[int]]:
    """Greedy replies (without the stop token, at most budget tokens each) to all prompts at once in one llama.cpp
    context: continuous batching over `parallel` sequences that share the KV cells of the prompts' common prefix.

    The prefix (system prompt, template head) is decoded once as sequence 0; a sentence starting in slot s gets
    the prefix by llama_memory_seq_cp (in the unified KV cache, the same cells marked with one more sequence:
    no copy), then its own prompt tokens. Every llama_decode call is one llama_batch holding, for every running
    sentence, its next token (its own seq_id and position), plus the prompt tokens of sentences that start in
    the slots freed by sentences that ended (llama_memory_seq_rm), longest first. Logits are asked for only at
    each sequence's last token; the next token is their argmax (the first of equal maxima, as torch.argmax).
    on_done(i, ids) is called as each prompt finishes (in finishing order). timings, if given, gets the seconds
    of context creation, the prefix, llama_decode calls and all, decode calls and batch tokens.
    share_prefix=False (for benchmarks/gguf_local.py) decodes every prompt whole in its own sequence."""
    import numpy as np
    import llama_cpp
    from llama_cpp import _internals

    n = len(input_ids)
    results: list[list[int] | None] = [None] * n
    if n == 0:
        return []
    parallel = max(1, min(parallel, n))
    prefix = shared_prefix_length(input_ids) if share_prefix else 0
    needs = [len(ids) - prefix + budget for ids, budget in zip(input_ids, budgets)]
    if unified:
        n_ctx = batched_context_size(prefix, needs, parallel)
    else:  # one KV stream a sequence, each n_ctx / n_seq_max cells: the prefix + the largest need
        per_seq = -(-(prefix + max(needs) + 1) // 256) * 256
        n_ctx = per_seq * (parallel + 1)
    biggest_step = sum(sorted((len(ids) - prefix for ids in input_ids), reverse=True)[:parallel]) + parallel
    n_batch = max(prefix, biggest_step, 1)
    threads = llm.context_params.n_threads
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, min(n_batch, 512)
    params.n_seq_max, params.kv_unified = parallel + 1, unified
    if flash_attn is not None:
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.n_threads = params.n_threads_batch = threads
    started = time.perf_counter()
    try:
        ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    except ValueError as exc:
        raise PipelineError(f"llama.cpp could not create a context of {n_ctx} tokens for {parallel} sequences ({exc})") from None
    mem, n_vocab = ctx.memory, llm.n_vocab()
    batch = _Batch(n_batch)
    stop_set = set(stops)
    context_s = time.perf_counter() - started
    decode_s = [0.0]

    def decode() -> None:
        t = time.perf_counter()
        rc = llama_cpp.llama_decode(ctx.ctx, batch.raw)
        decode_s[0] += time.perf_counter() - t
        if rc != 0:
            raise PipelineError(f"llama_decode failed (code {rc}) on a batch of {batch.raw.n_tokens} tokens, context {n_ctx}")

    def argmax(i: int) -> int:
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, i), shape=(n_vocab,))
        return int(row.argmax())

    calls = tokens = 0
    try:
        for k in range(prefix):  # the shared prefix, once, as sequence 0 (no logits needed)
            batch.add(input_ids[0][k], k, 0, False)
        if prefix:
            decode()
            calls, tokens = 1, prefix
        prefix_s = time.perf_counter() - started - context_s
        queue = sorted(range(n), key=lambda i: -len(input_ids[i]) - budgets[i])[::-1]  # pop() = longest first
        slots: list[dict | None] = [None] * parallel  # slot s is sequence s + 1
        while queue or any(slots):
            batch.clear()
            for s, slot in enumerate(slots):
                while slot is None and queue and budgets[queue[-1]] <= 0:  # nothing to generate: an empty reply
                    i = queue.pop()
                    results[i] = []
                    if on_done is not None:
                        on_done(i, [])
                if slot is None and queue:
                    i = queue.pop()
                    seq = s + 1
                    llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
                    if prefix:
                        llama_cpp.llama_memory_seq_cp(mem, 0, seq, -1, -1)
                    own = input_ids[i][prefix:]
                    for k, token in enumerate(own):
                        at = batch.add(token, prefix + k, seq, k == len(own) - 1)
                    slots[s] = {"i": i, "pos": len(input_ids[i]), "out": [], "at": at}
                elif slot is not None and slot["out"]:
                    slot["at"] = batch.add(slot["out"][-1], slot["pos"], s + 1, True)
                    slot["pos"] += 1
            if batch.raw.n_tokens == 0:  # the last prompts had nothing to generate
                break
            tokens += batch.raw.n_tokens
            calls += 1
            decode()
            for s, slot in enumerate(slots):
                if slot is None:
                    continue
                token = argmax(slot["at"])
                done = token in stop_set
                if not done:
                    slot["out"].append(token)
                    done = len(slot["out"]) >= budgets[slot["i"]]
                if done:
                    results[slot["i"]] = slot["out"]
                    llama_cpp.llama_memory_seq_rm(mem, s + 1, -1, -1)
                    slots[s] = None
                    if on_done is not None:
                        on_done(slot["i"], slot["out"])
    finally:
        batch.free()
        ctx.close()
    if timings is not None:
        timings.update(prefix_tokens=prefix, context_seconds=round(context_s, 3), prefix_seconds=round(prefix_s, 3),
                       decode_seconds=round(decode_s[0], 3), n_ctx=n_ctx, parallel=parallel, decode_calls=calls,
                       batch_tokens=tokens, seconds=round(time.perf_counter() - started, 3))
    return results


def reply_text(tokenizer, new: list[int], budget: int) -> tuple[str, bool]:
    """(text, hit_limit) of a reply's token ids, as generation.generate decodes them: a reply that used its whole
    budget never ended its turn (the stop token is left out), and may end in half a character, dropped."""
    hit = len(new) >= budget
    text = tokenizer.decode(new, skip_special_tokens=True)
    return (text.rstrip("\ufffd") if hit else text), hit


def greedy_replies(llm, tokenizer, prompts: list[list[dict]], budgets: list[int], desc: str | None = None) -> list[list[int]]:
    """Greedy new token ids of each prompt on llama.cpp, without the stop token, each at most its budget: the prompt
    ids and stop tokens of transformers generation (wenyan.prompt.prompt_ids, end_of_turn_ids), one sentence after
    the other (llama.cpp reuses the KV cache of the prefix a prompt shares with the one before); a tqdm bar with desc."""
    from tqdm.auto import tqdm

    from wenyan.prompt import end_of_turn_ids, prompt_ids

    stops = end_of_turn_ids(tokenizer)
    replies = []
    with tqdm(total=len(prompts), desc=desc, unit="sent", disable=True if desc is None else None) as bar:
        for ids, budget in zip(prompt_ids(tokenizer, prompts), budgets):
            replies.append(greedy(llm, ids, stops, budget))
            bar.update(1)
    return replies


def generate(llm, tokenizer, prompts: list[list[dict]], sources: list[str], *, factor: float = 2.0, extra: int = 16,
             desc: str = "llama.cpp", parallel: int = 16, on_result=None) -> tuple[list[str], list[bool]]:
    """generation.generate's contract on llama.cpp: (texts, hit_limit) in the order of `prompts`. The same prompt ids
    (prompt_ids), budgets (token_budgets), stop tokens (end_of_turn_ids) and decoding
    (the tokenizer's, special tokens skipped); greedy; a tqdm bar on stderr. parallel > 1: batched_greedy
    (all sentences in one context, `parallel` at a time, the shared prompt prefix computed once); parallel 1: one
    sentence after the other through Llama.generate (which reuses the KV of the prefix a prompt shares with the
    one before). on_result(i, text, hit_limit) is called as each sentence is done."""
    from tqdm.auto import tqdm

    from wenyan.prompt import end_of_turn_ids, prompt_ids, token_budgets

    stops = end_of_turn_ids(tokenizer)
    input_ids = prompt_ids(tokenizer, prompts)
    budgets = token_budgets(tokenizer, sources, factor, extra)
    texts: list[str | None] = [None] * len(prompts)
    hit_limit = [False] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="sent") as bar:
        def done(i: int, new: list[int]) -> None:
            texts[i], hit_limit[i] = reply_text(tokenizer, new, budgets[i])
            bar.update(1)
            if on_result is not None:
                on_result(i, texts[i], hit_limit[i])

        if parallel > 1:
            batched_greedy(llm, input_ids, budgets, stops, parallel=parallel, on_done=done)
        else:
            for i, (ids, budget) in enumerate(zip(input_ids, budgets)):
                done(i, greedy(llm, ids, stops, budget))
    return texts, hit_limit


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's own tokenization of plain text (no BOS, special tokens not parsed)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


# ----------------------------------------------------------------------------------------------
# Ollama


def ollama_template(tokenizer) -> str:
    """An Ollama (Go template) TEMPLATE equal to the tokenizer's chat template for a system message, a user
    message and the generation prompt (the Modelfile always sets SYSTEM; without one the template leaves the
    system turn out, where some chat templates put a default one). Derived by rendering the chat template with placeholders:
    the system block is everything before the user turn, ending after the system turn's end-of-turn token
    (and the newlines that follow it)."""
    from wenyan.prompt import end_of_turn_token

    system, user = "SYSTEM_4F2A", "USER_7C1D"
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
    )
    if text.count(system) != 1 or text.count(user) != 1 or text.index(system) > text.index(user):
        raise PipelineError("the chat template does not render a system and a user message in order; no Ollama template")
    head, rest = text.split(system)
    between, tail = rest.split(user)
    eot = end_of_turn_token(tokenizer)
    if eot and between.startswith(eot):  # a system turn of its own (ChatML, Llama 3.1)
        cut = len(eot) + (len(between) - len(eot) - len(between[len(eot):].lstrip("\n")))
        system_end, user_start = between[:cut], between[cut:]
        template = "{{ if .System }}" + head + "{{ .System }}" + system_end + "{{ end }}" + user_start + "{{ .Prompt }}" + tail
    elif eot and eot not in between:  # the system text opens the user turn (Gemma): the same turn without it
        template = head + "{{ if .System }}{{ .System }}" + between + "{{ end }}{{ .Prompt }}" + tail
        if tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False) != head + user + tail:
            raise PipelineError("the chat template renders a user message without a system one differently; no Ollama template")
    else:
        raise PipelineError(f"the chat template does not end the system turn with its end-of-turn token {eot!r}")
    if "{{" in text.replace(system, "").replace(user, "") or '"""' in template:
        raise PipelineError('the chat template renders "{{" or \'"""\', which a Modelfile TEMPLATE cannot hold')
    return template


def render_modelfile(gguf_name: str, tokenizer, system_prompt: str, user_template: str = "{classical}",
                     license_text: str | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF, the chat template as TEMPLATE, stop at end of turn, greedy, SYSTEM, and
    LICENSE where the base model's terms travel with it (Gemma).
    user_template (format.user_template the model was trained with) wraps what the user types, so
    `ollama run` sends the training prompt for a bare sentence."""
    if '"""' in system_prompt + user_template:
        raise PipelineError('the system prompt or user template contains """, which a Modelfile cannot quote')
    from wenyan.prompt import end_of_turn_ids

    stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    template = ollama_template(tokenizer).replace("{{ .Prompt }}", user_template.format(classical="{{ .Prompt }}"))
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1", f'SYSTEM """{system_prompt}"""']
    if license_text:
        lines.append(f'LICENSE """{license_text}"""')
    return "\n".join(lines) + "\n"
