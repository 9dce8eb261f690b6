"""Report helpers on hand-made inputs: the per-kind table and the KD/CE scaling verdicts."""

import pandas as pd

from xtoken.report import kind_table
from xtoken.report.markdown import _kd_scaling_lines


def _items():
    rows = []
    for setting, correct in (
        ("ce_only", {"copy": [1, 0], "add": [0, 0]}),
        ("pkl_qwen3", {"copy": [1, 1], "add": [1, 0]}),
    ):
        for seed in (0, 1):
            for kind, em in correct.items():
                rows.append(
                    dict(
                        setting=setting, seed=seed, skill="arithmetic", item=len(rows), kind=kind, exact_match=em[seed]
                    )
                )
    rows.append(dict(setting="ce_only", seed=0, skill="knowledge", item=99, kind="age", exact_match=1))
    return pd.DataFrame(rows)


def test_kind_table_pools_seeds_and_lists_teachers_first():
    teachers = [{"teacher": "qwen3", "label": "Qwen3", "arithmetic: add": 0.75, "arithmetic: copy": 1.0}]
    t = kind_table(_items(), teachers)
    assert list(t.columns) == ["model", "copy", "add"]  # KIND_ORDER, arithmetic only
    assert t.to_dict(orient="records") == [
        {"model": "teacher: Qwen3", "copy": 100.0, "add": 75.0},
        {"model": "ce_only", "copy": 50.0, "add": 0.0},
        {"model": "pkl_qwen3", "copy": 100.0, "add": 50.0},
    ]
    assert list(kind_table(_items(), None, ["pkl_qwen3"]).model) == ["pkl_qwen3"]


def test_kd_scaling_lines_combine_per_teacher():
    def row(comp, v, x):
        return {"comparison": comp, "metric": "average", "verdict": v, "Δ ours": x, "95% interval": "[+0.1, +0.2]"}

    d = pd.DataFrame(
        [
            row("dynamic vs kd_heavy KD/CE, Qwen3", "reproduced", 1.0),
            row("dynamic vs balanced KD/CE, Qwen3", "reproduced", 1.0),
            row("dynamic vs ce_heavy KD/CE, Qwen3", "reproduced", 1.0),
            row("dynamic vs kd_heavy KD/CE, Llama-3B", "reproduced", 1.0),
            row("dynamic vs balanced KD/CE, Llama-3B", "contradicted", -1.0),
            row("dynamic vs ce_heavy KD/CE, Llama-3B", "inconclusive", 0.0),
            dict(row("P-KL vs GOLD, Qwen3", "reproduced", 9.0)),
        ]
    )
    text = "\n".join(_kd_scaling_lines(d))
    assert "- Qwen3: **reproduced**" in text and "- Llama-3B: **contradicted**" in text
    assert "- Both teachers: **contradicted**" in text and "vs balanced -1.00" in text
    assert _kd_scaling_lines(d[~d.comparison.str.startswith("dynamic")]) == []
