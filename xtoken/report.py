"""Tables and figures for the notebooks: W summaries, Table 8 beside the paper, plots.

Everything a notebook shows is computed here, so notebooks stay parameters + calls + narrative.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless by default; notebooks display the returned figures inline
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .projection import EMPTY, KIND_NAMES, Projection  # noqa: E402

# The paper's Table 8: Llama-3 multi-digit numerals in GOLD's common set C.
PAPER_TABLE8 = {
    "Qwen/Qwen3-4B": {"numeral_2digit": (0, 100), "numeral_3digit": (0, 1000)},
    "microsoft/Phi-4-mini-instruct": {"numeral_2digit": (100, 100), "numeral_3digit": (1000, 1000)},
}


def short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def w_summary_table(projections: dict[str, Projection]) -> pd.DataFrame:
    """One row per teacher: rows exact / special / multi (by length) / empty (by reason)."""
    rows = []
    for teacher, W in projections.items():
        s = W.summary()
        rows.append({"teacher": short(teacher), "student rows": s["rows"], "teacher columns": s["columns"],
                     "exact": s["exact"], "special": s["special"], "multi": s["multi"],
                     **{f"multi len {k}": v for k, v in s["multi_rows_by_length"].items()},
                     "empty": s["empty"], **{f"empty: {k}": v for k, v in s["empty_by_reason"].items()}})
    return pd.DataFrame(rows)


def explain_rows(W: Projection, tokens: list[str]) -> pd.DataFrame:
    """The W rows of some student tokens in readable strings."""
    out = []
    for tok in tokens:
        sid = W.student_tok.convert_tokens_to_ids(tok)
        row = W.row(sid)
        out.append({"student token": tok, "id": sid, "kind": KIND_NAMES[int(W.row_kind[sid])],
                    "teacher tokens": " + ".join(t for t, *_ in row) or "(empty)",
                    "weights": ", ".join(f"{w:.4f}" for *_, w in row) or "-"})
    return pd.DataFrame(out)


def too_long_examples(W: Projection, n: int = 5, max_span: int | None = None) -> pd.DataFrame:
    """Student tokens whose teacher re-tokenization is longer than max_span (their rows stay empty)."""
    from .canonical import token_bytes
    max_span = max_span or W.meta["max_span"]
    s_bytes = token_bytes(W.student_tok)
    out = []
    for s in (W.row_kind == EMPTY).nonzero().flatten().tolist():
        b = s_bytes[s] if s < len(s_bytes) else None
        if b is None:
            continue
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        pieces = W.teacher_tok.tokenize(text)
        if len(pieces) > max_span and text.isprintable():
            out.append({"student token": W.student_tok.convert_ids_to_tokens(s), "text": text,
                        "teacher pieces": len(pieces), "teacher tokens": " + ".join(pieces)})
        if len(out) == n:
            break
    return pd.DataFrame(out)


def plot_row_lengths(projections: dict[str, Projection]):
    """Histogram of entries per W row (0 = empty), one bar group per teacher, log scale."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
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


def table8(audits: dict) -> pd.DataFrame:
    """Table 8 rows (2- and 3-digit numerals, punctuation, single digits), ours beside the paper's."""
    rows = []
    for teacher, audit in audits.items():
        t = audit.table.set_index("category")
        row = {"teacher": short(teacher)}
        for cat, label in (("numeral_2digit", "2-digit"), ("numeral_3digit", "3-digit"),
                           ("ascii_punctuation", "ASCII punct."), ("single_digit", "single digits")):
            row[f"{label} in C (ours)"] = f"{t.loc[cat, 'gold_common']}/{t.loc[cat, 'student_tokens']}"
            paper = PAPER_TABLE8.get(teacher, {}).get(cat)
            if paper:
                row[f"{label} in C (paper)"] = f"{paper[0]}/{paper[1]}"
        row["H-KL widened C, 3-digit"] = f"{t.loc['numeral_3digit', 'hkl_common']}/{t.loc['numeral_3digit', 'student_tokens']}"
        row["recommend"] = audit.recommend()[0]
        rows.append(row)
    return pd.DataFrame(rows)


def plot_coverage(audits: dict):
    """Per category: % of student tokens in GOLD's strict C and H-KL's widened C, per teacher."""
    cats = [c for c in next(iter(audits.values())).table.category]
    fig, axes = plt.subplots(1, len(audits), figsize=(6 * len(audits), 3.6), sharey=True, squeeze=False)
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


def write_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return path


def save_figure(fig, path) -> Path:
    """PNG with fixed metadata, so the same figure gives the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


# ---- notebooks 03-05: distillation tables beside the paper's ------------------------------------

# The paper's Table 1/2 (Llama-3.2-1B student), REFERENCE.md section 1: (GSM8k, average of 5 benchmarks).
PAPER_TABLE1 = {
    "base": ("no distillation (Llama-1B base)", 5.69, 33.96),
    "ce_only": ("continued pre-training, CE only", 10.25, 36.63),
    "kd_llama": ("same-tokenizer KD (Llama-3B)", 12.89, 38.40),
    "gold_qwen3": ("GOLD (Qwen3-4B)", 2.56, 35.03),
    "pkl_qwen3": ("X-Token P-KL (Qwen3-4B)", 15.54, 38.85),
    "hkl_phi": ("X-Token H-KL (Phi-4-mini)", 19.11, 39.18),
    "phi_hkl+llama_kl@static": ("multi-teacher Phi-mini (H-KL) + Llama-3B (KL), static", 20.39, 40.48),
}
# Paired deltas the paper headlines, as (name, setting A, setting B, the paper's A - B on the average).
PAPER_DELTAS = [
    ("P-KL vs GOLD, Qwen3", "pkl_qwen3", "gold_qwen3", 3.82),
    ("H-KL vs GOLD, Phi-mini", "hkl_phi", "gold_phi", 0.52),
    ("P-KL vs H-KL, Qwen3", "pkl_qwen3", "hkl_qwen3", 3.55),
    ("H-KL vs P-KL, Phi-mini", "hkl_phi", "pkl_phi", 1.68),
]


def load_run_results(work_dir, settings=None) -> list[dict]:
    """Every runs/<setting>/seed*/result.json under a miniature's work dir (optionally some settings)."""
    out = []
    for f in sorted(Path(work_dir).glob("runs/*/seed*/result.json")):
        r = json.loads(f.read_text())
        if settings is None or r["setting"] in settings:
            out.append(r)
    return out


