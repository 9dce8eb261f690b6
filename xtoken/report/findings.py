"""The findings: seed-paired comparisons with bootstrap intervals and verdicts (`xtoken.stats`), the paper's
multi-teacher findings, and the diagnostic of higher gold likelihood with worse greedy decoding."""

from __future__ import annotations

import pandas as pd

from .paper_numbers import PAPER_MULTI_TEACHER_GAIN, SINGLE_COMPARISONS
from .tables import skills_of, with_average


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
            wins[p] = {
                "static": round(static, 2),
                **({"static tuned": round(tuned, 2)} if tuned is not None else {}),
                "best adaptive": round(max(adaptive.values()), 2),
                "static wins": bool(best_static >= max(adaptive.values())),
            }
    out["1. static beats adaptive"] = {
        "per pair": wins,
        "held": bool(wins) and all(v["static wins"] for v in wins.values()),
    }
    best_single = s[s.setting != "ce_only"].groupby("setting")["average"].mean()  # teachers only, not CE alone
    comp = avg.get("phi_hkl+llama_kl@static")
    if comp is not None and len(best_single):
        out["2. complementary pair beats the best single teacher"] = {
            "phi_hkl+llama_kl (static)": round(comp, 2),
            "best single": best_single.idxmax(),
            "best single avg": round(best_single.max(), 2),
            "delta": round(comp - best_single.max(), 2),
            "paper delta": PAPER_MULTI_TEACHER_GAIN,
            "held": bool(comp > best_single.max()),
        }
    over = avg.get("phi_hkl+qwen3_pkl@static")
    if comp is not None and over is not None:
        out["3. overlapping pair (Phi + Qwen3) is worse than Phi + Llama"] = {
            "phi_hkl+qwen3_pkl (static)": round(over, 2),
            "phi_hkl+llama_kl (static)": round(comp, 2),
            "held": bool(over < comp),
        }
    return out


