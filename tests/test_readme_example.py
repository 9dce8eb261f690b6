"""The README's examples run as written: the code blocks are read from README.md and executed."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_block(after_heading: str) -> str:
    """The first ```python block after ``after_heading`` in the README."""
    start = README.index(after_heading)
    match = re.search(r"```python\n(.*?)```", README[start:], flags=re.S)
    assert match, f"no python block after {after_heading!r}"
    return match.group(1)


def test_readme_own_training_loop_step_runs():
    code = _python_block("### X-Token in your own training loop")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's example, as a user would run it
    kd, metrics = scope["kd"], scope["metrics"]
    kd = kd.detach()
    assert kd.ndim == 0 and bool(kd.isfinite()) and float(kd) > 0
    assert metrics["n_chunks"] > 0
    assert all(p.grad is not None for p in scope["student"].parameters())


def test_readme_ready_made_w_row():
    code = _python_block("### W and the coverage audit")
    scope: dict = {}
    exec(
        compile(
            code.replace("results/", str(Path(__file__).resolve().parents[1] / "results") + "/"), "README.md", "exec"
        ),
        scope,
    )
    assert scope["W"].row("201")[0][0] == "2"