MINI_SKILLS = ("arithmetic", "knowledge")
_NOT_SKILLS = {"setting", "label", "seed", "arithmetic_200", "numeral_mass", "digit_split", "single_digit", "train_wall_s",
               "eval_wall_s", "wall_s", "tokens_per_s", "average", "pair", "weighting"}


def skills_of(df: pd.DataFrame) -> tuple:
    """The score columns of a grid's runs table: the miniature's two skills, or (paper scale) one column
    per lm-eval task, i.e. every column that is not a run's name, seed, diagnostic, loss or wall time."""
    if set(MINI_SKILLS) <= set(df.columns):
        return MINI_SKILLS
    return tuple(c for c in df.columns if c not in _NOT_SKILLS and not str(c).startswith("final_"))


def with_average(df: pd.DataFrame, skills=None) -> pd.DataFrame:
    """Scores in percent and their average over the skills (the tables' 'average' column)."""
    skills = skills_of(df) if skills is None else skills
    df = df.copy()
    for s in skills:
        df[s] = 100 * df[s].astype(float)
    df["average"] = df[list(skills)].mean(axis=1)
    return df


def distillation_table(df: pd.DataFrame, base: dict | None = None) -> pd.DataFrame:
    """Mean ± std over seeds per setting (scores in %), the paper's numbers beside. The numeral diagnostics
    (miniature only) are shown when the runs have them."""
    skills = skills_of(df)
    df = with_average(df, skills)
    diag = "numeral_mass" in df and "digit_split" in df
    rows = []
    if base is not None:
        b = with_average(pd.DataFrame([base]), skills)
        rows.append({"setting": "base", "label": "base student (no distillation)", "seeds": 1,
                     **{f"{m}": f"{b[m].iloc[0]:.1f}" for m in (*skills, "average")},
                     **({"numeral mass": f"{base.get('numeral_mass', float('nan')):.3f}", "digit-split": "-"}
                        if diag else {})})
    for setting in dict.fromkeys(df.setting):
        g = df[df.setting == setting]
        fmt = lambda col, k=1, scale=1: f"{scale * g[col].mean():.{k}f} ± {scale * g[col].std(ddof=1) if len(g) > 1 else 0:.{k}f}"  # noqa: E731
        rows.append({"setting": setting, "label": g.label.iloc[0], "seeds": len(g),
                     **{m: fmt(m) for m in (*skills, "average")},
                     **({"numeral mass": fmt("numeral_mass", 3), "digit-split": fmt("digit_split", 2)} if diag else {})})
    out = pd.DataFrame(rows)
    out["paper GSM8k"] = [PAPER_TABLE1.get(s, ("", None, None))[1] for s in out.setting]
    out["paper avg"] = [PAPER_TABLE1.get(s, ("", None, None))[2] for s in out.setting]
    return out


def headline_deltas(df: pd.DataFrame, deltas=PAPER_DELTAS) -> pd.DataFrame:
    """The paper's paired comparisons, ours (seed-paired mean ± std of A - B) beside the paper's."""
    skills = skills_of(df)
    df = with_average(df, skills)
    rows = []
    for name, a, b, paper in deltas:
        A = df[df.setting == a].set_index("seed")
        B = df[df.setting == b].set_index("seed")
        seeds = A.index.intersection(B.index)
        if len(seeds) == 0:
            continue
        row = {"comparison": name, "seeds": len(seeds), "paper Δavg": paper}
        for m in (*skills, "average"):
            d = A.loc[seeds, m] - B.loc[seeds, m]
            row[f"Δ{m} (ours)"] = f"{d.mean():+.1f} ± {d.std(ddof=1) if len(d) > 1 else 0:.1f}"
        row["same sign as paper"] = bool(((A.loc[seeds, "average"] - B.loc[seeds, "average"]).mean() > 0) == (paper > 0))
        rows.append(row)
    return pd.DataFrame(rows)


def learned_w_comparison(df: pd.DataFrame, learned: str = "pkl_learned_qwen3", fixed: str = "pkl_qwen3") -> pd.DataFrame:
    """P-KL with a learned W vs the fixed W: per-metric means and the seed-paired difference (learned - fixed)."""
    skills = skills_of(df)
    df = with_average(df, skills)
    A = df[df.setting == learned].set_index("seed")
    B = df[df.setting == fixed].set_index("seed")
    seeds = A.index.intersection(B.index)
    if len(seeds) == 0:
        return pd.DataFrame()
    rows = []
    for m, k in (*((x, 1) for x in skills), ("average", 1), ("numeral_mass", 3), ("single_digit", 2)):
        if m not in df:
            continue
        d = A.loc[seeds, m].astype(float) - B.loc[seeds, m].astype(float)
        rows.append({"metric": m, "fixed W": round(float(B.loc[seeds, m].mean()), k + 1),
                     "learned W": round(float(A.loc[seeds, m].mean()), k + 1),
                     "Δ learned - fixed": f"{d.mean():+.{k}f} ± {d.std(ddof=1) if len(d) > 1 else 0:.{k}f}",
                     "seeds": len(seeds)})
    return pd.DataFrame(rows)


def _round(x, k: int = 4):
    return None if x is None else round(x, k)