_METRICS = {  # metric -> (item column, skills, scale, unit)
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


def comparison_rows(
    items: pd.DataFrame,
    name: str,
    a: str,
    b: str,
    metrics=("arithmetic", "knowledge", "average"),
    paper: dict | None = None,
    n_boot: int = 2000,
) -> list[dict]:
    """One comparison A - B on each metric: the seed-paired difference, its 95% bootstrap interval over seeds and
    items, the MDE and the verdict (`xtoken.stats.verdict` against ``paper[metric]``'s sign; no paper number:
    'A higher' / 'B higher' / 'inconclusive')."""
    from ..stats import compare

    paper = paper or {}
    rows = []
    for m in metrics:
        col, skills, scale, unit = _METRICS[m]
        sub = items[items.item < 200] if m.endswith("first 200 items") else items
        p = paper.get(m)  # a number, "> 0" / "< 0" (the paper's sign without a number), or None (no claim)
        sign = None if p is None else (1 if p.startswith(">") else -1) if isinstance(p, str) else p
        r = compare(sub, a, b, col, skills, paper_sign=sign, scale=scale, n_boot=n_boot)
        rows.append(
            {
                "comparison": name,
                "A": a,
                "B": b,
                "metric": m,
                "unit": unit,
                "paper Δ": (f"{p:+.2f}" if isinstance(p, (int, float)) else p) if p is not None else "",
                "Δ ours": round(r["estimate"], 2),
                "95% interval": f"[{r['lo']:+.2f}, {r['hi']:+.2f}]",
                "lo": round(r["lo"], 2),
                "hi": round(r["hi"], 2),
                "MDE": round(r["mde"], 2),
                "verdict": r["verdict"],
                "same answer (%)": _agreement(items, a, b, skills),
                "seeds": r["n_seeds"],
                "items": r["n_items"],
            }
        )
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
    from ..stats import combine_verdicts

    present = set(items.setting)
    rows, findings = [], {}

    def add(finding, name, a, b, paper):
        if {a, b} <= present:
            rows.extend(
                dict(r, finding=finding)
                for r in comparison_rows(items, name, a, b, paper={"average": paper}, n_boot=n_boot)
            )

    pairs = sorted({s.split("@")[0] for s in present if s.endswith("@static")})
    f1 = "1. static beats adaptive"
    for p in pairs:
        for w in ("ce", "entropy", "max_prob"):
            add(f1, f"{p}: static vs {w}", f"{p}@static", f"{p}@{w}", "> 0")
    f2 = "2. complementary pair beats the best single teacher"
    comp = "phi_hkl+llama_kl@static"
    singles = [
        s for s in dict.fromkeys(items.setting) if "@" not in s and s not in ("ce_only", "base") and "learned" not in s
    ]
    for s in singles:
        add(f2, f"Phi H-KL + Llama KL vs {s}", comp, s, PAPER_MULTI_TEACHER_GAIN if s == "hkl_phi" else "> 0")
    f3 = "3. overlapping pair (Phi + Qwen3) is worse than Phi + Llama"
    add(f3, "Phi + Llama vs Phi + Qwen3 (static)", comp, "phi_hkl+qwen3_pkl@static", "> 0")
    df = pd.DataFrame(rows)
    for f in (f1, f2, f3):
        sub = df[(df.finding == f) & (df.metric == "average")] if len(df) else df
        if len(sub):
            findings[f] = {
                "verdict": combine_verdicts(sub.verdict),
                "comparisons": len(sub),
                "verdicts": dict(zip(sub.comparison, sub.verdict)),
            }
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


KIND_ORDER = ("copy", "compare", "add", "count")


def greedy_diagnostic(
    items: pd.DataFrame,
    groups: dict | None = None,
    reference: str = "ce_only",
    settings=("pkl_qwen3", "hkl_qwen3"),
    n_boot: int = 2000,
) -> dict:
    """Why a cross-tokenizer student can put more probability on the gold solution than CE only and still decode
    greedily worse: per setting vs ``reference``, the seed-paired differences of exact match, solution match and
    teacher-forced log p (whole solution, answer line), overall and per item kind; and where wrong answers go
    wrong (`xtoken.mini.items.error_breakdown`: which digit, same W group as the gold). JSON-ready."""
    from ..mini.items import error_breakdown

    present = [s for s in settings if s in set(items.setting)]
    if reference not in set(items.setting) or not present:
        return {}
    rows = []
    for s in present:
        rows += comparison_rows(
            items,
            f"{s} vs {reference}",
            s,
            reference,
            n_boot=n_boot,
            metrics=(
                "arithmetic",
                "arithmetic solution match",
                "arithmetic log p(gold solution)",
                "arithmetic log p(gold answer line)",
            ),
        )
        for kind in KIND_ORDER:
            sub = items[(items.skill == "arithmetic") & (items.kind == kind)]
            if len(sub):
                rows += [
                    dict(r, metric=f"arithmetic: {kind}")
                    for r in comparison_rows(
                        sub, f"{s} vs {reference}", s, reference, metrics=("arithmetic",), n_boot=n_boot
                    )
                ]
    eb = error_breakdown(items, [reference, *present], groups)
    return {
        "comparisons": rows,
        "by_kind": eb["by_kind"].round(2).reset_index().to_dict(orient="records"),
        "by_digit": eb["by_digit"].round(2).reset_index().to_dict(orient="records"),
        "group": eb["group"].round(2).reset_index().rename(columns={"index": "measure"}).to_dict(orient="records"),
        "teacher_forced": eb["teacher_forced"].round(3).reset_index().to_dict(orient="records"),
        "kind_share": (
            100
            * items[
                (items.skill == "arithmetic") & (items.setting == reference) & (items.seed == items.seed.min())
            ].kind.value_counts(normalize=True)
        )
        .round(1)
        .to_dict(),
    }


def diagnostic_prose(diag: dict, reference: str = "ce_only") -> list[str]:
    """The diagnostic in plain words, generated from `greedy_diagnostic`'s numbers."""
    if not diag:
        return []
    c = pd.DataFrame(diag["comparisons"])
    out = []
    grp = {r["measure"]: r for r in diag["group"]}
    for s in dict.fromkeys(c.A):
        g = c[c.A == s].set_index("metric")
        em, lp, la, sm = (
            g.loc[m]
            for m in (
                "arithmetic",
                "arithmetic log p(gold solution)",
                "arithmetic log p(gold answer line)",
                "arithmetic solution match",
            )
        )
        kinds = g[g.index.str.startswith("arithmetic: ")]
        worst = kinds["Δ ours"].idxmin()
        out.append(
            f"- {s} vs {reference}: exact match {em['Δ ours']:+.2f} {em['95% interval']} points ({em.verdict}), "
            f"whole-solution match {sm['Δ ours']:+.2f} {sm['95% interval']} ({sm.verdict}); teacher-forced log p of "
            f"the gold solution {lp['Δ ours']:+.3f} {lp['95% interval']} nats ({lp.verdict}), of the answer line "
            f"{la['Δ ours']:+.3f} {la['95% interval']} ({la.verdict}). By item kind the largest change is on "
            f"{worst.split(': ')[1]} items ({kinds.loc[worst, 'Δ ours']:+.2f} {kinds.loc[worst, '95% interval']})."
        )
    share = diag.get("kind_share", {})
    if share:
        out.append(
            "- Share of item kinds in the arithmetic test set: "
            + ", ".join(f"{k} {share[k]:.0f}%" for k in KIND_ORDER if k in share)
            + "."
        )
    tf = {r["setting"]: r for r in diag["teacher_forced"]}
    if tf:
        out.append(
            "- Exact match per kind (%, pooled over seeds): "
            + "; ".join(f"{r['kind']}: " + ", ".join(f"{s} {r[s]:.1f}" for s in tf) for r in diag["by_kind"])
            + "."
        )
    dig = {r["where"]: r for r in diag["by_digit"]}
    if dig and tf:
        out.append(
            "- Where wrong answers differ first from the gold (% of wrong answers): "
            + "; ".join(f"{s}: " + ", ".join(f"{w} {dig[w][s]:.0f}" for w in dig) for s in tf)
            + "."
        )
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
            late = lambda x: dig["tens"][x] + dig["units"][x]  # noqa: E731
            if em.lo > 0 or em.hi >= 0 or lp.lo <= 0:
                continue
            out.append(
                f"- In plain words: {s} puts more teacher-forced probability on the gold solution than "
                f"{reference} ({lp['Δ ours']:+.2f} nats) and still decodes greedily worse ({em['Δ ours']:+.2f} "
                f"points), most of it on {worst} items. Its wrong answers stay in the gold's W group (same top "
                f"teacher token in W's row) {grp[key][s]:.0f}% of the time against {grp[key][reference]:.0f}% for "
                f"{reference}, and differ first in the tens or units digit {late(s):.0f}% of the time against "
                f"{late(reference):.0f}%: the projected teacher signal "
                + (
                    "pins down a numeral's group (its first digit), and the student then picks the wrong numeral "
                    "inside that group."
                    if grp[key][s] > grp[key][reference]
                    else "does not keep the student's wrong answers closer to the gold's group."
                )
            )
    return out
