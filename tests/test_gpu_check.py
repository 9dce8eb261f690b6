"""benchmarks/gpu_check.py at reduced shapes on the CPU: the code a GPU run executes, minus the widths."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_loss_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_throughput.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--reduced",
            "--seq",
            "128",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "reduced shapes" and res["sequence"] == 128
    assert set(res["results"]) == {"ce", "kl", "p_kl", "gold", "h_kl", "p_kl_on_policy"}
    on = res["results"].pop("p_kl_on_policy")
    assert on["step_s"] > 0 and 0 < on["gen_tokens_per_row"] <= on["max_new_tokens"] == 32
    for name, r in res["results"].items():
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0
        if name != "ce":
            assert r["loss_s"] > 0 and r["loss_share"] > 0, (name, r)  # the loss op alone over the whole step
    assert res["results"]["ce"]["step_vs_ce"] == 1.0