def learned_w_rows(results: list[dict], setting: str = "pkl_learned_qwen3", n: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """From the runs' result.json: (per-seed summary of how far W moved, the rows that moved most as strings)."""
    summary, top = [], []
    for r in sorted((r for r in results if r["setting"] == setting), key=lambda r: r["seed"]):
        for teacher, lw in (r.get("learned_w") or {}).items():
            summary.append({"seed": r["seed"], "teacher": teacher, "trainable rows": lw["trainable_rows"],
                            "numeral rows": lw["numeral_rows"], "mean L1 change": round(lw["mean_l1_change"], 4),
                            "mean L1 change, numeral rows": _round(lw["mean_l1_change_numerals"]) if lw["numeral_rows"] else None,
                            "mean L1 change, other rows": (_round(lw["mean_l1_change_other"])   # none: every trainable
                                                           if lw["trainable_rows"] > lw["numeral_rows"] else None),   # row is a numeral
                            "max L1 change": round(lw["max_l1_change"], 4)})
            for row in lw["top_moved"][:n]:
                top.append({"seed": r["seed"], "student token": row["student"].replace("Ġ", "␣"),
                            "teacher tokens": " ".join(t.replace("Ġ", "␣") for t in row["teacher"]),
                            "W before": " ".join(f"{x:.3f}" for x in row["before"]),
                            "W after": " ".join(f"{x:.3f}" for x in row["after"]), "L1 change": row["l1_change"]})
    return pd.DataFrame(summary), pd.DataFrame(top)


def plot_grid(df: pd.DataFrame, metrics=None, title="", base: dict | None = None):
    """Grouped bars (mean over seeds) with error bars (std) per setting and metric (default: the runs'
    skills or tasks); base as a line."""
    metrics = skills_of(df) if metrics is None else metrics
    df = with_average(df, skills_of(df))
    order = list(dict.fromkeys(df.setting))
    labels = [df[df.setting == s].label.iloc[0] for s in order]
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(order) + 2), 4))
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


def plot_numeral_mass(results: list[dict], settings=None, title="Student mass on multi-digit numerals"):
    """Mean (over seeds) numeral-mass curve per setting across training: Proposition 1 made visible."""
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 3.6))
    by = {}
    for r in results:
        if (settings is None or r["setting"] in settings) and r.get("numeral_mass_history"):
            by.setdefault((r["setting"], r.get("label", r["setting"])), []).append(r["numeral_mass_history"])
    for (setting, label), hists in by.items():
        steps = [s for s, _ in hists[0]]
        vals = np.array([[v for _, v in h[:len(steps)]] for h in hists if len(h) >= len(steps)])
        ax.plot(steps, vals.mean(0), label=label)
        if len(vals) > 1:
            ax.fill_between(steps, vals.min(0), vals.max(0), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("mass on multi-digit numerals\nat numeral positions")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def multi_teacher_table(df: pd.DataFrame) -> pd.DataFrame:
    """Pairs x weighting schemes: mean ± std score per skill (or task) and the average."""
    skills = skills_of(df)
    df = with_average(df, skills)
    df = df.assign(pair=df.setting.str.split("@").str[0], weighting=df.setting.str.split("@").str[1].fillna("-"))
    g = df.groupby(["pair", "weighting"], sort=False)[[*skills, "average"]]
    mean, std = g.mean(), g.std(ddof=1).fillna(0)
    out = mean.round(1).astype(str) + " ± " + std.round(1).astype(str)
    out["seeds"] = g.size()
    return out.reset_index()


def plot_multi_teacher(df: pd.DataFrame, singles: pd.DataFrame | None = None):
    """Average exact match per pair and weighting scheme (bars with std), single teachers for reference."""
    skills = skills_of(df)
    df = with_average(df, skills)
    df = df.assign(pair=df.setting.str.split("@").str[0], weighting=df.setting.str.split("@").str[1])
    pairs, schemes = list(dict.fromkeys(df.pair)), list(dict.fromkeys(df.weighting))
    fig, axes = plt.subplots(1, len(skills), figsize=(6.5 * len(skills), 4), sharey=False, squeeze=False)
    axes = axes[0]
    for ax, metric in zip(axes, skills):
        width = 0.8 / len(schemes)
        for j, w in enumerate(schemes):
            sub = df[df.weighting == w]
            mean = [sub[sub.pair == p][metric].mean() for p in pairs]
            std = [sub[sub.pair == p][metric].std(ddof=1) for p in pairs]
            ax.bar([i + (j - (len(schemes) - 1) / 2) * width for i in range(len(pairs))], mean, width=width,
                   yerr=std, capsize=2, label=w)
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


def multi_teacher_findings(df: pd.DataFrame, singles: pd.DataFrame) -> dict:
    """The paper's three multi-teacher findings, each with our numbers and whether it held."""
    df = with_average(df, skills_of(df))
    s = with_average(singles, skills_of(singles))
    avg = df.groupby("setting")["average"].mean()
    out = {}
    pairs = sorted({x.split("@")[0] for x in avg.index if "@" in x})
    wins = {}
    for p in pairs:
        static = avg.get(f"{p}@static")
        tuned = avg.get(f"{p}@static_tuned")
        adaptive = {w: avg[f"{p}@{w}"] for w in ("ce", "entropy", "max_prob") if f"{p}@{w}" in avg}
        if static is not None and adaptive:
            best_static = max(x for x in (static, tuned) if x is not None)
            wins[p] = {"static": round(static, 2), **({"static tuned": round(tuned, 2)} if tuned is not None else {}),
                       "best adaptive": round(max(adaptive.values()), 2),
                       "static wins": bool(best_static >= max(adaptive.values()))}
    out["1. static beats adaptive"] = {"per pair": wins,
                                       "held": bool(wins) and all(v["static wins"] for v in wins.values())}
    best_single = s[s.setting != "ce_only"].groupby("setting")["average"].mean()   # teachers only, not CE alone
    comp = avg.get("phi_hkl+llama_kl@static")
    if comp is not None and len(best_single):
        out["2. complementary pair beats the best single teacher"] = {
            "phi_hkl+llama_kl (static)": round(comp, 2), "best single": best_single.idxmax(),
            "best single avg": round(best_single.max(), 2), "delta": round(comp - best_single.max(), 2),
            "paper delta": 1.3, "held": bool(comp > best_single.max())}
    over = avg.get("phi_hkl+qwen3_pkl@static")
    if comp is not None and over is not None:
        out["3. overlapping pair (Phi + Qwen3) is worse than Phi + Llama"] = {
            "phi_hkl+qwen3_pkl (static)": round(over, 2), "phi_hkl+llama_kl (static)": round(comp, 2),
            "held": bool(over < comp)}
    return out


# ---- results/REPORT.md ---------------------------------------------------------------------------

def md_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no extra dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join("" if (isinstance(v, float) and v != v) else str(v) for v in r) + " |")
    return "\n".join(lines)


