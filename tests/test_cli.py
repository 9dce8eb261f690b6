"""`python -m xtoken`: output folders made before the work, argument checks before tokenizers load, one-line
errors (exit 2) unless --traceback, reproduce's -p NAME=VALUE parameters and its --on-policy flag."""

import json
import subprocess
import sys

import nbformat
import pandas as pd
import pytest
from test_pipeline import _write_notebook

from xtoken import TokenizerNotFound
from xtoken.__main__ import main
from xtoken.pipeline import NOTEBOOKS, ON_POLICY


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("XTOKEN_TRACEBACK", raising=False)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two small byte-level BPE tokenizers trained here and saved as tokenizer folders (W builds in < 1 s);
    the teacher splits digits one by one, as Qwen3 does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folders = []
    for name, vocab_size, split_digits in (("student", 300, False), ("teacher", 290, True)):
        tk = Tokenizer(models.BPE())
        digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
        tk.pre_tokenizer = pre_tokenizers.Sequence(digits + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|end|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tk.train_from_iterator(["the cat sat on the mat with 12 apples and 345 pears"] * 20, trainer)
        folder = tmp_path_factory.mktemp(name)
        PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>").save_pretrained(folder)
        folders.append(str(folder))
    return folders


def _one_line_error(capsys, start):
    err = capsys.readouterr().err
    assert err.startswith(f"error: {start}"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_summary_and_csv_go_into_folders_that_do_not_exist_yet(tiny_pair, tmp_path, capsys):
    student, teacher = tiny_pair
    w, summary = tmp_path / "a" / "w.safetensors", tmp_path / "b" / "c" / "summary.json"
    assert main(["build-w", "--student", student, "--teacher", teacher, "-o", str(w), "--summary", str(summary)]) == 0
    assert json.loads(summary.read_text())["file"] == str(w) and w.exists()
    table = tmp_path / "d" / "e" / "audit.csv"
    assert main(["audit", "--student", student, "--teacher", teacher, "--csv", str(table)]) == 0
    assert set(pd.read_csv(table).category) >= {"single_digit", "numeral_2digit", "word"}


def test_an_output_that_is_a_folder_is_refused_before_the_work(tiny_pair, tmp_path, capsys):
    student, teacher = tiny_pair
    (tmp_path / "summary.json").mkdir()
    code = main(
        [
            "build-w",
            "--student",
            student,
            "--teacher",
            teacher,
            "-o",
            str(tmp_path / "w.safetensors"),
            "--summary",
            str(tmp_path / "summary.json"),
        ]
    )
    assert code == 2
    _one_line_error(capsys, f"--summary {tmp_path / 'summary.json'} is a folder")
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--top-k", "0"),
        ("--max-span", "0"),
        ("--beta", "0"),
        ("--beta", "-1"),
        ("--gamma", "0"),
        ("--gamma", "1"),
        ("--gamma", "1.5"),
    ],
)
def test_build_w_arguments_are_checked_before_tokenizers_load(flag, value, tmp_path, capsys):
    # the student does not exist: were it loaded first, the error would be about it
    code = main(
        [
            "build-w",
            "--student",
            str(tmp_path / "nowhere"),
            "--teacher",
            "qwen3",
            "-o",
            str(tmp_path / "w.safetensors"),
            flag,
            value,
        ]
    )
    assert code == 2
    _one_line_error(capsys, flag)


def test_an_empty_folder_as_tokenizer_is_a_one_line_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["build-w", "--student", str(empty), "--teacher", "qwen3", "-o", str(tmp_path / "w.safetensors")]) == 2
    _one_line_error(capsys, f"no tokenizer files in {empty}")
    assert main(["audit", "--student", str(empty), "--teacher", "qwen3"]) == 2
    _one_line_error(capsys, f"no tokenizer files in {empty}")


