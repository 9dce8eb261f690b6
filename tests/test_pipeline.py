"""`reproduce --scale smoke` runs notebooks 03-05 end to end with papermill (every code path of the
miniature: corpus, three teachers, base student, caches, GOLD / P-KL / H-KL / KL students, multi-teacher
weights, lm-eval, tables, REPORT.md) and a failing notebook is named."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from conftest import NBVAL_SMOKE_WORK

from xtoken.pipeline import NOTEBOOKS, ON_POLICY, reproduce

REPO = Path(__file__).resolve().parents[1]
SMOKE_COPIES = REPO / "tests" / "nbval_smoke"


@pytest.mark.slow
def test_smoke_reproduction_of_notebooks_03_to_05(tmp_path):
    # the work dir of the nbval smoke copies: after them in a `make test` session the grid's runs are read
    # back (the training itself is checked by nbval against tests/nbval_smoke); alone, this trains them
    out, results, work = tmp_path / "nb", tmp_path / "results", NBVAL_SMOKE_WORK / "work"
    assert reproduce(scale="smoke", start="03", out=str(out), results=str(results), work=str(work)) == 0
    for name in (
        "03_smoke_table.csv",
        "03_smoke_runs.csv",
        "03_smoke_numeral_mass.png",
        "04_smoke_table.csv",
        "04_smoke_results.json",
        "REPORT.md",
    ):
        assert (results / name).exists(), name
    runs = json.loads((results / "03_smoke_results.json").read_text())["runs"]
    assert {r["setting"] for r in runs} >= {
        "ce_only",
        "kd_llama",
        "gold_qwen3",
        "pkl_qwen3",
        "pkl_learned_qwen3",
        "hkl_phi",
    }
    learned = json.loads((results / "03_smoke_learned_w.json").read_text())
    assert learned["summary"] and learned["summary"][0]["trainable rows"] > 0 and learned["top_rows"]
    assert {r["metric"] for r in learned["comparison"]} >= {"arithmetic", "knowledge", "numeral_mass"}
    assert all(0 <= r["arithmetic"] <= 1 for r in runs)
    assert "Single-teacher distillation" in (results / "REPORT.md").read_text()
    raw = json.loads((work / "runs" / "ce_only" / "seed0" / "lm_eval_results.json").read_text())  # kept per run
    assert set(raw["results"]) == {"xtoken_mini_arithmetic", "xtoken_mini_knowledge"} and "samples" not in raw


def _write_notebook(path, *cells, params="results_dir = '.'"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]})]
    nb.cells += [
        nbformat.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbformat.v4.new_code_cell(c) for c in cells
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_failing_notebook_is_named_and_the_committed_copy_stays(tmp_path, capsys):
    src = tmp_path / "src"
    committed = _write_notebook(src / "01_projection_matrix.ipynb", "raise ValueError('boom')")
    before = committed.read_bytes()
    # executed in place, as the mini scale does with notebooks/
    code = reproduce(
        scale="smoke", out=str(src), results=str(tmp_path / "r"), work=str(tmp_path / "w"), notebooks_dir=src
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED in 01_projection_matrix.ipynb" in err and "ValueError: boom" in err and "--start 01" in err
    assert committed.read_bytes() == before
    assert sorted(p.name for p in src.iterdir()) == ["01_projection_matrix.ipynb"]
    failed = tmp_path / "w" / "failed" / "01_projection_matrix.ipynb"
    assert str(failed) in err
    outputs = [o for c in nbformat.read(failed, 4).cells for o in c.get("outputs", [])]
    assert any(o.get("ename") == "ValueError" and o.get("evalue") == "boom" for o in outputs)


def test_executed_copy_replaces_the_committed_one_only_when_finished(tmp_path, capsys, monkeypatch):
    import xtoken.pipeline as pipeline

    monkeypatch.setattr(pipeline, "HEARTBEAT_S", 0.4)
    src = tmp_path / "src"
    target = _write_notebook(
        src / "01_projection_matrix.ipynb",
        "md:# a title",
        # while the notebook runs, the committed copy (this notebook, in the working folder) is untouched
        "import json\nnb = json.load(open('01_projection_matrix.ipynb'))\n"
        "assert not any('injected-parameters' in c['metadata'].get('tags', []) for c in nb['cells'])",
        "import time\ntime.sleep(1.5)",
        "print('finished')",
    )
    code = reproduce(
        scale="smoke", out=str(src), results=str(tmp_path / "r"), work=str(tmp_path / "w"), notebooks_dir=src
    )
    out = capsys.readouterr().out
    assert code == 0, out
    executed = nbformat.read(target, 4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    assert executed.cells[-1].outputs[0]["text"] == "finished\n"
    assert sorted(p.name for p in src.iterdir()) == ["01_projection_matrix.ipynb"]  # no temporary left
    # progress while it runs: one line per code cell (4 of them with the injected parameters) and a
    # heartbeat during the long one
    for i in range(1, 5):
        assert f"cell {i}/5 " in out, out
    assert "cell 4/5 running" in out, out
    assert "cell 5/5 done" in out, out


def test_interrupted_run_leaves_the_committed_copy(tmp_path):
    src = tmp_path / "src"
    committed = _write_notebook(
        src / "01_projection_matrix.ipynb", "import pathlib, time\npathlib.Path('started').touch()\ntime.sleep(120)"
    )
    before = committed.read_bytes()
    code = (
        f"import sys; from xtoken.pipeline import reproduce; sys.exit(reproduce(scale='smoke', out={str(src)!r}, "
        f"results={str(tmp_path / 'r')!r}, work={str(tmp_path / 'w')!r}, notebooks_dir={str(src)!r}))"
    )
    # Ctrl-C as a terminal delivers it: a runner started in the background by a shell without job control (as
    # `make test &` is) inherits SIGINT ignored, and a Python child keeps it ignored, so reset it in the child
    run = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not (src / "started").exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (src / "started").exists(), run.communicate()
        run.send_signal(signal.SIGINT)  # Ctrl-C while a cell runs
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode != 0
    assert committed.read_bytes() == before
    assert sorted(p.name for p in src.iterdir()) == ["01_projection_matrix.ipynb", "started"]
    failed = tmp_path / "w" / "failed" / "01_projection_matrix.ipynb"
    assert failed.exists() and str(failed) in err


def test_missing_notebooks_fail_before_any_folder_is_made(tmp_path, capsys):
    for src in (tmp_path / "missing", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        code = reproduce(
            scale="smoke",
            out=str(tmp_path / "out"),
            results=str(tmp_path / "r"),
            work=str(tmp_path / "w"),
            notebooks_dir=src,
        )
        assert code != 0
        err = capsys.readouterr().err
        assert f"no reproduction notebooks in {src}" in err and "clone" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_extra_parameters_reach_the_notebooks_that_declare_them(tmp_path, capsys):
    src = tmp_path / "src"
    _write_notebook(
        src / "01_projection_matrix.ipynb",
        "import json, pathlib\npathlib.Path(results_dir, 'seen.json').write_text(json.dumps([steps, label]))",
        params="results_dir = '.'\nsteps = 1\nlabel = 'default'",
    )
    _write_notebook(src / "02_numeral_audit.ipynb", "assert 'steps' not in globals()")
    code = reproduce(
        scale="smoke",
        out=str(tmp_path / "out"),
        results=str(tmp_path / "r"),
        work=str(tmp_path / "w"),
        notebooks_dir=src,
        parameters={"steps": 3, "label": "abc", "nowhere": 1},
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert json.loads((tmp_path / "r" / "seen.json").read_text()) == [3, "abc"]
    assert "nowhere" in out and "declared by none" in out
    with pytest.raises(ValueError, match="--results"):
        reproduce(scale="smoke", out=str(tmp_path / "o2"), notebooks_dir=src, parameters={"results_dir": "x"})
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize(
    "name,copies,scale",
    [(n, SMOKE_COPIES, "smoke") for n in NOTEBOOKS[2:] + [ON_POLICY]]
    + [(n, REPO / "tests" / "nbval_paper_smoke", "paper") for n in NOTEBOOKS[2:] + [ON_POLICY]],
)
def test_nbval_smoke_copies_are_current(name, copies, scale):
    """tests/nbval_smoke holds notebooks 03-06 executed with the smoke parameters and tests/nbval_paper_smoke
    notebooks 03-06 at paper scale on the stand-ins (`make nbval-refs`); nbval compares their outputs in CI. They
    must be the current notebooks: same cells apart from papermill's injected parameters, which must name their
    scale."""
    src = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", 4)
    copy = nbformat.read(copies / f"{name}.ipynb", 4)
    strip = lambda nb: [
        (c.cell_type, c.source) for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])
    ]  # noqa: E731
    assert strip(copy) == strip(src), f"run `make nbval-refs`: {copies.name}/{name}.ipynb is stale"
    injected = [c.source for c in copy.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and f'scale = "{scale}"' in injected[0]
