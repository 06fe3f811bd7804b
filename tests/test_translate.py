"""translate: sentence splitting, one output line per input line, the training prompt, prompt-length
limits (split at ，、 or a clear error, never truncation), and real runs on a tiny model built here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from wenyan import models
from tools import translate
from wenyan.errors import PipelineError, run_main
from wenyan.prompt import build_messages
from conftest import BASE_PARAMS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny tensors gain nothing from threads

# Two lines, every sentence end (。！？；), a closing quote after a question mark, and an empty line between.
PASSAGE = "子曰：“学而时习之，不亦说乎？”有朋自远方来；不亦乐乎！\n\n人不知而不愠，不亦君子乎。"
PASSAGE_SENTENCES = [["子曰：“学而时习之，不亦说乎？”", "有朋自远方来；", "不亦乐乎！"], [], ["人不知而不愠，不亦君子乎。"]]


# ----------------------------------------------------------------------------------------------
# Pure functions


def test_split_sentences_keeps_punctuation_and_closing_quotes():
    line = PASSAGE.split("\n")[0]
    assert translate.split_sentences(line) == PASSAGE_SENTENCES[0]
    assert translate.split_sentences("何也？！善。余") == ["何也？！", "善。", "余"]
    assert translate.split_sentences("。开头") == ["。", "开头"]
    assert translate.split_sentences("") == []
    for text in (line, "何也？！善。余", "；；甲；", "无标点"):
        assert "".join(translate.split_sentences(text)) == text


@pytest.mark.bad_input
def test_fit_sentence_splits_at_commas_then_errors_naming_the_line():
    fits = lambda s: len(s) <= 8  # noqa: E731  (a prompt budget of 8 characters)
    sentence = "一二三，四五六、七八九，十一二三四。"
    pieces = translate.fit_sentence(sentence, fits, "input line 1", "8")
    assert "".join(pieces) == sentence and all(fits(p) for p in pieces)
    assert pieces == ["一二三，四五六、", "七八九，", "十一二三四。"]
    assert translate.fit_sentence("短句。", fits, "x", "8") == ["短句。"]
    with pytest.raises(PipelineError, match=r"input line 3: the clause '一二三四五六七八九十，'.*too long"):
        translate.plan_lines(["好。", "", "甲，一二三四五六七八九十，乙。"], fits, "8")


def test_split_input_lines_counts_like_wc():
    assert translate.split_input_lines("a\nb\n") == ["a", "b"]
    assert translate.split_input_lines("a\r\n\nb") == ["a", "", "b"]
    assert translate.split_input_lines("") == []
    assert translate.assemble([["a", "b"], [], ["c"]], ["A", "B", "C"]) == ["AB", "", "C"]


def test_context_sentences_as_in_training_and_dropped_oldest_first_when_too_long():
    fmt = {"system_prompt": "", "user_template": "{classical}", "context_sentences": 2, "context_template": "上文：{context}\n"}
    chars = lambda messages: sum(len(m["content"]) for m in messages)  # noqa: E731  (a token = a character)
    prompts = translate.build_prompts(["甲。", "乙。", "丙。", "丁丁丁丁丁丁。"], fmt, chars, max_tokens=12)
    assert prompts[0] == build_messages("甲。", "", [], fmt)[:-1]
    assert prompts[2] == build_messages("丙。", "", ["甲。", "乙。"], fmt)[:-1]  # the N previous sentences
    assert prompts[3] == build_messages("丁丁丁丁丁丁。", "", [], fmt)[:-1]  # 上文：乙。丙。\n + 7 > 12: both dropped
    assert prompts[1][0]["content"] == "上文：甲。\n乙。"


# ----------------------------------------------------------------------------------------------
# The command, with generation replaced by an echo: alignment and the exact training prompt


def test_file_and_stdin_output_aligned_with_input(tiny_adapter, tmp_path, echo_generate, monkeypatch, capsys):
    src = tmp_path / "in.txt"
    src.write_text(PASSAGE + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    translate.main(["--input", str(src), "--output", str(out), "--model", str(tiny_adapter)])
    expected = ["".join("译" + s for s in sentences) for sentences in PASSAGE_SENTENCES]
    assert out.read_text(encoding="utf-8").split("\n") == [*expected, ""]  # 3 lines in, 3 lines out
    assert not list(tmp_path.glob(".out.txt.*"))  # written atomically: no temporary file left

    # the prompts are the training prompts of stages/format.py (system prompt + user template)
    fmt = {"system_prompt": "你是翻译家。", "user_template": "翻译：\n{classical}", "context_sentences": 0,
           "context_template": "上文：{context}\n"}
    call = echo_generate[-1]
    assert call["sources"] == [s for sentences in PASSAGE_SENTENCES for s in sentences]
    assert call["prompts"] == [build_messages(s, "", [], fmt)[:-1] for s in call["sources"]]

    # standard input (no trailing newline), output on stdout
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(PASSAGE.encode("utf-8")), encoding="utf-8"))
    translate.main(["--model", str(tiny_adapter)])
    assert capsys.readouterr().out.split("\n") == [*expected, ""]

    # a sentence as the argument; traditional characters go through clean.opencc (t2s) as in training
    translate.main(["學而時習之。", "--model", str(tiny_adapter)])
    assert capsys.readouterr().out == "译学而时习之。\n"


def test_prompt_comes_from_the_model_not_from_an_edited_params_yaml(tiny_adapter, write_params, tmp_path,
                                                                   echo_generate, monkeypatch, capsys):
    """params.yaml's format: section edited after training (and clean.opencc): translate's prompt and
    conversion stay the ones the model was trained with (training_config.json `prompt`)."""
    write_params(tmp_path / "params.yaml", format={"system_prompt": "别的提示。", "user_template": "译：{classical}"},
                 clean={"opencc": "s2t"})
    monkeypatch.chdir(tmp_path)
    translate.main(["學而時習之。", "--model", str(tiny_adapter)])
    assert capsys.readouterr().out == "译学而时习之。\n"  # t2s as trained, not s2t
    assert echo_generate[-1]["prompts"] == [build_messages("学而时习之。", None, [], BASE_PARAMS["format"])]


@pytest.mark.bad_input
def test_too_long_sentence_is_split_at_commas_or_a_clear_error(tiny_adapter, tmp_path, echo_generate):
    tokenizer = models.load_trained(tiny_adapter, model=False).tokenizer
    fmt = {"system_prompt": "你是翻译家。", "user_template": "翻译：\n{classical}", "context_sentences": 0,
           "context_template": ""}

    def prompt_tokens(text):
        rendered = tokenizer.apply_chat_template(build_messages(text, "", [], fmt)[:-1], add_generation_prompt=True, tokenize=False)
        return len(tokenizer(rendered, add_special_tokens=False).input_ids)

    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_adapter.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    limit = prompt_tokens("一二三四五六七八，")  # nine characters fit, no more
    cfg = json.loads((model / "training_config.json").read_text())
    (model / "training_config.json").write_text(json.dumps({**cfg, "max_seq_length": limit}))

    long_line = "一二三四五六七八，一二三四五六七八、一二三四五六七八。"
    out = tmp_path / "out.txt"
    translate.main([f"短句。\n{long_line}", "--model", str(model), "--output", str(out)])
    sources = echo_generate[-1]["sources"]
    assert sources == ["短句。", "一二三四五六七八，", "一二三四五六七八、", "一二三四五六七八。"]
    assert all(prompt_tokens(s) <= limit for s in sources)
    assert out.read_text(encoding="utf-8") == "译短句。\n" + "".join("译" + s for s in sources[1:]) + "\n"

    with pytest.raises(PipelineError, match=r"argument line 2: the clause .* too long .* max_seq_length %d" % limit):
        translate.main(["短句。\n一二三四五六七八九十。", "--model", str(model)])


@pytest.mark.bad_input
def test_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(translate.main, ["学而时习之。", "--model", str(tmp_path / "nope")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "nope: model directory not found" in err and "dvc repro train" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="training_config.json: not found"):
        translate.main(["学而时习之。", "--model", str(tmp_path / "empty")])


# ----------------------------------------------------------------------------------------------
# Real generation with the tiny model (its translations are noise; the plumbing is what is tested)


def test_tiny_model_file_mode(tiny_adapter, tmp_path):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text(PASSAGE + "\n", encoding="utf-8")
    translate.main(["-i", str(src), "-o", str(out), "--model", str(tiny_adapter),
                    "--max-new-tokens-factor", "0.1", "--batch-size", "2"])
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 and lines[-1] == ""  # three lines and the final newline
    assert lines[1] == ""  # the empty line stays empty (the others hold the tiny model's noise, maybe nothing)


def test_tiny_model_stdin_command(tiny_adapter):
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tools.translate", "--model", str(tiny_adapter),
         "--max-new-tokens-factor", "0.1"],
        input=PASSAGE.encode("utf-8"), capture_output=True, env=env, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout.decode("utf-8").split("\n")) == 4  # 3 lines out for 3 lines in
    assert "translate: 100%" in proc.stderr.decode()  # tqdm's bar, on stderr
