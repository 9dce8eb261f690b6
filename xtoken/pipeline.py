"""`python -m xtoken reproduce`: run notebooks 01-05 in order with papermill (``--on-policy``: then 06).

Scales:
  mini   the embedded default: real tokenizers, tiny models, synthetic task; ~25 min on 2 CPU cores.
         Its executed notebooks replace the committed ones in notebooks/ (with results/, what the repo commits).
  smoke  every code path at toy sizes (< 5 min); writes to runs/smoke/ so committed results stay.
  paper  real checkpoints, a GPU, lm-eval's real tasks; writes to runs/paper/.
Each notebook gets only the parameters it declares (`scale`, `results_dir`, ... and those passed with
`-p NAME=VALUE`). A notebook executes into a temporary file next to its target, which it replaces (an atomic
rename) only once every cell has run: an interrupted or failing run leaves the previous copy as it was and
keeps the failed executed copy under <work>/failed/. The console gets one line per cell and a heartbeat
during long cells. The first failing cell stops the run with the notebook and cell named; `--start 03`
resumes from a notebook. The notebooks live in a clone of the repository, not in an installed package.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["01_projection_matrix", "02_numeral_audit", "03_distillation", "04_multi_teacher", "05_evaluation_tables"]
# Beyond the paper, with its own time budget (docs/miniature.md): run after the notebooks above, on their workspace;
# it adds its section to results/REPORT.md itself. `make on-policy` runs it alone, `make smoke` runs it last.
ON_POLICY = "06_on_policy"
HEARTBEAT_S = 30.0  # while a cell runs longer than this, a line says so every HEARTBEAT_S seconds
_ENGINE = "xtoken-progress"


def _default_dirs(scale: str, out: str | None, results: str | None) -> tuple[Path, Path]:
    if scale == "mini":
        return Path(out or ROOT / "notebooks"), Path(results or ROOT / "results")
    base = ROOT / "runs" / scale
    return Path(out or base / "notebooks"), Path(results or base / "results")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


class _Progress:
    """Prints `cell i/n done 4.2 s` after each code cell and `cell i/n running 1:30` every HEARTBEAT_S
    seconds while one runs: plain lines (no carriage returns), readable live and in CI logs."""

    def __init__(self, nb, heartbeat_s: float):
        code = [i for i, c in enumerate(nb.cells) if c.get("cell_type") == "code"]
        self.number = {index: n for n, index in enumerate(code, 1)}
        self.total = len(code)
        self.heartbeat_s = heartbeat_s
        self.t_notebook = time.perf_counter()
        self.current: tuple[int, float, str] | None = None  # (number, start, first line)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    @staticmethod
    def _first_line(cell) -> str:
        lines = [ln.strip() for ln in cell.get("source", "").splitlines()]
        line = next((ln for ln in lines if ln and not ln.startswith("#")), "")
        return line if len(line) <= 60 else line[:57] + "..."

    def _print(self, text: str) -> None:
        print(f"      {text}", flush=True)

    def cell_start(self, cell, index) -> None:
        if index in self.number:
            with self.lock:
                self.current = (self.number[index], time.perf_counter(), self._first_line(cell))

    def cell_complete(self, cell, index) -> None:
        if index not in self.number:
            return
        with self.lock:
            number, t0, line = self.current or (self.number[index], time.perf_counter(), "")
            self.current = None
        if cell.get("metadata", {}).get("papermill", {}).get("status") == "failed":
            state = "FAILED"
        else:  # papermill completes a cell in a `finally`: an interrupt is still propagating here
            state = "done" if sys.exc_info()[0] is None else "stopped"
        now = time.perf_counter()
        self._print(
            f"cell {number:>{len(str(self.total))}}/{self.total} {state:7} {now - t0:6.1f} s, "
            f"notebook {_clock(now - self.t_notebook)} | {line}"
        )

    def _beat(self) -> None:
        while not self.stop.wait(self.heartbeat_s):
            with self.lock:
                if self.current is None:
                    continue
                number, t0, line = self.current
            now = time.perf_counter()
            if now - t0 >= self.heartbeat_s * 0.9:
                self._print(
                    f"cell {number:>{len(str(self.total))}}/{self.total} running {_clock(now - t0)}, "
                    f"notebook {_clock(now - self.t_notebook)} | {line}"
                )


def _register_engine() -> None:
    """A papermill engine that is papermill's own (nbclient) plus the `_Progress` lines; papermill's
    progress_bar is a tqdm bar (carriage returns, unreadable in CI logs) and log_output prints every
    cell's output."""
    from papermill.engines import NBClientEngine, papermill_engines

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            progress = _Progress(nb_man.nb, HEARTBEAT_S)
            start, complete = nb_man.cell_start, nb_man.cell_complete

            def cell_start(cell, cell_index=None, **kw):
                progress.cell_start(cell, cell_index)
                return start(cell, cell_index, **kw)

            def cell_complete(cell, cell_index=None, **kw):
                result = complete(cell, cell_index, **kw)
                progress.cell_complete(cell, cell_index)
                return result

            nb_man.cell_start, nb_man.cell_complete = cell_start, cell_complete
            progress.thread.start()
            try:
                return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)
            finally:
                progress.stop.set()
                progress.thread.join()

    papermill_engines.register(_ENGINE, ProgressEngine)


