"""The notebooks' figures. Each function returns a matplotlib Figure, which a notebook shows inline (as a PNG)
and `save_figure` writes to results/; without a display (scripts, CI) matplotlib draws with Agg."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ..projection import Projection
from .tables import MINI_SKILLS, short, skills_of, with_average


def _subplots(*args, **kwargs):
    """`plt.subplots`, the figure closed at once: a notebook shows the returned figure once (Jupyter's inline
    backend would show every figure still open again at the end of the cell), and none piles up in pyplot."""
    fig, axes = plt.subplots(*args, **kwargs)
    plt.close(fig)
    return fig, axes


def plot_row_lengths(projections: dict[str, Projection]):
    """Histogram of entries per W row (0 = empty), one bar group per teacher, log scale."""
    fig, ax = _subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(projections), 1)
    for j, (teacher, W) in enumerate(projections.items()):
        lengths = (W.indices >= 0).sum(1)
        counts = [int((lengths == k).sum()) for k in range(W.top_k + 1)]
        xs = [k + (j - (len(projections) - 1) / 2) * width for k in range(W.top_k + 1)]
        bars = ax.bar(xs, counts, width=width, label=short(teacher))
        ax.bar_label(bars, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("teacher tokens in the student token's W row (0 = empty)")
    ax.set_ylabel("student tokens")
    ax.set_title(f"W rows of {short(next(iter(projections.values())).meta.get('student', 'student'))}")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_coverage(audits: dict):
    """Per category: % of student tokens in GOLD's strict C and H-KL's widened C, per teacher."""
    cats = [c for c in next(iter(audits.values())).table.category]
    fig, axes = _subplots(1, len(audits), figsize=(6 * len(audits), 3.6), sharey=True, squeeze=False)
    for ax, (teacher, audit) in zip(axes[0], audits.items()):
        t = audit.table.set_index("category").loc[cats]
        xs = range(len(cats))
        ax.bar([x - 0.2 for x in xs], t.gold_pct, width=0.4, label="GOLD strict C")
        ax.bar([x + 0.2 for x in xs], t.hkl_pct, width=0.4, label="H-KL widened C")
        ax.set_xticks(list(xs), [c.replace("_", "\n") for c in cats], fontsize=7)
        ax.set_title(f"{short(audit.student)} -> {short(teacher)}: {audit.recommend()[0]}")
        ax.set_ylim(0, 105)
    axes[0][0].set_ylabel("% of student tokens in C")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_grid(df: pd.DataFrame, metrics=None, title="", base: dict | None = None):
    """Grouped bars (mean over seeds) with error bars (std) per setting and metric (default: the runs'
    skills or tasks); base as a line."""
    metrics = skills_of(df) if metrics is None else metrics
    df = with_average(df, skills_of(df))
    order = list(dict.fromkeys(df.setting))
    labels = [df[df.setting == s].label.iloc[0] for s in order]
    fig, ax = _subplots(figsize=(max(7, 0.9 * len(order) + 2), 4))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        mean = [df[df.setting == s][m].mean() for s in order]
        std = [df[df.setting == s][m].std(ddof=1) if (df.setting == s).sum() > 1 else 0 for s in order]
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(order))]
        ax.bar(xs, mean, width=width, yerr=std, capsize=3, label=m)
        if base is not None and m in base:
            ax.axhline(100 * base[m], color=f"C{j}", ls=":", lw=1)
    ax.set_xticks(range(len(order)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("exact match (%)" if tuple(metrics) == MINI_SKILLS else "score (%)")
    ax.set_title(title + ("  (dotted: base student)" if base is not None else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _line_colors(n: int) -> list:
    """n distinct colours: matplotlib's 10-colour cycle, or tab20 beyond 10 lines (the cycle repeats)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _legend_beside(ax, fig, n: int):
    """Legend to the right of the axes, so that it never covers a line."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, ncol=1 if n <= 18 else 2)
    fig.tight_layout()


def plot_numeral_mass(results: list[dict], settings=None, title="Student mass on multi-digit numerals"):
    """Mean (over seeds) numeral-mass curve per setting across training, min-max band over seeds:
    Proposition 1 made visible. One colour per setting; the legend sits beside the axes."""
    import numpy as np

    by = {}
    for r in results:
        if (settings is None or r["setting"] in settings) and r.get("numeral_mass_history"):
            by.setdefault((r["setting"], r.get("label", r["setting"])), []).append(r["numeral_mass_history"])
    fig, ax = _subplots(figsize=(10, 3.8))
    for ((_setting, label), hists), color in zip(by.items(), _line_colors(len(by))):
        steps = [s for s, _ in hists[0]]
        vals = np.array([[v for _, v in h[: len(steps)]] for h in hists if len(h) >= len(steps)])
        ax.plot(steps, vals.mean(0), label=label, color=color)
        if len(vals) > 1:
            ax.fill_between(steps, vals.min(0), vals.max(0), alpha=0.15, color=color, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("mass on multi-digit numerals\nat numeral positions")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    _legend_beside(ax, fig, len(by))
    return fig


def plot_multi_teacher(df: pd.DataFrame, singles: pd.DataFrame | None = None):
    """Average exact match per pair and weighting scheme (bars with std), single teachers for reference."""
    skills = skills_of(df)
    df = with_average(df, skills)
    df = df.assign(pair=df.setting.str.split("@").str[0], weighting=df.setting.str.split("@").str[1])
    pairs, schemes = list(dict.fromkeys(df.pair)), list(dict.fromkeys(df.weighting))
    fig, axes = _subplots(1, len(skills), figsize=(6.5 * len(skills), 4), sharey=False, squeeze=False)
    axes = axes[0]
    for ax, metric in zip(axes, skills):
        width = 0.8 / len(schemes)
        for j, w in enumerate(schemes):
            sub = df[df.weighting == w]
            mean = [sub[sub.pair == p][metric].mean() for p in pairs]
            std = [sub[sub.pair == p][metric].std(ddof=1) for p in pairs]
            ax.bar(
                [i + (j - (len(schemes) - 1) / 2) * width for i in range(len(pairs))],
                mean,
                width=width,
                yerr=std,
                capsize=2,
                label=w,
            )
        if singles is not None:
            s = with_average(singles, skills)
            for k, setting in enumerate(("hkl_phi", "pkl_qwen3", "kd_llama")):
                v = s[s.setting == setting][metric].mean()
                if v == v:
                    ax.axhline(v, color=f"C{5 + k}", ls="--", lw=1, label=f"single: {setting}")
        ax.set_xticks(range(len(pairs)), [p.replace("+", "\n+ ") for p in pairs], fontsize=7)
        ax.set_title(f"{metric} ({'exact match' if skills == MINI_SKILLS else 'score'}, %)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_generation_length(results: list[dict], title="Length of the student's own generations"):
    """Mean (over seeds) generated tokens per row across training, per on-policy setting (logged windows)."""
    import numpy as np

    by = {}
    for r in results:
        logs = [(h["step"], float(h["gen_tokens"])) for h in r.get("log_history", []) if "gen_tokens" in h]
        if logs:
            by.setdefault(r.get("label", r["setting"]), []).append(logs)
    fig, ax = _subplots(figsize=(10, 3.2))
    for (label, curves), color in zip(by.items(), _line_colors(len(by))):
        n = min(len(c) for c in curves)
        steps = [s for s, _ in curves[0][:n]]
        ax.plot(steps, np.mean([[g for _, g in c[:n]] for c in curves], 0), label=label, color=color)
    ax.set_xlabel("training step")
    ax.set_ylabel("generated tokens per row")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    _legend_beside(ax, fig, len(by))
    return fig