def test_unknown_tokenizer_error_names_the_fixes_without_a_traceback(capsys):
    assert main(["audit", "--student", "no-such-org/no-such-model", "--teacher", "qwen3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No tokenizer 'no-such-org/no-such-model'") and "Traceback" not in err
    assert "huggingface-cli download" in err


def test_traceback_flag_and_variable_reraise(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["build-w", "--student", str(empty), "--teacher", "qwen3", "-o", str(tmp_path / "w.safetensors")]
    with pytest.raises(TokenizerNotFound, match="no tokenizer files"):
        main(["--traceback"] + args)
    with pytest.raises(TokenizerNotFound, match="no tokenizer files"):
        main(args + ["--traceback"])
    monkeypatch.setenv("XTOKEN_TRACEBACK", "1")
    with pytest.raises(TokenizerNotFound, match="no tokenizer files"):
        main(args)


def test_module_entry_point_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "xtoken",
            "build-w",
            "--student",
            "llama",
            "--teacher",
            "qwen3",
            "-o",
            str(tmp_path / "w.safetensors"),
            "--top-k",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: --top-k") and "Traceback" not in done.stderr


def _parameters_notebook(folder):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell(
            "results_dir = '.'\nsteps = 1\nlr = 0.1\nnames = []\nlabel = 'x'", metadata={"tags": ["parameters"]}
        ),
        nbformat.v4.new_code_cell(
            "import json, pathlib\npathlib.Path(results_dir, 'seen.json')"
            ".write_text(json.dumps([steps, lr, names, label]))"
        ),
    ]
    folder.mkdir()
    nbformat.write(nb, folder / "01_projection_matrix.ipynb")
    return folder


def test_reproduce_parameters_are_parsed_as_yaml(tmp_path, capsys):
    src = _parameters_notebook(tmp_path / "src")
    code = main(
        [
            "reproduce",
            "--scale",
            "smoke",
            "--notebooks",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--results",
            str(tmp_path / "r"),
            "--work",
            str(tmp_path / "w"),
            "-p",
            "steps=3",
            "--parameter",
            "lr=1e-3",
            "-p",
            "names=[a, b]",
            "-p",
            "label=12 apples",
        ]
    )
    assert code == 0, capsys.readouterr()
    assert json.loads((tmp_path / "r" / "seen.json").read_text()) == [3, 0.001, ["a", "b"], "12 apples"]


def test_reproduce_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "-p", "no-equals-sign"])
    assert exit_.value.code == 2 and "NAME=VALUE" in capsys.readouterr().err
    src = _parameters_notebook(tmp_path / "src")
    assert main(["reproduce", "--notebooks", str(src), "--out", str(tmp_path / "out"), "-p", "scale=paper"]) == 2
    _one_line_error(capsys, "parameter(s) scale are set by --scale")
    missing = tmp_path / "missing"
    assert main(["reproduce", "--notebooks", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert f"no reproduction notebooks in {missing}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_reproduce_on_policy_adds_notebook_06(tmp_path, capsys):
    """`reproduce --on-policy` through the command line (the flag reaches `xtoken.pipeline.reproduce`): tiny
    notebooks named like the real ones, each leaving a marker in the results folder. Without the flag 01-05 run
    and 06 does not; with it and --start 06, 06 runs alone; --start 06 without it is refused (exit 2) with a hint
    naming the flag, before any folder is made; a failure in 06 names the resume command with the flag."""
    src = tmp_path / "src"
    for name in NOTEBOOKS:
        _write_notebook(src / f"{name}.ipynb", f"import pathlib\npathlib.Path(results_dir, {name!r}).touch()")
    _write_notebook(
        src / f"{ON_POLICY}.ipynb",
        f"import pathlib\npathlib.Path(results_dir, {ON_POLICY!r}).touch()",
        "if failing:\n    raise ValueError('boom')",
        params="results_dir = '.'\nfailing = False",
    )

    def run(results, *flags):
        folders = ["--out", str(tmp_path / "out"), "--results", str(tmp_path / results), "--work", str(tmp_path / "w")]
        return main(["reproduce", "--scale", "smoke", "--notebooks", str(src), *folders, *flags])

    def ran(results):
        return sorted(p.name for p in (tmp_path / results).iterdir())

    assert run("r1") == 0, capsys.readouterr()
    assert ran("r1") == NOTEBOOKS
    assert ON_POLICY not in capsys.readouterr().out
    assert run("r2", "--on-policy", "--start", "06") == 0, capsys.readouterr()
    assert ran("r2") == [ON_POLICY]
    assert "[1/1] 06_on_policy" in capsys.readouterr().out
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run("r3", "--start", "06") == 2
    err = capsys.readouterr().err
    assert "--start '06' names no notebook" in err and "(notebook 06 runs with --on-policy)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made
    assert run("r4", "--on-policy", "--start", "06", "-p", "failing=true") == 1
    err = capsys.readouterr().err
    assert "FAILED in 06_on_policy.ipynb" in err and "--start 06 --on-policy" in err
    assert ran("r4") == [ON_POLICY]