def _held(x: bool) -> str:
    return "**reproduced**" if x else "**not reproduced**"


def build_report(results_dir, scale: str = "mini") -> str:
    """results/REPORT.md from the files notebooks 01-04 wrote: what reproduced and what did not."""
    r = Path(results_dir)
    p3, p4 = ("03", "04") if scale == "mini" else (f"03_{scale}", f"04_{scale}")
    name = lambda f: f.replace("03_", p3 + "_", 1).replace("04_", p4 + "_", 1)  # noqa: E731
    out = [f"# X-Token reproduction report ({scale} scale)", "",
           "Generated by `notebooks/05_evaluation_tables.ipynb` from the files in `results/` "
           "(produced by `make reproduce`). Paper numbers: arXiv 2605.21699, Llama-3.2-1B student. "]
    if scale == "mini":
        out[-1] += ("The miniature replaces GSM8k by a synthetic arithmetic skill and the 5-benchmark average by the "
                    "average of arithmetic and knowledge exact match; absolute numbers are not comparable, directions are.")
    meta = json.loads((r / name("03_results.json")).read_text()) if scale != "mini" and (r / name("03_results.json")).exists() else {}
    standin = bool(meta.get("standin"))
    if scale != "mini":
        tasks = meta.get("config", {}).get("tasks", {})
        out[-1] += ("Paper scale: the real trainer on the checkpoints named in the run records, scored by lm-eval on "
                    + (", ".join(f"{t} ({n}-shot)" for t, n in tasks.items()) or "the configured tasks")
                    + "; 'average' is the mean over these tasks, which stand in for the paper's unnamed five.")
        if meta.get("standin"):
            out += ["", "**Stand-in run**: random-weight models of the real classes and vocabulary sizes, a local "
                    "corpus and local tasks, 2 steps per setting. The numbers test the code path end to end; they "
                    "say nothing about the paper's claims."]
    out += [""]
    if (r / "02_table8.csv").exists():
        t8 = pd.read_csv(r / "02_table8.csv")
        exact = all(t8[c].equals(t8[c.replace("(ours)", "(paper)")]) for c in t8.columns
                    if "(ours)" in c and c.replace("(ours)", "(paper)") in t8.columns)
        out += ["## Table 8: numeral coverage of GOLD's common set", "", md_table(t8), "",
                f"Table 8 with the real vocabularies: {_held(exact)} exactly.", ""]
    if (r / "01_w_summary.json").exists():
        w = json.loads((r / "01_w_summary.json").read_text())
        out += ["## W", ""] + [f"- Llama-3.2 → {k}: {v['exact']:,} exact, {v['special']} special, {v['multi']:,} multi-token, "
                               f"{v['empty']} empty rows ({v['empty_by_reason']})." for k, v in w.items()] + [""]
    if (r / name("03_table.csv")).exists():
        if scale == "mini":
            out += ["## Single-teacher distillation (notebook 03)", "",
                    "Exact match in % (mean ± std over seeds); `numeral mass`: the student's probability mass on "
                    "multi-digit numeral tokens at numeral positions; `digit-split`: share of generated multi-digit "
                    "numbers written digit by digit.", "", md_table(pd.read_csv(r / name("03_table.csv"))), "",
                    f"![scores]({name('03_scores.png')})", "", f"![numeral mass]({name('03_numeral_mass.png')})", ""]
        else:
            out += ["## Single-teacher distillation (notebook 03)", "", "Scores in % (mean ± std over seeds), each "
                    "task by its usual metric (`xtoken.paper.TASK_METRICS`).", "",
                    md_table(pd.read_csv(r / name("03_table.csv"))), "", f"![scores]({name('03_scores.png')})", ""]
    if (r / name("03_deltas.csv")).exists() and "verdict" in pd.read_csv(r / name("03_deltas.csv")).columns:
        d = pd.read_csv(r / name("03_deltas.csv"), keep_default_na=False, na_values={"paper Δ": [""]})
        out += ["### Every comparison, with its interval and verdict", "",
                "Seed-paired differences A - B (exact match in points) over the same seeds and test items; 95% interval "
                "from a bootstrap over seeds and items; MDE: the difference this design detects with 80% power "
                "(`xtoken.stats`). Verdict, a rule fixed in code: **reproduced** (interval excludes 0, the paper's sign), "
                "**contradicted** (excludes 0, the opposite sign), **inconclusive** (includes 0). The paper's Δ is its "
                "5-benchmark average for `average` and its GSM8k for `arithmetic`; knowledge has no counterpart in the "
                "paper. `same answer`: share of seed-paired items on which A and B give the same answer.", "",
                md_table(d[[c for c in d.columns if c not in ("A", "B", "lo", "hi", "unit")]]), ""]
        out += verdict_lines(d) + [""]
        claims = d[(d["paper Δ"] == d["paper Δ"]) & (d.metric.isin(["average", "arithmetic"]))]
        counts = claims.verdict.value_counts()
        out += [f"Of {len(claims)} paper claims tested here (comparison × average / arithmetic): "
                + ", ".join(f"{counts.get(v, 0)} {v}" for v in ("reproduced", "contradicted", "inconclusive")) + ".", ""]
    elif (r / name("03_deltas.csv")).exists():
        d = pd.read_csv(r / name("03_deltas.csv"))
        out += ["### The paper's headline comparisons", "", md_table(d), ""]
        if standin:
            out += ["No verdicts: stand-in models say nothing about the paper's claims.", ""]
        else:
            out += [f"- {row['comparison']}: ours {row['Δaverage (ours)']} on the average vs the paper's "
                    f"{row['paper Δavg']:+.2f}: direction {_held(bool(row['same sign as paper']))}." for _, row in d.iterrows()]
            out += ["", "A direction 'reproduced' with a difference inside the seed spread (±) is not evidence either way.", ""]
    runs = pd.read_csv(r / name("03_runs.csv")) if (r / name("03_runs.csv")).exists() else None
    if runs is not None and "numeral_mass" in runs:      # the miniature's numeral diagnostics
        m = runs.groupby("setting")["numeral_mass"].mean()
        if {"gold_qwen3", "pkl_qwen3", "ce_only"} <= set(m.index):
            held = m["gold_qwen3"] < 0.5 * m["ce_only"] and m["pkl_qwen3"] > m["gold_qwen3"]
            out += ["### The mechanism (Proposition 1)", "",
                    f"Multi-digit numeral mass: CE only {m['ce_only']:.3f}, GOLD (Qwen3) {m['gold_qwen3']:.3f}, "
                    f"P-KL (Qwen3) {m['pkl_qwen3']:.3f}"
                    + (f", GOLD (Phi) {m['gold_phi']:.3f}" if "gold_phi" in m else "") +
                    f". Criterion, fixed before the first run: GOLD's mass below half of CE-only's "
                    f"({m['ce_only'] / 2:.3f}) and P-KL's above GOLD's: {_held(bool(held))}. GOLD's mass is "
                    f"{abs(100 * (1 - m['gold_qwen3'] / m['ce_only'])):.0f}% "
                    f"{'below' if m['gold_qwen3'] < m['ce_only'] else 'above'} CE-only's"
                    + (" (the direction of Proposition 1)." if m["gold_qwen3"] < m["ce_only"] else
                       " (against Proposition 1's direction).")
                    + ("" if held or m["gold_qwen3"] >= m["ce_only"] else " The fall is short of the bar."), ""]
    if (r / name("03_diagnostic.json")).exists():
        diag = json.loads((r / name("03_diagnostic.json")).read_text())
        if diag:
            out += ["### Higher gold likelihood, worse greedy decoding: where the answers go wrong", "",
                    "Each cross-tokenizer student against CE only on the arithmetic items: exact match, whole-solution "
                    "match of the greedy generation, and the teacher-forced log-probability of the gold solution and of "
                    "its answer line; then per item kind, which digit of a wrong answer differs first, and how many wrong "
                    "answers fall in the gold's group (same first digit; same top teacher token in W's row).", "",
                    md_table(pd.DataFrame(diag["comparisons"])[["comparison", "metric", "unit", "Δ ours", "95% interval",
                                                                 "MDE", "verdict"]]), ""]
            out += diagnostic_prose(diag) + [""]
    if (r / name("03_learned_w.json")).exists():
        lw = json.loads((r / name("03_learned_w.json")).read_text())
        comp = pd.DataFrame(lw["comparison"])
        out += ["### P-KL with a learned W", "",
                "W's multi-token rows fine-tuned with the student under P-KL (fixed pattern, softmax rows, "
                f"lr {lw['projection_lr']}, fixed before the run), same seeds and hyperparameters as the fixed-W row.", ""]
        if len(comp):
            out += [md_table(comp), ""]
            arith = comp.iloc[0]        # the first skill: arithmetic (mini), the first task (paper)
            d = float(arith["Δ learned - fixed"].split("±")[0])
            spread = float(arith["Δ learned - fixed"].split("±")[1])
            what = "arithmetic exact match" if arith.metric == "arithmetic" else f"{arith.metric} score"
            dl = (pd.read_csv(r / name("03_deltas.csv")) if (r / name("03_deltas.csv")).exists() else pd.DataFrame())
            lrow = dl[(dl.A == "pkl_learned_qwen3") & (dl.metric == "arithmetic")] if "verdict" in dl else dl.iloc[0:0]
            if len(lrow):
                x = lrow.iloc[0]
                out += [f"Learning W changed arithmetic exact match by {x['Δ ours']:+.2f} {x['95% interval']} points "
                        f"(MDE {x.MDE:.2f}): {x.verdict}.", ""]
            else:
                out += [f"Learning W changed {what} by {d:+.1f} points (± {spread:.1f} over seeds): "
                      + ("the same score in every seed: no effect on accuracy." if d == 0 and spread == 0 else
                         "inside the seed spread, so no measurable effect." if abs(d) <= spread else
                       ("it helped." if d > 0 else "it hurt.")), ""]
        if lw.get("summary"):
            out += [md_table(pd.DataFrame(lw["summary"])), ""]
        if lw.get("top_rows"):
            out += ["Rows that moved most (seed 0):", "", md_table(pd.DataFrame(lw["top_rows"]).query("seed == 0")), ""]
    if (r / name("04_results.json")).exists():
        f = json.loads((r / name("04_results.json")).read_text())["findings"]
        out += ["## Multi-teacher (notebook 04)", "", md_table(pd.read_csv(r / name("04_table.csv"))), "",
                f"![multi-teacher]({name('04_multi_teacher.png')})", ""]
        if (r / name("04_comparisons.csv")).exists():
            c = pd.read_csv(r / name("04_comparisons.csv"), keep_default_na=False, na_values={"paper Δ": [""]})
            out += ["Each finding as seed-paired comparisons (same interval, MDE and verdict rule as above); a finding is "
                    "reproduced when every one of its comparisons is, contradicted when any one is, inconclusive "
                    "otherwise (average rows).", "",
                    md_table(c[["finding", "comparison", "metric", "paper Δ", "Δ ours", "95% interval", "MDE", "verdict",
                                "same answer (%)"]]), ""]
            for k, v in f.items():
                if "verdict" in v:
                    out.append(f"- {k}: **{v['verdict']}** ({v['comparisons']} comparisons: "
                               + ", ".join(f"{a} {b}" for a, b in v["verdicts"].items()) + ")")
            out += ["", "GOLD on both cross-tokenizer teachers (`phi_gold+qwen3_gold`) is the pre-X-Token multi-teacher "
                    "baseline.", ""]
            return "\n".join(out) + "\n"
        for k, v in f.items():
            detail = ", ".join(f"{a}: {b}" for a, b in v.items() if a not in ("held", "per pair"))
            if "per pair" in v:     # finding 1: the numbers of each pair
                detail = "; ".join(f"{pair}: " + ", ".join(f"{a} {b}" for a, b in x.items() if a != "static wins")
                                   for pair, x in v["per pair"].items())
            out.append(f"- {k}: {'(stand-ins: no verdict)' if standin else _held(v['held'])} ({detail})")
        out += ["", "Seed spreads in these tables are 1-2 points: a difference under that is a direction, not a finding.",
                "GOLD on both cross-tokenizer teachers (`phi_gold+qwen3_gold`) is the pre-X-Token multi-teacher baseline.", ""]
    return "\n".join(out) + "\n"


