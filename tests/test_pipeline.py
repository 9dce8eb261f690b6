"""`reproduce --scale smoke` runs notebooks 03-05 end to end with papermill (every code path of the
miniature: corpus, three teachers, base student, caches, GOLD / P-KL / H-KL / KL students, multi-teacher
weights, lm-eval, tables, REPORT.md) and a failing notebook is named."""
import json
from pathlib import Path

import nbformat
import pytest

from conftest import NBVAL_SMOKE_WORK
from xtoken.pipeline import NOTEBOOKS, reproduce

REPO = Path(__file__).resolve().parents[1]
SMOKE_COPIES = REPO / "tests" / "nbval_smoke"


@pytest.mark.slow
def test_smoke_reproduction_of_notebooks_03_to_05(tmp_path):
    # the work dir of the nbval smoke copies: after them in a `make test` session the grid's runs are read
    # back (the training itself is checked by nbval against tests/nbval_smoke); alone, this trains them
    out, results, work = tmp_path / "nb", tmp_path / "results", NBVAL_SMOKE_WORK / "work"
    assert reproduce(scale="smoke", start="03", out=str(out), results=str(results), work=str(work)) == 0
    for name in ("03_smoke_table.csv", "03_smoke_runs.csv", "03_smoke_numeral_mass.png", "04_smoke_table.csv",
                 "04_smoke_results.json", "REPORT.md"):
        assert (results / name).exists(), name
    runs = json.loads((results / "03_smoke_results.json").read_text())["runs"]
    assert {r["setting"] for r in runs} >= {"ce_only", "kd_llama", "gold_qwen3", "pkl_qwen3", "pkl_learned_qwen3",
                                             "hkl_phi"}
    learned = json.loads((results / "03_smoke_learned_w.json").read_text())
    assert learned["summary"] and learned["summary"][0]["trainable rows"] > 0 and learned["top_rows"]
    assert {r["metric"] for r in learned["comparison"]} >= {"arithmetic", "knowledge", "numeral_mass"}
    assert all(0 <= r["arithmetic"] <= 1 for r in runs)
    assert "Single-teacher distillation" in (results / "REPORT.md").read_text()


def test_failing_notebook_is_named(tmp_path, capsys):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("results_dir = '.'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("raise ValueError('boom')")]
    src = tmp_path / "src"
    src.mkdir()
    nbformat.write(nb, src / "01_projection_matrix.ipynb")
    code = reproduce(scale="smoke", out=str(tmp_path / "out"), results=str(tmp_path / "r"), notebooks_dir=src)
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED in 01_projection_matrix.ipynb" in err and "ValueError: boom" in err and "--start 01" in err


@pytest.mark.parametrize("name", NOTEBOOKS[2:])
def test_nbval_smoke_copies_are_current(name):
    """tests/nbval_smoke holds notebooks 03-05 executed with the smoke parameters (`make nbval-refs`); nbval
    compares their outputs in CI. They must be the current notebooks: same cells apart from papermill's
    injected parameters, which must say scale = "smoke"."""
    src = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", 4)
    copy = nbformat.read(SMOKE_COPIES / f"{name}.ipynb", 4)
    strip = lambda nb: [(c.cell_type, c.source) for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]  # noqa: E731
    assert strip(copy) == strip(src), f"run `make nbval-refs`: tests/nbval_smoke/{name}.ipynb is stale"
    injected = [c.source for c in copy.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and 'scale = "smoke"' in injected[0]
