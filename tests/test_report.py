"""Report helpers on hand-made inputs: the per-kind table, the KD/CE scaling verdicts and notebook 06's
generation table, plot and REPORT.md section."""

import json

import pandas as pd
import pytest

from xtoken.report import (
    build_report,
    generation_table,
    kind_table,
    on_policy_lines,
    plot_generation_length,
    plot_numeral_mass,
)
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


def _on_policy_runs():
    """Run results as notebook 06 loads them: two seeds of on-policy P-KL, one of on-policy GOLD, and off-policy
    runs that log no generation. A window with ``on_policy`` 0 and no ``gen_tokens`` (every batch in it fell back
    off-policy) counts in the on-policy share, not in the lengths."""
    pkl, gold = "pkl_qwen3@on_policy", "gold_qwen3@on_policy"
    return [
        {
            "setting": pkl,
            "label": "P-KL on-policy",
            "seed": 0,
            "log_history": [
                {"step": 5, "loss": 2.0},
                {"step": 10, "gen_tokens": 12.0, "on_policy": 1.0},
                {"step": 20, "on_policy": 0.0},
                {"step": 30, "gen_tokens": 6.0, "on_policy": 0.5},
                {"step": 40, "gen_tokens": 9.0, "on_policy": 0.5},
            ],
        },
        {"setting": "pkl_qwen3@arith", "label": "P-KL off-policy", "seed": 0, "log_history": [{"step": 10, "loss": 1}]},
        {
            "setting": pkl,
            "label": "P-KL on-policy",
            "seed": 1,
            "log_history": [
                {"step": 10 * i, "gen_tokens": g, "on_policy": 1.0} for i, g in enumerate([20, 10, 5, 5], 1)
            ],
        },
        {
            "setting": gold,
            "label": "GOLD on-policy",
            "seed": 0,
            "log_history": [
                {"step": 10, "gen_tokens": 4, "on_policy": 1.0},
                {"step": 20, "gen_tokens": 8, "on_policy": 1},
            ],
        },
        {"setting": "ce_only@arith", "label": "CE only", "seed": 0},
    ]


def test_generation_table_means_over_seeds_and_leaves_out_off_policy_settings():
    t = generation_table(_on_policy_runs())
    # P-KL seed 0: windows 12, 6, 9 (first 12, last 9, mean 9), on-policy share (1 + 0 + .5 + .5) / 4 = .5;
    # seed 1: 20, 10, 5, 5 (first 20, last 5, mean 10), share 1
    assert t.to_dict(orient="records") == [
        {
            "setting": "pkl_qwen3@on_policy",
            "tokens, first window": 16.0,
            "tokens, last window": 7.0,
            "tokens, whole run": 9.5,
            "on-policy batches (%)": 75.0,
            "seeds": 2,
        },
        {
            "setting": "gold_qwen3@on_policy",
            "tokens, first window": 4.0,
            "tokens, last window": 8.0,
            "tokens, whole run": 6.0,
            "on-policy batches (%)": 100.0,
            "seeds": 1,
        },
    ]
    assert generation_table([r for r in _on_policy_runs() if "@arith" in r["setting"]]).empty


def test_plot_generation_length_draws_one_line_per_label():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    fig = plot_generation_length(_on_policy_runs())
    try:
        assert isinstance(fig, Figure)
        lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
        assert set(lines) == {"P-KL on-policy", "GOLD on-policy"}  # the off-policy runs draw nothing
        assert list(lines["GOLD on-policy"].get_xdata()) == [10, 20]
        assert list(lines["GOLD on-policy"].get_ydata()) == [4.0, 8.0]
        # means over seeds, over the windows every seed logged (seed 0 logged 3)
        assert list(lines["P-KL on-policy"].get_ydata()) == [16.0, 8.0, 7.0]
    finally:
        plt.close(fig)