def alignment_table(text: str, student_tok, teacher_tok) -> pd.DataFrame:
    """One sentence aligned (both tokenizers' own tokenization, BOS included where they add one):
    each chunk pair as readable strings, unpaired tokens as their own rows, in text order."""
    from .align import align
    s_ids = student_tok(text)["input_ids"]
    t_ids = teacher_tok(text)["input_ids"]
    a = align(s_ids, t_ids, student_tok, teacher_tok)
    rows = []
    for k, ((sa, sb), (ta, tb)) in enumerate(zip(a.student_spans.tolist(), a.teacher_spans.tolist())):
        text_bytes = a.chunk_bytes(k, student_tok, teacher_tok)[0]
        rows.append({"pos": sa, "text": text_bytes.decode("utf-8", "replace"),
                     "student tokens": " | ".join(student_tok.convert_ids_to_tokens(s_ids[sa:sb])),
                     "teacher tokens": " | ".join(teacher_tok.convert_ids_to_tokens(t_ids[ta:tb])),
                     "chunk": f"{sb - sa}:{tb - ta}"})
    for p in a.student_unpaired.tolist():
        rows.append({"pos": p - 0.5, "text": "", "student tokens": student_tok.convert_ids_to_tokens(s_ids[p]),
                     "teacher tokens": "(unpaired)", "chunk": "1:0"})
    for p in a.teacher_unpaired.tolist():
        rows.append({"pos": -0.5, "text": "", "student tokens": "(unpaired)",
                     "teacher tokens": teacher_tok.convert_ids_to_tokens(t_ids[p]), "chunk": "0:1"})
    return pd.DataFrame(rows).sort_values("pos", kind="stable").drop(columns="pos").reset_index(drop=True)


