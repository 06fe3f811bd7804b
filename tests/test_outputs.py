"""Outputs are their stage's own (issue 29, class 2), and paths that break the system's limits are one line
(class 6): every output directory a stage writes carries a manifest naming its stage; a stage refuses a directory
another stage wrote, a symlinked output, an output onto the base behind a model; temporary files and staging
directories are unique, never followed through a planted link; two runs to one output each leave it whole; the
dequantised base goes to the user's cache, never to the current directory; a closed stdin, a 5,000-character
path and a 1,100-level directory tree are each one `error:` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, shipped

from tools import translate
from wenyan import files, models
from wenyan.errors import PipelineError, run_main
from wenyan.files import MANIFEST, check_owned_dir, write_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def stage_dir(path: Path, stage: str, names=("model.safetensors", "config.json")) -> Path:
    path.mkdir(parents=True)
    for name in names:
        (path / name).write_text(f"{stage} {name}\n")
    write_manifest(path, stage)
    return path


def one_error_line(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        run_main(main, [str(a) for a in argv])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def echo(monkeypatch):
    from wenyan import generation

    monkeypatch.setattr(generation, "generate", lambda model, tok, prompts, sources, **kw: (["译" + s for s in sources],
                                                                                           [False] * len(sources)))


def passthrough_params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"pretrain": shipped("pretrain", enabled=False), "clean": {"opencc": "t2s"},
                                    "train": {"model": str(tmp_path / "no-such-model")}}), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Class 2: a stage never replaces another stage's output


def test_manifest_names_the_stage_and_another_stages_directory_is_refused(tmp_path):
    adapter = stage_dir(tmp_path / "adapter", "train")
    assert json.loads((adapter / MANIFEST).read_text())["stage"] == "train"
    check_owned_dir(adapter, "--out", "train")  # its own stage: replaced
    with pytest.raises(PipelineError, match=rf"^{adapter}: --out is the train stage's output \({MANIFEST} says so\); "
                                            r"the pretrain stage would replace it"):
        check_owned_dir(adapter, "--out", "pretrain")


@pytest.mark.parametrize("flag", ["--out", "--reports"])
def test_pretrain_onto_the_trained_adapter_is_refused_and_kept(tmp_path, flag, capsys):
    from stages import pretrain

    adapter = stage_dir(tmp_path / "models/adapter", "train")
    before = tree(adapter)
    paths = {"--out": tmp_path / "models/pretrain", "--reports": tmp_path / "reports/pretrain", flag: adapter}
    line = one_error_line(capsys, pretrain.main, ["--base", tmp_path / "models/base", "--split-dir", tmp_path / "split",
                                                  *[x for kv in paths.items() for x in kv],
                                                  "--params", passthrough_params(tmp_path)])
    assert line == (f"error: {adapter}: {flag} is the train stage's output ({MANIFEST} says so); the pretrain stage "
                    f"would replace it as a whole. Give {flag} a path of its own")
    assert tree(adapter) == before


def test_pretrain_passthrough_outputs_carry_manifests_naming_the_stage(tmp_path):
    from stages import pretrain

    out, reports = tmp_path / "models/pretrain", tmp_path / "reports/pretrain"
    pretrain.main(["--base", str(tmp_path / "models/base"), "--split-dir", str(tmp_path / "split"), "--out", str(out),
                   "--reports", str(reports), "--params", str(passthrough_params(tmp_path))])
    for directory in (out, reports):
        assert json.loads((directory / MANIFEST).read_text())["stage"] == "pretrain"
        assert oct(directory.stat().st_mode & 0o777) != oct(0o700)  # staged in mkdtemp, given mkdir's mode
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == ["pretrain"]  # no staging left


def test_base_onto_a_trained_model_is_refused_and_kept(tmp_path, tiny_adapter, capsys):
    from stages import base

    model_dir = tiny_adapter.parent / "base"
    trained = stage_dir(tmp_path / "models/adapter", "train")
    before = tree(trained)
    params = tmp_path / "base.yaml"
    params.write_text(yaml.safe_dump({"train": {"model": str(model_dir)}}), encoding="utf-8")
    line = one_error_line(capsys, base.main, ["--out", trained, "--params", params])
    assert line.startswith(f"error: {trained}: --out is the train stage's output")
    assert tree(trained) == before


def test_pretrain_out_as_a_symlink_is_refused(tmp_path, capsys):
    from stages import pretrain

    real = stage_dir(tmp_path / "real", "pretrain", names=("pretrain.json",))
    link = tmp_path / "models/pretrain"
    link.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    before = tree(real)
    line = one_error_line(capsys, pretrain.main, ["--base", tmp_path / "models/base", "--split-dir", tmp_path / "split",
                                                  "--out", link, "--reports", tmp_path / "reports",
                                                  "--params", passthrough_params(tmp_path)])
    assert line.startswith(f"error: {link}: --out is a symbolic link (to {real})")
    assert link.is_symlink() and tree(real) == before


def test_translate_output_onto_the_models_base_is_refused(tiny_adapter, tmp_path):
    base = tiny_adapter.parent / "base"
    before = tree(base)
    with pytest.raises(PipelineError, match=r"the output --output lies inside the input --model's base "):
        translate.main(["学而时习之。", "--output", str(base / "config.json"), "--model", str(tiny_adapter)])
    assert tree(base) == before


@pytest.mark.parametrize("stage", ["evaluate", "export"])
def test_evaluate_and_export_outputs_inside_the_models_base_are_refused(tiny_adapter, tmp_path, stage):
    import importlib

    base = tiny_adapter.parent / "base"
    before = tree(base)
    main = importlib.import_module(f"stages.{stage}").main
    test = tmp_path / "test.jsonl"
    test.write_text("")
    if stage == "evaluate":
        argv = ["--test", test, "--model", tiny_adapter, "--metrics", base / "metrics.json", "--out-dir", tmp_path / "e",
                "--hypotheses", tmp_path / "h.jsonl"]
    else:
        argv = ["--model", tiny_adapter, "--out", tmp_path / "export", "--report", base / "export.json"]
    with pytest.raises(PipelineError, match=r"lies inside the input --model's base "):
        main([str(a) for a in argv])
    assert tree(base) == before


# ----------------------------------------------------------------------------------------------
# translate's resume file: never followed, never an input, two runs never lose lines


def test_translate_replaces_a_planted_partial_link_and_never_writes_through_it(tiny_adapter, tmp_path, echo):
    victim, out = tmp_path / "victim.txt", tmp_path / "out.txt"
    victim.write_text("precious\n")
    (tmp_path / "out.txt.partial").symlink_to(victim)
    hard = tmp_path / "other.txt"
    hard.write_text("hard-linked\n")
    translate.main(["学而时习之。\n有朋自远方来。", "--output", str(out), "--model", str(tiny_adapter)])
    assert out.read_text(encoding="utf-8") == "译学而时习之。\n译有朋自远方来。\n"
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "out.txt", "victim.txt"]
    os.link(hard, tmp_path / "out.txt.partial")  # a hard link of another file under that name: replaced, not truncated
    translate.main(["学而时习之。", "--output", str(out), "--model", str(tiny_adapter)])
    assert hard.read_text() == "hard-linked\n" and out.read_text(encoding="utf-8") == "译学而时习之。\n"


@pytest.mark.parametrize("how", ["--input", "stdin"])
def test_translate_input_named_like_the_resume_file_is_refused_and_kept(tiny_adapter, tmp_path, echo, how, monkeypatch):
    src, out = tmp_path / "out.txt.partial", tmp_path / "out.txt"
    src.write_text("学而时习之。\n", encoding="utf-8")
    if how == "--input":
        argv = ["--input", str(src)]
    else:
        stdin = open(src, "rb")
        monkeypatch.setattr(sys, "stdin", type("In", (), {"buffer": stdin, "isatty": lambda self: False,
                                                          "fileno": lambda self: stdin.fileno()})())
        argv = []
    with pytest.raises(PipelineError, match=r"out.txt.partial"):
        translate.main([*argv, "--output", str(out), "--model", str(tiny_adapter)])
    assert src.read_text(encoding="utf-8") == "学而时习之。\n" and not out.exists()


def open_as_another_process(writer, monkeypatch, pid=4_000_000):
    """writer.open() as a concurrent process would (its temporary file named with another, live pid)."""
    with monkeypatch.context() as m:
        m.setattr(files.os, "getpid", lambda: pid)
        writer.open()


def test_two_translate_writers_to_one_output_each_leave_it_whole(tmp_path, monkeypatch):
    out = tmp_path / "out.txt"
    output = translate.Output(out)
    lines = [f"第{i}句" for i in range(6)]
    writers = [translate.Writer(output, {"run": 1}), translate.Writer(output, {"run": 1})]
    for w in writers:
        w.check("")
    writers[0].open()
    open_as_another_process(writers[1], monkeypatch)
    for i in range(0, 6, 2):  # interleaved, chunk by chunk
        for w in writers:
            w.write(lines[i:i + 2], lines[i:i + 2])
    assert writers[0].tmp != writers[1].tmp
    writers[0].finish()
    assert out.read_text(encoding="utf-8") == "".join(f"{x}\n" for x in lines)
    writers[1].finish()
    assert out.read_text(encoding="utf-8") == "".join(f"{x}\n" for x in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_translate_writer_interrupted_beside_another_run_keeps_both_whole(tmp_path, monkeypatch):
    out = tmp_path / "out.txt"
    a, b = translate.Writer(translate.Output(out), {"run": 1}), translate.Writer(translate.Output(out), {"run": 1})
    a.can_resume = True
    a.open()
    open_as_another_process(b, monkeypatch)
    for w in (a, b):
        w.write(["x1"], ["s1"])
    a.interrupted()  # a's lines stay resumable; b goes on and finishes whole
    b.write(["x2"], ["s2"])
    b.finish()
    assert out.read_text() == "x1\nx2\n"


# ----------------------------------------------------------------------------------------------
# Class 6: limits of the system are one line


def test_translate_with_stdin_closed_is_one_line(tiny_adapter):
    proc = subprocess.run(["bash", "-c", f'"{sys.executable}" -m tools.translate --model "{tiny_adapter}" <&-'],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: standard input is closed: give a sentence, or --input FILE"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["a" * 5000, "a/" * 2500])
def test_a_5000_character_model_path_is_one_line(tmp_path, name, capsys):
    line = one_error_line(capsys, translate.main, ["学而时习之。", "--model", name])
    assert "File name too long" in line and "characters)" in line and len(line) < 400


@pytest.mark.parametrize("stage", ["evaluate", "export"])
def test_a_5000_character_model_path_in_a_stage_is_one_line(tmp_path, stage):
    from conftest import jsonl_row

    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps(jsonl_row(), ensure_ascii=False) + "\n", encoding="utf-8")
    args = {"evaluate": ["--test", test, "--metrics", tmp_path / "m.json", "--out-dir", tmp_path / "e",
                         "--hypotheses", tmp_path / "h.jsonl", "--params", tmp_path / "p.yaml"],
            "export": ["--out", tmp_path / "x", "--report", tmp_path / "r.json", "--params", tmp_path / "p.yaml"]}[stage]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"evaluate": shipped("evaluate"), "export": shipped("export")}))
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--model", "m" * 5000, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "File name too long" in last and len(last) < 400


def deep_tree(root: Path, levels: int) -> Path:
    path = str(root)
    for _ in range(levels):
        path = os.path.join(path, "d")
        os.mkdir(path)
    Path(path, "source.txt").write_text("学而时习之。\n", encoding="utf-8")
    return Path(path)


def remove_deep(root: Path) -> None:
    """shutil.rmtree recurses, as pytest's cleanup would: remove the tree bottom-up in a loop."""
    bottom = str(root)
    while os.path.isdir(os.path.join(bottom, "d")):
        bottom = os.path.join(bottom, "d")
    for name in os.listdir(bottom):
        os.unlink(os.path.join(bottom, name))
    while bottom != str(root):
        os.rmdir(bottom)
        bottom = os.path.dirname(bottom)


