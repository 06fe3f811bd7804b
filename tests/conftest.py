"""Shared fixtures and helpers: tiny NiuTrans-layout corpora, archives of them, params files; the tiny DVC project
reproduced once a session (`reproduced`, and `project_copy` for a test that changes it: tests/project.py); a tiny
adapter and a fake generation for the translate tests; `python -m stages.X` run as a user runs it (run_cli)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) from the repo root must import stages
    sys.path.insert(0, str(REPO))

# A few real-looking pairs with the corpus's quirks: spaces where quotation marks were, traditional
# characters, a trailing space. Keys are "<book>/<chapter path>".
CHAPTERS = {
    "史记/十二本纪/五帝本纪": (
        ["黄帝者，少典之子，姓公孫，名曰軒轅。", "生而神灵，弱而能言。", "问曰： 若何有？ "],
        ["黄帝是少典部族的子孙，姓公孙，名叫轩辕。", "他一生下来就很有灵性，很小就会说话。", "问道： 有什么呢？"],
    ),
    "史记/七十列传/伯夷列传": (
        ["夫学者载籍极博，犹考信于六艺。", "诗书虽缺，然虞夏之文可知也。"],
        ["学者们涉猎的书籍虽然极为广博，但还是要从六艺中考察可信的记载。", "《诗》《书》虽然残缺，但是虞、夏时代的文字还是可以知道的。"],
    ),
    "论语/学而篇": (
        ["子曰：学而时习之，不亦说乎？", "有朋自远方来，不亦乐乎？", "人不知而不愠，不亦君子乎？"],
        ["孔子说：学了又时常温习，不是很愉快吗？", "有志同道合的人从远方来，不是很令人高兴的吗？", "人家不了解我，我也不怨恨，不也是一个有德的君子吗？"],
    ),
}
N_PAIRS = sum(len(s) for s, _ in CHAPTERS.values())

BASE_PARAMS = {
    "ingest": {"sources": [], "on_misaligned": "error"},
    "clean": {"opencc": "t2s", "min_chars": 2, "max_chars": 200, "max_ratio": 4.0, "dedupe": True},
    "split": {"seed": 42, "valid_fraction": 0.2, "test_fraction": 0.2, "test_books": []},
    "format": {
        "system_prompt": "你是翻译家。",
        "user_template": "翻译：\n{classical}",
        "context_sentences": 0,
        "context_template": "上文：{context}\n",
    },
}


SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))  # every stage's values


def shipped(section: str, **overrides) -> dict:
    """The shipped params.yaml's `section:` with some keys changed: stages take no defaults, every key is given.
    train: with another model, the chat template is that model's own unless given too (the shipped gemma-3 belongs
    to the shipped base model, Gemma 3, which has none)."""
    unknown = set(overrides) - set(SHIPPED[section])
    assert not unknown, f"not keys of params.yaml {section}: {unknown}"
    values = copy.deepcopy(SHIPPED[section])
    if section == "train" and overrides.get("model", values["model"]) != values["model"]:
        values["chat_template"] = None
    return {**values, **overrides}


def write_chapters(books_root: Path, chapters: dict, line_end: str = "\n") -> None:
    for key, (src, tgt) in chapters.items():
        d = books_root / key
        d.mkdir(parents=True, exist_ok=True)
        (d / "source.txt").write_text(line_end.join(src) + line_end, encoding="utf-8", newline="")
        (d / "target.txt").write_text(line_end.join(tgt) + line_end, encoding="utf-8", newline="")
        (d / "数据来源.txt").write_text("1、某网站\n", encoding="utf-8")


@pytest.fixture
def make_corpus(tmp_path):
    """make_corpus(name="corp", chapters=CHAPTERS, bilingual_dir=True, parent=tmp_path) -> corpus directory.

    With bilingual_dir the books sit under <name>/双语数据/ as in the archive; without it, directly in <name>/.
    """

    def make(name="corp", chapters=None, bilingual_dir=True, parent=None, line_end="\n") -> Path:
        root = Path(parent or tmp_path) / name
        books_root = root / "双语数据" if bilingual_dir else root
        books_root.mkdir(parents=True, exist_ok=True)
        (root / "README.md").write_text("# test corpus\n", encoding="utf-8")
        write_chapters(books_root, CHAPTERS if chapters is None else chapters, line_end)
        return root

    return make


def make_archive(src_dir: Path, out: Path) -> Path:
    """Pack the contents of src_dir (not src_dir itself) into out: .tar, .tar.gz, .tar.xz or .zip."""
    files = sorted(p for p in src_dir.rglob("*") if p.is_file())
    if out.name.endswith(".zip"):
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, p.relative_to(src_dir).as_posix())
    else:
        mode = {".xz": "w:xz", ".gz": "w:gz", ".tar": "w"}[out.suffix]
        with tarfile.open(out, mode) as tar:
            for p in files:
                tar.add(p, p.relative_to(src_dir).as_posix())
    return out


@pytest.fixture
def write_params(tmp_path):
    """write_params(**sections) -> path of a params.yaml: BASE_PARAMS with each given section updated."""

    def write(path=None, **sections) -> Path:
        params = copy.deepcopy(BASE_PARAMS)
        for name, values in sections.items():
            params[name].update(values)
        path = Path(path or tmp_path / "params.yaml")
        path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
        return path

    return write


def niutrans(path, **extra) -> dict:
    return {"path": str(path), "format": "niutrans", **extra}


def pairs_frame(rows, book="书"):
    """ingest's pairs (a pandas DataFrame) of (source, target) rows, chapter i for row i, in one book."""
    import pandas as pd

    return pd.DataFrame([
        {"id": f"c/{book}/篇{i}#{i}", "corpus": "c", "book": book, "chapter": f"篇{i}", "line": i, "source": s, "target": t}
        for i, (s, t) in enumerate(rows, 1)
    ])


