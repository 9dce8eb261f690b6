"""`python -m xtoken reproduce`: run notebooks 01-05 in order with papermill.

Scales:
  mini   the embedded default: real tokenizers, tiny models, synthetic task; ~25 min on 2 CPU cores.
         Executes the notebooks in place (notebooks/ and results/ are what the repo commits).
  smoke  every code path at toy sizes (< 5 min); writes to runs/smoke/ so committed results stay.
  paper  real checkpoints, a GPU, lm-eval's real tasks; writes to runs/paper/.
Each notebook gets only the parameters it declares (`scale`, `results_dir`, ...). The first failing
cell stops the run with the notebook and cell named; `--start 03` resumes from a notebook.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["01_projection_matrix", "02_numeral_audit", "03_distillation", "04_multi_teacher", "05_evaluation_tables"]


def _default_dirs(scale: str, out: str | None, results: str | None) -> tuple[Path, Path]:
    if scale == "mini":
        return Path(out or ROOT / "notebooks"), Path(results or ROOT / "results")
    base = ROOT / "runs" / scale
    return Path(out or base / "notebooks"), Path(results or base / "results")


def reproduce(scale: str = "mini", out: str | None = None, start: str | None = None,
              results: str | None = None, notebooks_dir: str | Path | None = None, work: str | None = None) -> int:
    import papermill as pm

    src = Path(notebooks_dir or ROOT / "notebooks")
    out_dir, results_dir = _default_dirs(scale, out, results)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in NOTEBOOKS if (src / f"{n}.ipynb").exists()]
    missing = [n for n in NOTEBOOKS if n not in names]
    if start:
        match = [i for i, n in enumerate(names) if n.startswith(start)]
        if not match:
            print(f"--start {start!r} names no notebook among {names}", file=sys.stderr)
            return 2
        names = names[match[0]:]
    if missing:
        print(f"note: not present, skipped: {', '.join(missing)}")
    total = time.perf_counter()
    for i, name in enumerate(names, 1):
        nb_in, nb_out = src / f"{name}.ipynb", out_dir / f"{name}.ipynb"
        declared = pm.inspect_notebook(str(nb_in))
        # executed in the output folder with paths relative to it, so an executed copy re-runs where it lies
        # (nbval re-executes the committed copies in their own folder)
        rel = lambda p: os.path.relpath(Path(p).resolve(), out_dir.resolve())  # noqa: E731
        offered = {"scale": scale, "results_dir": rel(results_dir), "work_dir": rel(work or ROOT / "runs" / scale)}
        params = {k: v for k, v in offered.items() if k in declared}
        print(f"[{i}/{len(names)}] {name} ({', '.join(f'{k}={v}' for k, v in params.items())}) ...", flush=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(nb_in), str(nb_out), parameters=params, cwd=str(out_dir),
                                kernel_name="python3", progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as err:
            print(f"FAILED in {name}.ipynb, cell {err.exec_count} ({err.ename}: {err.evalue})\n"
                  f"  executed copy with the traceback: {nb_out}\n"
                  f"  resume after fixing: python -m xtoken reproduce --scale {scale} --start {name[:2]}",
                  file=sys.stderr)
            return 1
        print(f"      done in {time.perf_counter() - t0:6.1f} s -> {nb_out}", flush=True)
    print(f"reproduce --scale {scale}: {len(names)} notebooks in {time.perf_counter() - total:.1f} s; results in {results_dir}")
    return 0