def test_a_1100_level_directory_in_ingest_is_one_error(tmp_path, capsys):
    from stages import ingest

    corpus = tmp_path / "corp"
    corpus.mkdir()
    deep_tree(corpus, 1100)
    try:
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"ingest": {"sources": [{"path": str(corpus), "format": "niutrans"}],
                                                     "on_misaligned": "error"}}), encoding="utf-8")
        line = one_error_line(capsys, ingest.main, ["--out", tmp_path / "pairs.parquet", "--report", tmp_path / "r.json",
                                                    "--params", params])
        assert line.startswith(f"error: {corpus}: directories nest more than 64 levels deep") and len(line) < 400
        assert not (tmp_path / "pairs.parquet").exists()
    finally:
        remove_deep(corpus)


# ----------------------------------------------------------------------------------------------
# The dequantised base: the user's cache, never the current directory; two first runs at once


def fake_gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF not really")
    return path


def test_dequantised_base_is_read_from_models_base_but_never_written_there(tmp_path, monkeypatch):
    monkeypatch.setenv("WENYAN_MT_CACHE", str(tmp_path / "cache"))
    project = tmp_path / "project"
    (project / "stages").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(project)
    gguf = fake_gguf(tmp_path / "m.gguf")
    assert models.derived_cache() == tmp_path / "cache" / "base"
    with pytest.raises(PipelineError):  # not in models/base: would be dequantised into the cache (it is no GGUF)
        models.materialize(str(gguf))
    assert not (project / "models").exists()
    copy = project / "models/base/m"
    copy.mkdir(parents=True)
    (copy / "gguf_source.json").write_text(json.dumps(models.gguf_stamp(str(gguf))))
    assert models.materialize(str(gguf)) == "models/base/m"  # the base stage's copy, read as it is