def reproduce(
    scale: str = "mini",
    out: str | None = None,
    start: str | None = None,
    results: str | None = None,
    notebooks_dir: str | Path | None = None,
    work: str | None = None,
    parameters: dict | None = None,
    on_policy: bool = False,
) -> int:
    """Run the notebooks; 0 when all finished, 1 when a cell failed, 2 when there is nothing to run.

    on_policy: run notebook 06 (the on-policy experiment, `ON_POLICY`) after 01-05; with ``start="06"`` it runs
    alone, on the workspace 01-05 left.

    parameters: extra papermill parameters, each passed to the notebooks that declare it (as `scale`,
    `results_dir` and `work_dir` are); those three come from `scale`, `results` and `work`, not from here.
    Nothing is created (folders included) before the notebooks and the arguments are checked."""
    src = Path(notebooks_dir or ROOT / "notebooks")
    wanted = NOTEBOOKS + [ON_POLICY] if on_policy else NOTEBOOKS
    names = [n for n in wanted if (src / f"{n}.ipynb").is_file()]
    if not names:
        print(
            f"error: no reproduction notebooks in {src} (looked for {NOTEBOOKS[0]}.ipynb ... "
            f"{NOTEBOOKS[-1]}.ipynb). `python -m xtoken reproduce` runs the notebooks of a clone of the "
            f"repository: clone it, `make setup` (or `pip install -e .`) there and run it from the clone.",
            file=sys.stderr,
        )
        return 2
    missing = [n for n in wanted if n not in names]
    if start:
        match = [i for i, n in enumerate(names) if n.startswith(start)]
        if not match:
            hint = " (notebook 06 runs with --on-policy)" if ON_POLICY.startswith(start) and not on_policy else ""
            print(f"--start {start!r} names no notebook among {names}{hint}", file=sys.stderr)
            return 2
        names = names[match[0] :]
    parameters = dict(parameters or {})
    reserved = {"scale": "--scale", "results_dir": "--results", "work_dir": "--work"}
    clash = sorted(set(parameters) & set(reserved))
    if clash:
        raise ValueError(
            f"parameter(s) {', '.join(clash)} are set by "
            f"{', '.join(reserved[k] for k in clash)}, not passed as extra parameters"
        )

    import papermill as pm

    _register_engine()

    declared = {name: pm.inspect_notebook(str(src / f"{name}.ipynb")) for name in names}
    unused = sorted(k for k in parameters if not any(k in d for d in declared.values()))
    if unused:
        print(f"note: parameter(s) {', '.join(unused)} declared by none of the notebooks to run: ignored")
    out_dir, results_dir = _default_dirs(scale, out, results)
    work_dir = Path(work or ROOT / "runs" / scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    if missing:
        print(f"note: not present, skipped: {', '.join(missing)}")
    total = time.perf_counter()
    for i, name in enumerate(names, 1):
        nb_in, nb_out = src / f"{name}.ipynb", out_dir / f"{name}.ipynb"
        # executed in the output folder with paths relative to it, so an executed copy re-runs where it lies
        # (nbval re-executes the committed copies in their own folder)
        rel = lambda p: os.path.relpath(Path(p).resolve(), out_dir.resolve())  # noqa: E731
        offered = {"scale": scale, "results_dir": rel(results_dir), "work_dir": rel(work_dir), **parameters}
        params = {k: v for k, v in offered.items() if k in declared[name]}
        print(f"[{i}/{len(names)}] {name} ({', '.join(f'{k}={v}' for k, v in params.items())}) ...", flush=True)
        # same folder as the target, so that replacing it is an atomic rename
        running = out_dir / f".{name}.running.ipynb"
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(
                str(nb_in),
                str(running),
                parameters=params,
                cwd=str(out_dir),
                kernel_name="python3",
                engine_name=_ENGINE,
                progress_bar=False,
                log_output=False,
            )
        except BaseException as err:  # a failing cell, an interrupt, a kernel that died
            failed = _keep_failed(running, work_dir / "failed" / f"{name}.ipynb")
            where = (
                f"cell {err.exec_count} ({err.ename}: {err.evalue})"
                if isinstance(err, pm.PapermillExecutionError)
                else f"{type(err).__name__}: {err}"
            )
            print(
                f"FAILED in {name}.ipynb, {where}\n"
                f"  executed copy with the traceback: {failed or 'none (the notebook did not start)'}\n"
                f"  {nb_out} {'is unchanged' if nb_out.exists() else 'not written'}\n"
                f"  resume after fixing: python -m xtoken reproduce --scale {scale} --start {name[:2]}"
                + (" --on-policy" if on_policy else ""),
                file=sys.stderr,
            )
            if isinstance(err, pm.PapermillExecutionError):
                return 1
            raise
        os.replace(running, nb_out)
        print(f"      done in {time.perf_counter() - t0:6.1f} s -> {nb_out}", flush=True)
    print(
        f"reproduce --scale {scale}: {len(names)} notebooks in {time.perf_counter() - total:.1f} s; "
        f"results in {results_dir}"
    )
    return 0


def _keep_failed(running: Path, failed: Path) -> Path | None:
    if not running.exists():
        return None
    failed.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(running), str(failed))
    return failed