def jsonl_row(i=1):
    """One row of format's JSONL (the schema evaluate and train read)."""
    return {"id": f"c/书/篇#{i}", "book": "书", "chapter": "篇", "line": i, "source": "学而时习之。", "target": "学了又时常温习。",
            "messages": [{"role": "user", "content": "翻译：学而时习之。"}, {"role": "assistant", "content": "学了又时常温习。"}]}


def params_file(tmp_path, **sections):
    """tmp_path/params.yaml: BASE_PARAMS with the shipped evaluate: and export:, each given section updated."""
    params = copy.deepcopy(BASE_PARAMS)
    params.update(evaluate=shipped("evaluate"), export=shipped("export"))
    for name, values in sections.items():
        params[name] = {**params[name], **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


EXPORT_PARAMS = {"dtype": "bf16", "gguf": False, "gguf_outtype": "auto", "gguf_quantize": [], "check_samples": 0}


def export_params_file(path: Path, **export_params) -> Path:
    """A params.yaml at path: BASE_PARAMS with an export: section (no GGUF, no check samples unless given)."""
    params = copy.deepcopy(BASE_PARAMS)
    params["export"] = {**EXPORT_PARAMS, **export_params}
    path.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return path


def run_cli(stage, *args):
    """The last stderr line of a failing `python -m stages.<stage>` (or tools.<command>), checked to be the only
    `error:` line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    package = "tools" if (REPO / "tools" / f"{stage}.py").is_file() else "stages"
    proc = subprocess.run([sys.executable, "-m", f"{package}.{stage}", *map(str, args)], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.rstrip("\n").splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], proc.stderr[-2000:]
    return lines[-1]


@pytest.fixture(params=["tmpfs", "patched"])
def full_disk(request, tmp_path, monkeypatch):
    """diskfull.FullDisk on tmp_path/full: a real small tmpfs (root) or temporary files linked to /dev/full."""
    from diskfull import FullDisk

    disk = FullDisk(tmp_path / "full", request.param, monkeypatch)
    disk.mount()
    try:
        yield disk
    finally:
        monkeypatch.undo()
        disk.unmount()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests and its module fixtures (`pytestmark =
    pytest.mark.usefixtures("one_torch_thread")`): tiny models gain nothing from threads, and on a busy shared
    CPU every op of two threads waits for the other."""
    from tiny import one_thread

    with one_thread():
        yield


def spelled(src: Path, spelling: str, tmp_path: Path) -> Path:
    """src under another name: "same" (itself), "dotdot" (through a sibling folder `sub` and ..), "symlink"
    (a link to it), "hard link" (a second name of the same inode). The link names are made in tmp_path."""
    if spelling == "same":
        return src
    if spelling == "dotdot":
        (src.parent / "sub").mkdir(exist_ok=True)
        return src.parent / "sub" / ".." / src.name
    if spelling == "symlink":
        link = tmp_path / "link.txt"
        link.symlink_to(src)
        return link
    if spelling == "hard link":
        link = tmp_path / "hard.txt"
        os.link(src, link)
        return link
    raise ValueError(spelling)


# ----------------------------------------------------------------------------------------------
# The tiny DVC project (tests/project.py), reproduced once a session


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory):
    """The tiny project reproduced in full (`dvc repro`) and committed (git-tracked reports, dvc.lock), once a
    session: {"root", "repo", "model", "env", "repro": the repro's CompletedProcess}. Read it, never change it: a
    test that runs a stage, an experiment or a git command that writes works on `project_copy`.

    Under pytest-xdist the workers share one build (pytest-xdist's documented pattern: the first worker to ask
    builds it in the run's common temporary directory under a file lock, the others wait and read it), so a
    session builds it once, not once a worker."""
    import json
    import shutil

    from filelock import FileLock

    if shutil.which("git") is None:
        pytest.fail("the end-to-end tests need git on PATH")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return _reproduce(tmp_path_factory.mktemp("project"))
    root = tmp_path_factory.getbasetemp().parent / "reproduced"  # the run's directory, common to its workers
    record = root / "repro.json"
    with FileLock(str(root) + ".lock"):
        if not record.is_file():
            if root.exists():  # a build that failed in another worker: its test reported why; build again here
                shutil.rmtree(root)
            root.mkdir()
            built = _reproduce(root)
            proc = built["repro"]
            record.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout,
                                          "stderr": proc.stderr}), encoding="utf-8")
            return built
    from project import environment

    saved = json.loads(record.read_text(encoding="utf-8"))
    proc = subprocess.CompletedProcess(saved["args"], saved["returncode"], saved["stdout"], saved["stderr"])
    return {"root": root, "repo": root / "repo", "model": root / "tiny-llama", "env": environment(), "repro": proc}


