"""Named profiles (tools/profile.py): validated, turned into `dvc exp run -S` flags that DVC reads back as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wenyan.errors import PipelineError
from tools.profile import command, read_profile

REPO = Path(__file__).resolve().parents[1]


def lookup(params, dotted: str):
    node = params
    for key in dotted.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


@pytest.mark.parametrize("path", sorted((REPO / "profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_names_existing_params_with_their_types(path):
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for key, value in read_profile(str(path)).items():
        current = lookup(params, key)  # KeyError = a key params.yaml does not have
        if value is not None and current is not None and not isinstance(current, str):
            assert isinstance(value, type(current)) or isinstance(current, (int, float)) and isinstance(value, (int, float)), key


@pytest.mark.bad_input
@pytest.mark.parametrize("text, message", [
    ("", "a mapping"),
    ("- a\n- b\n", "a mapping"),
    ("train epochs: 2\n", "not a params key"),
    ("format.user_template: \"a\\nb\"\n", "line break"),
    ("train: [\n", "not valid YAML"),
])
def test_bad_profiles_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PipelineError, match=message):
        read_profile(str(path))


@pytest.mark.bad_input
def test_unknown_profile_lists_the_known_ones(tmp_path):
    (tmp_path / "gpu.yaml").write_text("train.epochs: 2\n")
    with pytest.raises(PipelineError, match="profiles here: gpu"):
        read_profile("cpu", root=tmp_path)


def test_dvc_reads_the_overrides_back_as_written(tmp_path):
    """Chinese strings, lists, floats and null pass through DVC's override grammar unchanged."""
    profile = {"format.system_prompt": "你是翻译家。", "train.target_modules": ["q_proj", "k_proj"],
               "train.learning_rate": 0.0003, "train.chat_template": None, "train.extend_vocab": "auto"}
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump({
        "format": {"system_prompt": "长的。"},
        "train": {"target_modules": ["q_proj"], "learning_rate": 0.1, "chat_template": "chatml", "extend_vocab": "none"},
    }, allow_unicode=True), encoding="utf-8")
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: cp params.yaml out.yaml\n    params: [format, train]\n"
                                   "    outs: [out.yaml]\n")
    run = lambda *cmd: subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True)
    run("git", "init", "-q")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "0")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    cmd = command("gpu", profile, ["train.learning_rate=0.0005"])
    assert cmd[:5] == ["dvc", "exp", "run", "-n", "gpu"]
    run(sys.executable, "-m", "dvc", *cmd[1:])
    out = yaml.safe_load((repo / "out.yaml").read_text(encoding="utf-8"))
    for key, value in {**profile, "train.learning_rate": 0.0005}.items():
        assert lookup(out, key) == value, key


def documented_extra_flags(path: Path) -> list[str]:
    """The -S flags after the profile's name in its `#   python -m tools.profile NAME ...` comment line."""
    import shlex

    lines = [line[1:].strip() for line in path.read_text(encoding="utf-8").splitlines()
             if line.startswith("#") and f"python -m tools.profile {path.stem}" in line]
    assert lines, f"{path.name}: no `python -m tools.profile {path.stem}` line in its comments"
    words = shlex.split(lines[0])
    return [words[i + 1] for i, word in enumerate(words) if word == "-S"]


def test_smollm2_profile_pretrains_on_the_clones_classical_text(tmp_path, monkeypatch):
    """profiles/gpu-smollm2.yaml with the flags its comment gives leaves one pretrain source, the upstream clone's
    古文原文/ folder (no data/mono archive a user cannot get), and the pretrain reader reads such a directory."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` applies to params.yaml

    from stages.pretrain import check_sources
    from tools.profile import override
    from wenyan import monolingual

    path = REPO / "profiles" / "gpu-smollm2.yaml"
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    flags = [override(k, v) for k, v in read_profile(str(path)).items()] + documented_extra_flags(path)
    apply_overrides(tmp_path / "params.yaml", flags)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text(encoding="utf-8"))
    assert params["pretrain"]["enabled"] is True
    assert params["pretrain"]["sources"] == {"classical-mono-a": {"path": "data/Classical-Modern/古文原文",
                                                                  "format": "niutrans"}}
    # a tiny clone: 古文原文/<book>/.../<chapter>/text.txt beside the parallel 双语数据/ (never read here)
    clone = tmp_path / "data" / "Classical-Modern"
    chapters = {"古文原文/论语/学而篇/text.txt": "学而时习之，不亦说乎？\n有朋自远方来，不亦乐乎？\n",
                "古文原文/史记/本纪/五帝本纪/text.txt": "黄帝者，少典之子。\n\n",
                "双语数据/论语/学而篇/source.txt": "学而时习之，不亦说乎？\n"}
    for rel, body in chapters.items():
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        (clone / rel).write_text(body, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # the profile's path is relative to the repository, as DVC runs the stage
    [src] = check_sources({"sources": params["pretrain"]["sources"]})
    docs = monolingual.read_source(src, monolingual.Stats())
    assert docs == [("史记/本纪/五帝本纪", ["黄帝者，少典之子。"]),
                    ("论语/学而篇", ["学而时习之，不亦说乎？", "有朋自远方来，不亦乐乎？"])]