def test_two_dequantisations_at_once_the_loser_uses_the_winners_copy(tmp_path):
    target = tmp_path / "cache" / "m"
    stamp = {"gguf": "m.gguf", "size": 1, "sha256": "0" * 64}
    tmps = [files.new_staging_dir(target) for _ in range(2)]
    assert tmps[0] != tmps[1] and all(t.is_dir() for t in tmps)  # one's own: neither removes the other's
    for n, tmp in enumerate(tmps):
        (tmp / "gguf_source.json").write_text(json.dumps(stamp))
        (tmp / "weights").write_text(f"run {n}")
    models._put_in_place(tmps[0], target, stamp)
    models._put_in_place(tmps[1], target, stamp)
    assert (target / "weights").read_text() == "run 0" and not tmps[1].exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]


def test_two_processes_dequantising_at_once_both_get_a_whole_copy(tmp_path):
    """Two processes race to put their copies in place: each ends with a whole target, no staging left."""
    script = f"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from wenyan import files, models
target = Path({str(tmp_path / 'cache' / 'm')!r})
stamp = {{"gguf": "m.gguf", "size": 1, "sha256": "0" * 64}}
tmp = files.new_staging_dir(target)
for i in range(50):
    (tmp / f"part{{i}}").write_text(sys.argv[1])
(tmp / "gguf_source.json").write_text(json.dumps(stamp))
time.sleep(0.2)
models._put_in_place(tmp, target, stamp)
print(sorted(p.name for p in target.iterdir()).__len__())
"""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)], stdout=subprocess.PIPE, text=True) for n in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["51", "51"]
    target = tmp_path / "cache" / "m"
    assert len({(target / f"part{i}").read_text() for i in range(50)}) == 1  # one run's files, not a mix
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]