def _reproduce(root: Path) -> dict:
    from project import DVC, environment, make_project, run

    env = environment()
    repo = root / "repo"
    repo.mkdir()
    make_project(repo, root / "tiny-llama", env)
    proc = run(DVC + ["repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "reproduced"], repo, env)
    return {"root": root, "repo": repo, "model": root / "tiny-llama", "env": env, "repro": proc}


@pytest.fixture
def project_copy(reproduced, tmp_path):
    """A copy of the reproduced project at tmp_path/repo (history, dvc.lock, DVC cache, outputs): change it freely."""
    from project import copy_project

    return copy_project(reproduced["repo"], tmp_path / "repo")


# ----------------------------------------------------------------------------------------------
# Tiny models, built once a session (read only: a test that writes works in its tmp_path)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory):
    """A tiny adapter and its base (tiny.make_tiny_model): what translate, export and the output guards load."""
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-adapter"))


@pytest.fixture
def echo_generate(monkeypatch):
    """Replace generation with '译' + the piece, recording the prompts it was given."""
    from wenyan import generation

    calls = []

    def fake(model, tokenizer, prompts, sources, **kwargs):
        calls.append({"prompts": prompts, "sources": list(sources)})
        return ["译" + s for s in sources], [False] * len(sources)

    monkeypatch.setattr(generation, "generate", fake)
    return calls


@pytest.fixture(scope="session")
def tiny_train(tmp_path_factory):
    """train_run.tiny_project with a BPE tokenizer trained on its rows: {"model", "train", "valid"}."""
    from tiny import bpe_tokenizer
    from train_run import TOKENIZER_TEXTS, tiny_project

    return tiny_project(tmp_path_factory.mktemp("tiny-train"), bpe_tokenizer(TOKENIZER_TEXTS, vocab_size=400),
                        max_positions=256)


@pytest.fixture(scope="session")
def tiny_train_bytes(tmp_path_factory):
    """The tiny train data with a byte-level tokenizer without merges (~3 tokens a Chinese character, like a small
    English model's BPE): train.extend_vocab auto extends it."""
    from tiny import byte_tokenizer
    from train_run import tiny_project

    return tiny_project(tmp_path_factory.mktemp("tiny-train-bytes"), byte_tokenizer(), max_positions=512)