# ---- per-item comparisons: seed-paired differences, bootstrap intervals, verdicts (xtoken.stats) ---------------

# (name, setting A, setting B, the paper's A - B on its 5-benchmark average, on GSM8k or None): every comparison of
# notebook 03. The paper's numbers are its Tables 1-2 (PAPER_TABLE1 and the deltas it headlines).
def _paper_gsm8k(a: str, b: str):
    pa, pb = PAPER_TABLE1.get(a), PAPER_TABLE1.get(b)
    return round(pa[1] - pb[1], 2) if pa and pb else None


SINGLE_COMPARISONS = [(name, a, b, paper, _paper_gsm8k(a, b)) for name, a, b, paper in PAPER_DELTAS] + [
    ("same-tokenizer KD vs CE only", "kd_llama", "ce_only", 1.77, _paper_gsm8k("kd_llama", "ce_only")),
    ("P-KL (Qwen3) vs CE only", "pkl_qwen3", "ce_only", 2.22, _paper_gsm8k("pkl_qwen3", "ce_only")),
    ("GOLD (Qwen3) vs CE only", "gold_qwen3", "ce_only", -1.60, _paper_gsm8k("gold_qwen3", "ce_only")),
    ("H-KL (Phi-mini) vs CE only", "hkl_phi", "ce_only", 2.55, _paper_gsm8k("hkl_phi", "ce_only")),
    ("P-KL learned W vs fixed W, Qwen3", "pkl_learned_qwen3", "pkl_qwen3", None, None),
]
ITEM_FILE_COLUMNS = ["setting", "seed", "skill", "item", "kind", "gold", "pred", "exact_match", "solution_match",
                     "logp_solution", "logp_answer"]