def _on_policy_files(folder, prefix="06", config=None):
    """The files notebook 06 writes into results/, hand-made: two comparisons (each with an arithmetic and a
    knowledge row, plus an `average` row the section leaves out), a table, the generation and per-kind tables."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}_results.json").write_text(json.dumps({"config": config or {"seeds": [0, 1]}, "runs": []}))
    pd.DataFrame([{"model": "pkl_qwen3@on_policy", "arithmetic": "41.0 ± 1.0"}]).to_csv(
        folder / f"{prefix}_table.csv", index=False
    )

    def row(comp, metric, delta, interval, mde, verdict):
        return {
            "comparison": comp,
            "A": "a",
            "B": "b",
            "metric": metric,
            "unit": "points",
            "paper Δ": None,
            "Δ ours": delta,
            "95% interval": interval,
            "lo": 0.0,
            "hi": 0.0,
            "MDE": mde,
            "verdict": verdict,
            "same answer (%)": 90.0,
        }

    one, two = "on-policy vs off-policy P-KL (Qwen3)", "on-policy GOLD vs on-policy P-KL (Qwen3)"
    pd.DataFrame(
        [
            row(one, "arithmetic", 2.5, "[+0.50, +4.50]", 1.234, "A higher"),
            row(one, "knowledge", -7.25, "[-9.00, -5.50]", 2.0, "B higher"),
            row(one, "average", 77.77, "[+70.00, +80.00]", 3.0, "A higher"),
            row(two, "arithmetic", -0.333, "[-1.00, +0.33]", 0.9, "inconclusive"),
            row(two, "knowledge", 0.0, "[+0.00, +0.00]", 0.0, "inconclusive"),
        ]
    ).to_csv(folder / f"{prefix}_comparisons.csv", index=False)
    pd.DataFrame([{"setting": "pkl_qwen3@on_policy", "tokens, last window": 31.5}]).to_csv(
        folder / f"{prefix}_generation.csv", index=False
    )
    pd.DataFrame([{"model": "pkl_qwen3@on_policy", "copy": 88.8}]).to_csv(folder / f"{prefix}_kinds.csv", index=False)
    for png in ("numeral_mass", "generation"):
        (folder / f"{prefix}_{png}.png").write_bytes(b"")
    return folder


HEADER = "## Beyond the paper: on-policy distillation (notebook 06)"


def test_plot_numeral_mass_gives_every_setting_its_own_colour_and_keeps_the_legend_off_the_lines():
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    # 15 settings, as notebook 03 draws: matplotlib's default cycle has 10 colours
    runs = [
        {"setting": f"s{i}", "label": f"setting {i}", "numeral_mass_history": [(0, 0.5), (50, 0.5 - i / 40 - s / 100)]}
        for i in range(15)
        for s in (0, 1)
    ]
    fig = plot_numeral_mass(runs)
    try:
        ax = fig.axes[0]
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == [f"setting {i}" for i in range(15)]
        colours = [mcolors.to_hex(line.get_color()) for line in lines]
        assert len(set(colours)) == 15
        bands = ax.collections  # the min-max band over seeds, one per setting, in its line's colour
        assert [mcolors.to_hex(b.get_facecolor()[0], keep_alpha=False) for b in bands] == colours
        assert list(lines[3].get_ydata()) == pytest.approx([0.5, 0.5 - 3 / 40 - 0.005])
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(fig)  # as save_figure draws it
        canvas.draw()
        renderer = canvas.get_renderer()
        legend, axes_box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.x0 >= axes_box.x1  # beside the axes, not over the curves
        assert legend.x1 <= fig.bbox.x1 + 1  # and inside the saved figure
    finally:
        plt.close(fig)


def test_on_policy_lines_without_notebook_06_is_empty(tmp_path):
    assert on_policy_lines(tmp_path) == []
    _on_policy_files(tmp_path)
    (tmp_path / "06_results.json").unlink()  # the other files alone are no section
    assert on_policy_lines(tmp_path) == []
    # another scale's files are not this scale's
    assert on_policy_lines(_on_policy_files(tmp_path / "mini"), "smoke") == []


@pytest.mark.parametrize("scale,prefix", [("mini", "06"), ("smoke", "06_smoke")])
def test_on_policy_lines_tables_and_one_verdict_line_per_comparison(tmp_path, scale, prefix):
    lines = on_policy_lines(_on_policy_files(tmp_path, prefix), scale)
    text = "\n".join(lines)
    assert lines[0] == HEADER and "**Stale**" not in text
    assert "| pkl_qwen3@on_policy | 41.0 ± 1.0 |" in text  # the table
    assert (
        "- on-policy vs off-policy P-KL (Qwen3): arithmetic +2.50 [+0.50, +4.50] points (MDE 1.23): **A higher**."
        in lines
    )
    assert (
        "- on-policy GOLD vs on-policy P-KL (Qwen3): arithmetic -0.33 [-1.00, +0.33] points (MDE 0.90): "
        "**inconclusive**." in lines
    )
    assert len([x for x in lines if x.startswith("- ")]) == 2  # arithmetic rows only
    assert "-7.25" in text and "77.77" not in text  # knowledge rows in the table, average rows left out
    assert "| pkl_qwen3@on_policy | 31.5 |" in text and "| pkl_qwen3@on_policy | 88.8 |" in text
    assert f"![generation length]({prefix}_generation.png)" in lines
    assert f"![numeral mass]({prefix}_numeral_mass.png)" in lines
    (tmp_path / f"{prefix}_numeral_mass.png").unlink()  # a figure not drawn is not linked
    assert "numeral mass" not in "\n".join(on_policy_lines(tmp_path, scale))


def test_on_policy_lines_at_paper_scale_show_seed_paired_differences_without_verdicts(tmp_path):
    """Paper scale: no per-item scores, so the comparisons file holds `headline_deltas`' columns (no metric, no
    interval); the section shows them as they are, says so, and links only the figures drawn there."""
    r = _on_policy_files(tmp_path, "06_paper")
    meta = json.loads((r / "06_paper_results.json").read_text()) | {"standin": True}
    (r / "06_paper_results.json").write_text(json.dumps(meta))
    for f in ("06_paper_kinds.csv", "06_paper_numeral_mass.png"):
        (r / f).unlink()
    pd.DataFrame(
        [
            {
                "comparison": "on-policy vs off-policy P-KL (Qwen3)",
                "seeds": 1,
                "Δgsm8k (ours)": "-3.0 ± 0.0",
                "group": "first",
            },
            {
                "comparison": "on-policy P-KL, KD alone vs with CE",
                "seeds": 1,
                "Δgsm8k (ours)": "+1.0 ± 0.0",
                "group": "follow-up",
            },
        ]
    ).to_csv(r / "06_paper_comparisons.csv", index=False)
    lines = on_policy_lines(r, "paper")
    text = "\n".join(lines)
    assert lines[0] == HEADER and "stand-ins" in text and "no interval and no verdict" in text
    assert "| on-policy vs off-policy P-KL (Qwen3) | 1 | -3.0 ± 0.0 |" in text
    assert "**Follow-up, fixed after the first results (exploratory):**" in lines
    assert not [x for x in lines if x.startswith("- ")]  # no verdict lines
    assert "![generation length](06_paper_generation.png)" in lines and "numeral mass" not in text


def test_on_policy_lines_stale_iff_notebook_03_config_differs(tmp_path):
    config = {"seeds": [0, 1], "student_steps": 450}
    _on_policy_files(tmp_path, config=config)
    three = tmp_path / "03_results.json"

    def stale():
        return sum(x.startswith("**Stale**") for x in on_policy_lines(tmp_path))

    assert stale() == 0  # no notebook 03 results: nothing to compare with
    three.write_text(json.dumps({"config": dict(config), "runs": [1, 2]}))
    assert stale() == 0
    three.write_text(json.dumps({"config": config | {"student_steps": 10}}))
    assert stale() == 1
    three.write_text(json.dumps({"runs": []}))  # notebook 03 without a config: differs too
    assert stale() == 1


def test_build_report_ends_with_the_on_policy_section(tmp_path):
    r = _on_policy_files(tmp_path / "r")
    (r / "03_results.json").write_text(json.dumps({"config": {"other": 1}}))
    section = on_policy_lines(r)
    assert section[0] == HEADER and any(x.startswith("**Stale**") for x in section)
    text = build_report(r)
    assert text.startswith("# X-Token reproduction report (mini scale)")
    assert text.endswith("\n".join(section) + "\n") and text.count(HEADER) == 1
    # notebook 04 with its comparisons (the report's other return): the section still comes last
    (r / "04_results.json").write_text(
        json.dumps({"findings": {"1. a finding": {"verdict": "reproduced", "comparisons": 1, "verdicts": {"x": 1}}}})
    )
    pd.DataFrame([{"model": "m", "average": 1.0}]).to_csv(r / "04_table.csv", index=False)
    cols = ["finding", "comparison", "metric", "paper Δ", "Δ ours", "95% interval", "MDE", "verdict", "same answer (%)"]
    pd.DataFrame(
        [dict(zip(cols, ["1. a finding", "c", "average", 1.0, 1.0, "[+0.1, +0.2]", 0.1, "reproduced", 90]))]
    ).to_csv(r / "04_comparisons.csv", index=False)
    text = build_report(r)
    assert "## Multi-teacher (notebook 04)" in text and "- 1. a finding: **reproduced**" in text
    assert text.index("## Multi-teacher") < text.index(HEADER)
    assert text.endswith("\n".join(section) + "\n") and text.count(HEADER) == 1
    (r / "06_results.json").unlink()
    assert HEADER not in build_report(r)


def test_headline_deltas_without_a_paper_number_leave_out_the_papers_columns():
    from xtoken.report import headline_deltas

    df = pd.DataFrame(
        [
            {"setting": s, "seed": seed, "gsm8k": v}
            for s, vals in (("a", (0.50, 0.40)), ("b", (0.30, 0.30)))
            for seed, v in enumerate(vals)
        ]
    )
    ours = headline_deltas(df, [("a vs b", "a", "b", None)])
    assert list(ours.columns) == ["comparison", "seeds", "Δgsm8k (ours)", "Δaverage (ours)"]
    assert ours.iloc[0]["Δgsm8k (ours)"] == "+15.0 ± 7.1" and ours.iloc[0].seeds == 2
    paper = headline_deltas(df, [("a vs b", "a", "b", -1.0)])
    assert paper.iloc[0]["paper Δavg"] == -1.0 and not paper.iloc[0]["same sign as paper"]


def test_paper_scale_report_reads_directions_never_verdicts(tmp_path):
    """A real paper-scale run (not stand-ins) keeps no per-item scores: its comparisons have no interval, so the
    report gives each one's direction against the paper and calls none of them reproduced."""
    r = tmp_path
    (r / "03_paper_results.json").write_text(json.dumps({"config": {"tasks": {"gsm8k": 5}}, "runs": []}))
    pd.DataFrame(
        [
            {
                "comparison": "P-KL vs GOLD, Qwen3",
                "seeds": 1,
                "paper Δavg": 3.82,
                "Δgsm8k (ours)": "+4.0 ± 0.0",
                "Δaverage (ours)": "+4.0 ± 0.0",
                "same sign as paper": True,
            },
            {
                "comparison": "H-KL vs GOLD, Phi-mini",
                "seeds": 1,
                "paper Δavg": 0.52,
                "Δgsm8k (ours)": "-1.0 ± 0.0",
                "Δaverage (ours)": "-1.0 ± 0.0",
                "same sign as paper": False,
            },
        ]
    ).to_csv(r / "03_paper_deltas.csv", index=False)
    (r / "04_paper_results.json").write_text(
        json.dumps({"findings": {"2. the complementary pair beats every single teacher": {"held": True, "pair": 40.1}}})
    )
    pd.DataFrame([{"pair": "phi_hkl+llama_kl", "average": "40.1 ± 0.0"}]).to_csv(r / "04_paper_table.csv", index=False)
    text = build_report(r, "paper")
    assert (
        "- P-KL vs GOLD, Qwen3: ours +4.0 ± 0.0 on the average vs the paper's +3.82: same direction as the paper."
        in text
    )
    assert "- H-KL vs GOLD, Phi-mini: ours -1.0 ± 0.0 on the average vs the paper's +0.52: opposite direction" in text
    assert "- 2. the complementary pair beats every single teacher: holds in the means over seeds (pair: 40.1)" in text
    assert "reproduced" not in text.replace("neither reproduced nor contradicted", "")
    assert text.count("No verdicts") == 2