def load_items(work_dir, settings=None) -> pd.DataFrame:
    """The per-item scores of every run (``runs/<setting>/seed<k>/items.csv``) under a miniature's work dir, with
    setting and seed columns (empty when the runs have none, e.g. at paper scale)."""
    frames = []
    for f in sorted(Path(work_dir).glob("runs/*/seed*/items.csv")):
        setting, seed = f.parent.parent.name, int(f.parent.name[len("seed"):])
        if settings is None or setting in settings:
            frames.append(pd.read_csv(f, dtype={"gold": str, "pred": str}, keep_default_na=False,
                                      na_values={"logp_solution": [""], "logp_answer": [""]}).assign(setting=setting, seed=seed))
    if not frames:
        return pd.DataFrame(columns=ITEM_FILE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[ITEM_FILE_COLUMNS]


def save_items(items: pd.DataFrame, path) -> Path:
    """The per-item scores as a gzip CSV with fixed bytes for the same content (results/0x_items.csv.gz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = items[ITEM_FILE_COLUMNS].round({"logp_solution": 4, "logp_answer": 4})
    items.to_csv(path, index=False, compression={"method": "gzip", "mtime": 0})
    return path


def read_items(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"gold": str, "pred": str}, keep_default_na=False,
                       na_values={"logp_solution": [""], "logp_answer": [""]})


_METRICS = {   # metric -> (item column, skills, scale, unit)
    "arithmetic": ("exact_match", ("arithmetic",), 100, "points"),
    "knowledge": ("exact_match", ("knowledge",), 100, "points"),
    "average": ("exact_match", ("arithmetic", "knowledge"), 100, "points"),
    "arithmetic, first 200 items": ("exact_match", ("arithmetic",), 100, "points"),
    "arithmetic solution match": ("solution_match", ("arithmetic",), 100, "points"),
    "arithmetic log p(gold solution)": ("logp_solution", ("arithmetic",), 1, "nats"),
    "arithmetic log p(gold answer line)": ("logp_answer", ("arithmetic",), 1, "nats"),
}


def _agreement(items: pd.DataFrame, a: str, b: str, skills) -> float:
    """Share (%) of seed-paired items on which A and B give the same extracted answer."""
    sub = items[items.skill.isin(list(skills))]
    A = sub[sub.setting == a].set_index(["seed", "skill", "item"]).pred
    B = sub[sub.setting == b].set_index(["seed", "skill", "item"]).pred
    j = A.index.intersection(B.index)
    return round(100 * float((A.loc[j] == B.loc[j]).mean()), 1) if len(j) else float("nan")


def comparison_rows(items: pd.DataFrame, name: str, a: str, b: str, metrics=("arithmetic", "knowledge", "average"),
                    paper: dict | None = None, n_boot: int = 2000) -> list[dict]:
    """One comparison A - B on each metric: the seed-paired difference, its 95% bootstrap interval over seeds and
    items, the MDE and the verdict (`xtoken.stats.verdict` against ``paper[metric]``'s sign; no paper number:
    'A higher' / 'B higher' / 'inconclusive')."""
    from .stats import compare
    paper = paper or {}
    rows = []
    for m in metrics:
        col, skills, scale, unit = _METRICS[m]
        sub = items[items.item < 200] if m.endswith("first 200 items") else items
        p = paper.get(m)     # a number, "> 0" / "< 0" (the paper's sign without a number), or None (no claim)
        sign = None if p is None else (1 if p.startswith(">") else -1) if isinstance(p, str) else p
        r = compare(sub, a, b, col, skills, paper_sign=sign, scale=scale, n_boot=n_boot)
        rows.append({"comparison": name, "A": a, "B": b, "metric": m, "unit": unit,
                     "paper Δ": (f"{p:+.2f}" if isinstance(p, (int, float)) else p) if p is not None else "",
                     "Δ ours": round(r["estimate"], 2),
                     "95% interval": f"[{r['lo']:+.2f}, {r['hi']:+.2f}]", "lo": round(r["lo"], 2),
                     "hi": round(r["hi"], 2), "MDE": round(r["mde"], 2), "verdict": r["verdict"],
                     "same answer (%)": _agreement(items, a, b, skills), "seeds": r["n_seeds"], "items": r["n_items"]})
    return rows


def single_teacher_comparisons(items: pd.DataFrame, comparisons=SINGLE_COMPARISONS, n_boot: int = 2000) -> pd.DataFrame:
    """Every comparison of notebook 03 on arithmetic, knowledge and their average (only those whose settings ran).
    The paper's sign: its Δavg for the average, its ΔGSM8k for arithmetic (where it gives both); knowledge has no
    counterpart in the paper."""
    present = set(items.setting)
    rows = []
    for name, a, b, p_avg, p_gsm in comparisons:
        if {a, b} <= present:
            rows += comparison_rows(items, name, a, b, paper={"average": p_avg, "arithmetic": p_gsm}, n_boot=n_boot)
    return pd.DataFrame(rows)


def multi_teacher_comparisons(items: pd.DataFrame, n_boot: int = 2000) -> tuple[pd.DataFrame, dict]:
    """The paper's three multi-teacher findings as seed-paired comparisons (``items``: multi-teacher and single-
    teacher runs together), each with a verdict per comparison and one for the finding (`combine_verdicts` over
    its average rows):

    1. static beats adaptive: ``<pair>@static`` vs ``<pair>@<ce|entropy|max_prob>`` for every pair run with both
    2. the complementary pair beats the best single teacher: ``phi_hkl+llama_kl@static`` vs every single teacher
       (all single-teacher settings but CE only and the learned W); it must beat each of them
    3. the overlapping pair is worse: ``phi_hkl+llama_kl@static`` vs ``phi_hkl+qwen3_pkl@static``
    """
    from .stats import combine_verdicts
    present = set(items.setting)
    rows, findings = [], {}

    def add(finding, name, a, b, paper):
        if {a, b} <= present:
            rows.extend(dict(r, finding=finding) for r in comparison_rows(items, name, a, b, paper={"average": paper},
                                                                          n_boot=n_boot))
    pairs = sorted({s.split("@")[0] for s in present if s.endswith("@static")})
    f1 = "1. static beats adaptive"
    for p in pairs:
        for w in ("ce", "entropy", "max_prob"):
            add(f1, f"{p}: static vs {w}", f"{p}@static", f"{p}@{w}", "> 0")
    f2 = "2. complementary pair beats the best single teacher"
    comp = "phi_hkl+llama_kl@static"
    singles = [s for s in dict.fromkeys(items.setting) if "@" not in s and s not in ("ce_only", "base")
               and "learned" not in s]
    for s in singles:
        add(f2, f"Phi H-KL + Llama KL vs {s}", comp, s, 1.3 if s == "hkl_phi" else "> 0")
    f3 = "3. overlapping pair (Phi + Qwen3) is worse than Phi + Llama"
    add(f3, "Phi + Llama vs Phi + Qwen3 (static)", comp, "phi_hkl+qwen3_pkl@static", "> 0")
    df = pd.DataFrame(rows)
    for f in (f1, f2, f3):
        sub = df[(df.finding == f) & (df.metric == "average")] if len(df) else df
        if len(sub):
            findings[f] = {"verdict": combine_verdicts(sub.verdict), "comparisons": len(sub),
                           "verdicts": dict(zip(sub.comparison, sub.verdict))}
    return df, findings


def verdict_lines(df: pd.DataFrame, metrics=("average", "arithmetic")) -> list[str]:
    """Plain-words lines: one per comparison and metric in ``metrics`` that has a paper claim, and the average of
    the comparisons the paper makes no claim about."""
    out = []
    for _, r in df.iterrows():
        p = r["paper Δ"]
        paper = "" if p != p or p == "" else f"{p:+.2f}" if isinstance(p, (int, float)) else str(p)
        ours = f"ours {r['Δ ours']:+.2f} {r['95% interval']} {r.unit} (MDE {r.MDE:.2f})"
        if paper and r.metric in metrics:
            out.append(f"- {r.comparison}, {r.metric}: {ours} vs the paper's {paper}: **{r.verdict}**.")
        elif not paper and r.metric == "average":
            out.append(f"- {r.comparison}, {r.metric}: {ours}; the paper makes no claim: {r.verdict}.")
    return out


KIND_ORDER = ("copy", "compare", "increment", "decrement", "count")


def greedy_diagnostic(items: pd.DataFrame, groups: dict | None = None, reference: str = "ce_only",
                      settings=("pkl_qwen3", "hkl_qwen3"), n_boot: int = 2000) -> dict:
    """Why a cross-tokenizer student can put more probability on the gold solution than CE only and still decode
    greedily worse: per setting vs ``reference``, the seed-paired differences of exact match, solution match and
    teacher-forced log p (whole solution, answer line), overall and per item kind; and where wrong answers go
    wrong (`xtoken.mini.items.error_breakdown`: which digit, same W group as the gold). JSON-ready."""
    from .mini.items import error_breakdown
    present = [s for s in settings if s in set(items.setting)]
    if reference not in set(items.setting) or not present:
        return {}
    rows = []
    for s in present:
        rows += comparison_rows(items, f"{s} vs {reference}", s, reference, n_boot=n_boot,
                                metrics=("arithmetic", "arithmetic solution match", "arithmetic log p(gold solution)",
                                         "arithmetic log p(gold answer line)"))
        for kind in KIND_ORDER:
            sub = items[(items.skill == "arithmetic") & (items.kind == kind)]
            if len(sub):
                rows += [dict(r, metric=f"arithmetic: {kind}") for r in
                         comparison_rows(sub, f"{s} vs {reference}", s, reference, metrics=("arithmetic",), n_boot=n_boot)]
    eb = error_breakdown(items, [reference, *present], groups)
    return {"comparisons": rows,
            "by_kind": eb["by_kind"].round(2).reset_index().to_dict(orient="records"),
            "by_digit": eb["by_digit"].round(2).reset_index().to_dict(orient="records"),
            "group": eb["group"].round(2).reset_index().rename(columns={"index": "measure"}).to_dict(orient="records"),
            "teacher_forced": eb["teacher_forced"].round(3).reset_index().to_dict(orient="records"),
            "kind_share": (100 * items[(items.skill == "arithmetic") & (items.setting == reference)
                                       & (items.seed == items.seed.min())].kind.value_counts(normalize=True)).round(1).to_dict()}


def diagnostic_prose(diag: dict, reference: str = "ce_only") -> list[str]:
    """The diagnostic in plain words, generated from `greedy_diagnostic`'s numbers."""
    if not diag:
        return []
    c = pd.DataFrame(diag["comparisons"])
    out = []
    grp = {r["measure"]: r for r in diag["group"]}
    for s in dict.fromkeys(c.A):
        g = c[c.A == s].set_index("metric")
        em, lp, la, sm = (g.loc[m] for m in ("arithmetic", "arithmetic log p(gold solution)",
                                             "arithmetic log p(gold answer line)", "arithmetic solution match"))
        kinds = g[g.index.str.startswith("arithmetic: ")]
        worst = kinds["Δ ours"].idxmin()
        out.append(f"- {s} vs {reference}: exact match {em['Δ ours']:+.2f} {em['95% interval']} points ({em.verdict}), "
                   f"whole-solution match {sm['Δ ours']:+.2f} {sm['95% interval']} ({sm.verdict}); teacher-forced log p of "
                   f"the gold solution {lp['Δ ours']:+.3f} {lp['95% interval']} nats ({lp.verdict}), of the answer line "
                   f"{la['Δ ours']:+.3f} {la['95% interval']} ({la.verdict}). By item kind the largest change is on "
                   f"{worst.split(': ')[1]} items ({kinds.loc[worst, 'Δ ours']:+.2f} {kinds.loc[worst, '95% interval']}).")
    share = diag.get("kind_share", {})
    if share:
        out.append("- Share of item kinds in the arithmetic test set: "
                   + ", ".join(f"{k} {share[k]:.0f}%" for k in KIND_ORDER if k in share) + ".")
    tf = {r["setting"]: r for r in diag["teacher_forced"]}
    if tf:
        out.append("- Exact match per kind (%, pooled over seeds): " + "; ".join(
            f"{r['kind']}: " + ", ".join(f"{s} {r[s]:.1f}" for s in tf) for r in diag["by_kind"]) + ".")
    dig = {r["where"]: r for r in diag["by_digit"]}
    if dig and tf:
        out.append("- Where wrong answers differ first from the gold (% of wrong answers): " + "; ".join(
            f"{s}: " + ", ".join(f"{w} {dig[w][s]:.0f}" for w in dig) for s in tf) + ".")
    if grp and tf:
        parts = []
        for s in tf:
            row = f"{s}: {grp['same first digit as gold (%)'][s]:.0f}% same first digit"
            if "same W top teacher token as gold (%)" in grp:
                row += f", {grp['same W top teacher token as gold (%)'][s]:.0f}% same W top teacher token"
            parts.append(row)
        out.append("- Wrong numeral answers in the gold's group: " + "; ".join(parts) + ".")
    key = "same W top teacher token as gold (%)"
    if grp and tf and dig and key in grp and reference in tf:
        for s in dict.fromkeys(c.A):
            g = c[c.A == s].set_index("metric")
            em, lp = g.loc["arithmetic"], g.loc["arithmetic log p(gold solution)"]
            kinds = g[g.index.str.startswith("arithmetic: ")]
            worst = kinds["Δ ours"].idxmin().split(": ")[1]
            late = lambda x: dig["tens"][x] + dig["units"][x]   # noqa: E731
            if em.lo > 0 or em.hi >= 0 or lp.lo <= 0:
                continue
            out.append(f"- In plain words: {s} puts more teacher-forced probability on the gold solution than "
                       f"{reference} ({lp['Δ ours']:+.2f} nats) and still decodes greedily worse ({em['Δ ours']:+.2f} "
                       f"points), most of it on {worst} items. Its wrong answers stay in the gold's W group (same top "
                       f"teacher token in W's row) {grp[key][s]:.0f}% of the time against {grp[key][reference]:.0f}% for "
                       f"{reference}, and differ first in the tens or units digit {late(s):.0f}% of the time against "
                       f"{late(reference):.0f}%: the projected teacher signal "
                       + ("pins down a numeral's group (its first digit), and the student then picks the wrong numeral "
                          "inside that group." if grp[key][s] > grp[key][reference] else
                          "does not keep the student's wrong answers closer to the gold's group."))
    return out
