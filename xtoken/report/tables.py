"""The notebooks' tables: W summaries, Table 8 and the distillation grids beside the paper's numbers."""

from __future__ import annotations

import pandas as pd

from ..projection import EMPTY, KIND_NAMES, Projection
from .paper_numbers import PAPER_DELTAS, PAPER_TABLE1, PAPER_TABLE8


def short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def w_summary_table(projections: dict[str, Projection]) -> pd.DataFrame:
    """One row per teacher: rows exact / special / multi (by length) / empty (by reason)."""
    rows = []
    for teacher, W in projections.items():
        s = W.summary()
        rows.append(
            {
                "teacher": short(teacher),
                "student rows": s["rows"],
                "teacher columns": s["columns"],
                "exact": s["exact"],
                "special": s["special"],
                "multi": s["multi"],
                **{f"multi len {k}": v for k, v in s["multi_rows_by_length"].items()},
                "empty": s["empty"],
                **{f"empty: {k}": v for k, v in s["empty_by_reason"].items()},
            }
        )
    return pd.DataFrame(rows)


def explain_rows(W: Projection, tokens: list[str]) -> pd.DataFrame:
    """The W rows of some student tokens in readable strings."""
    out = []
    for tok in tokens:
        sid = W.student_tok.convert_tokens_to_ids(tok)
        row = W.row(sid)
        out.append(
            {
                "student token": tok,
                "id": sid,
                "kind": KIND_NAMES[int(W.row_kind[sid])],
                "teacher tokens": " + ".join(t for t, *_ in row) or "(empty)",
                "weights": ", ".join(f"{w:.4f}" for *_, w in row) or "-",
            }
        )
    return pd.DataFrame(out)


def too_long_examples(W: Projection, n: int = 5, max_span: int | None = None) -> pd.DataFrame:
    """Student tokens whose teacher re-tokenization is longer than max_span (their rows stay empty)."""
    from ..canonical import token_bytes

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
            out.append(
                {
                    "student token": W.student_tok.convert_ids_to_tokens(s),
                    "text": text,
                    "teacher pieces": len(pieces),
                    "teacher tokens": " + ".join(pieces),
                }
            )
        if len(out) == n:
            break
    return pd.DataFrame(out)


def table8(audits: dict) -> pd.DataFrame:
    """Table 8 rows (2- and 3-digit numerals, punctuation, single digits), ours beside the paper's."""
    rows = []
    for teacher, audit in audits.items():
        t = audit.table.set_index("category")
        row = {"teacher": short(teacher)}
        for cat, label in (
            ("numeral_2digit", "2-digit"),
            ("numeral_3digit", "3-digit"),
            ("ascii_punctuation", "ASCII punct."),
            ("single_digit", "single digits"),
        ):
            row[f"{label} in C (ours)"] = f"{t.loc[cat, 'gold_common']}/{t.loc[cat, 'student_tokens']}"
            paper = PAPER_TABLE8.get(teacher, {}).get(cat)
            if paper:
                row[f"{label} in C (paper)"] = f"{paper[0]}/{paper[1]}"
        row["H-KL widened C, 3-digit"] = (
            f"{t.loc['numeral_3digit', 'hkl_common']}/{t.loc['numeral_3digit', 'student_tokens']}"
        )
        row["recommend"] = audit.recommend()[0]
        rows.append(row)
    return pd.DataFrame(rows)


MINI_SKILLS = ("arithmetic", "knowledge")


_NOT_SKILLS = {
    "setting",
    "label",
    "seed",
    "arithmetic_200",
    "numeral_mass",
    "digit_split",
    "single_digit",
    "train_wall_s",
    "eval_wall_s",
    "wall_s",
    "tokens_per_s",
    "average",
    "pair",
    "weighting",
}


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
        rows.append(
            {
                "setting": "base",
                "label": "base student (no distillation)",
                "seeds": 1,
                **{f"{m}": f"{b[m].iloc[0]:.1f}" for m in (*skills, "average")},
                **(
                    {"numeral mass": f"{base.get('numeral_mass', float('nan')):.3f}", "digit-split": "-"}
                    if diag
                    else {}
                ),
            }
        )
    for setting in dict.fromkeys(df.setting):
        g = df[df.setting == setting]
        fmt = lambda col, k=1, scale=1: (
            f"{scale * g[col].mean():.{k}f} ± {scale * g[col].std(ddof=1) if len(g) > 1 else 0:.{k}f}"
        )  # noqa: E731
        rows.append(
            {
                "setting": setting,
                "label": g.label.iloc[0],
                "seeds": len(g),
                **{m: fmt(m) for m in (*skills, "average")},
                **({"numeral mass": fmt("numeral_mass", 3), "digit-split": fmt("digit_split", 2)} if diag else {}),
            }
        )
    out = pd.DataFrame(rows)
    out["paper GSM8k"] = [PAPER_TABLE1.get(s, ("", None, None))[1] for s in out.setting]
    out["paper avg"] = [PAPER_TABLE1.get(s, ("", None, None))[2] for s in out.setting]
    return out


def headline_deltas(df: pd.DataFrame, deltas=PAPER_DELTAS) -> pd.DataFrame:
    """The paper's paired comparisons, ours (seed-paired mean ± std of A - B) beside the paper's.
    ``deltas``: ``(name, setting A, setting B, paper's Δavg)``; a ``None`` Δavg (a comparison the paper does not
    make) leaves out the paper's columns."""
    skills = skills_of(df)
    df = with_average(df, skills)
    rows = []
    for name, a, b, paper in deltas:
        A = df[df.setting == a].set_index("seed")
        B = df[df.setting == b].set_index("seed")
        seeds = A.index.intersection(B.index)
        if len(seeds) == 0:
            continue
        row = {"comparison": name, "seeds": len(seeds)} | ({"paper Δavg": paper} if paper is not None else {})
        for m in (*skills, "average"):
            d = A.loc[seeds, m] - B.loc[seeds, m]
            row[f"Δ{m} (ours)"] = f"{d.mean():+.1f} ± {d.std(ddof=1) if len(d) > 1 else 0:.1f}"
        if paper is not None:
            row["same sign as paper"] = bool(
                ((A.loc[seeds, "average"] - B.loc[seeds, "average"]).mean() > 0) == (paper > 0)
            )
        rows.append(row)
    return pd.DataFrame(rows)


def learned_w_comparison(
    df: pd.DataFrame, learned: str = "pkl_learned_qwen3", fixed: str = "pkl_qwen3"
) -> pd.DataFrame:
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
        rows.append(
            {
                "metric": m,
                "fixed W": round(float(B.loc[seeds, m].mean()), k + 1),
                "learned W": round(float(A.loc[seeds, m].mean()), k + 1),
                "Δ learned - fixed": f"{d.mean():+.{k}f} ± {d.std(ddof=1) if len(d) > 1 else 0:.{k}f}",
                "seeds": len(seeds),
            }
        )
    return pd.DataFrame(rows)


def _round(x, k: int = 4):
    return None if x is None else round(x, k)


def learned_w_rows(
    results: list[dict], setting: str = "pkl_learned_qwen3", n: int = 8
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """From the runs' result.json: (per-seed summary of how far W moved, the rows that moved most as strings)."""
    summary, top = [], []
    for r in sorted((r for r in results if r["setting"] == setting), key=lambda r: r["seed"]):
        for teacher, lw in (r.get("learned_w") or {}).items():
            summary.append(
                {
                    "seed": r["seed"],
                    "teacher": teacher,
                    "trainable rows": lw["trainable_rows"],
                    "numeral rows": lw["numeral_rows"],
                    "mean L1 change": round(lw["mean_l1_change"], 4),
                    "mean L1 change, numeral rows": _round(lw["mean_l1_change_numerals"])
                    if lw["numeral_rows"]
                    else None,
                    "mean L1 change, other rows": (
                        _round(lw["mean_l1_change_other"])  # none: every trainable
                        if lw["trainable_rows"] > lw["numeral_rows"]
                        else None
                    ),  # row is a numeral
                    "max L1 change": round(lw["max_l1_change"], 4),
                }
            )
            for row in lw["top_moved"][:n]:
                top.append(
                    {
                        "seed": r["seed"],
                        "student token": row["student"].replace("Ġ", "␣"),
                        "teacher tokens": " ".join(t.replace("Ġ", "␣") for t in row["teacher"]),
                        "W before": " ".join(f"{x:.3f}" for x in row["before"]),
                        "W after": " ".join(f"{x:.3f}" for x in row["after"]),
                        "L1 change": row["l1_change"],
                    }
                )
    return pd.DataFrame(summary), pd.DataFrame(top)


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


def md_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no extra dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join("" if (isinstance(v, float) and v != v) else str(v) for v in r) + " |")
    return "\n".join(lines)


def alignment_table(text: str, student_tok, teacher_tok) -> pd.DataFrame:
    """One sentence aligned (both tokenizers' own tokenization, BOS included where they add one):
    each chunk pair as readable strings, unpaired tokens as their own rows, in text order."""
    from ..align import align

    s_ids = student_tok(text)["input_ids"]
    t_ids = teacher_tok(text)["input_ids"]
    a = align(s_ids, t_ids, student_tok, teacher_tok)
    rows = []
    for k, ((sa, sb), (ta, tb)) in enumerate(zip(a.student_spans.tolist(), a.teacher_spans.tolist())):
        text_bytes = a.chunk_bytes(k, student_tok, teacher_tok)[0]
        rows.append(
            {
                "pos": sa,
                "text": text_bytes.decode("utf-8", "replace"),
                "student tokens": " | ".join(student_tok.convert_ids_to_tokens(s_ids[sa:sb])),
                "teacher tokens": " | ".join(teacher_tok.convert_ids_to_tokens(t_ids[ta:tb])),
                "chunk": f"{sb - sa}:{tb - ta}",
            }
        )
    for p in a.student_unpaired.tolist():
        rows.append(
            {
                "pos": p - 0.5,
                "text": "",
                "student tokens": student_tok.convert_ids_to_tokens(s_ids[p]),
                "teacher tokens": "(unpaired)",
                "chunk": "1:0",
            }
        )
    for p in a.teacher_unpaired.tolist():
        rows.append(
            {
                "pos": -0.5,
                "text": "",
                "student tokens": "(unpaired)",
                "teacher tokens": teacher_tok.convert_ids_to_tokens(t_ids[p]),
                "chunk": "0:1",
            }
        )
    return pd.DataFrame(rows).sort_values("pos", kind="stable").drop(columns="pos").reset_index(drop=True)


def kind_table(items: pd.DataFrame, teachers: list[dict] | None = None, settings=None) -> pd.DataFrame:
    """Arithmetic exact match (%) per item kind: each teacher (its ``arithmetic: <kind>`` fields, as `prepare`
    records them) and each student setting (pooled over seeds, from the per-item scores ``items``).

    ``settings``: the student settings to show, in order (default: every setting in ``items``). Returns one row
    per model, columns ``model`` and one per kind (`KIND_ORDER` first, then any other kind)."""
    from .findings import KIND_ORDER

    arith = items[items.skill == "arithmetic"] if len(items) else items
    kinds = [k for k in KIND_ORDER if len(arith) and k in set(arith.kind)]
    for t in teachers or []:
        kinds += [k.split(": ", 1)[1] for k in t if k.startswith("arithmetic: ") and k.split(": ", 1)[1] not in kinds]
    rows = []
    for t in teachers or []:
        rows.append(
            {"model": f"teacher: {t.get('label', t.get('teacher'))}"}
            | {k: round(100 * float(t[f"arithmetic: {k}"]), 1) if f"arithmetic: {k}" in t else None for k in kinds}
        )
    for s in settings if settings is not None else list(dict.fromkeys(arith.setting)) if len(arith) else []:
        sub = arith[arith.setting == s]
        if len(sub):
            by = sub.groupby("kind").exact_match.mean()
            rows.append({"model": s} | {k: round(100 * float(by[k]), 1) if k in by else None for k in kinds})
    return pd.DataFrame(rows, columns=["model"] + kinds)


def generation_table(results: list[dict]) -> pd.DataFrame:
    """The on-policy runs' own generations over training (from each run's logged windows, ``gen_tokens`` and
    ``on_policy``): per setting, the mean generated length (student tokens per row) in the first and the last
    logged window and over the run, and the share of batches trained on-policy; means over seeds. Settings whose
    runs logged no generation (off-policy ones) are left out."""
    rows = {}
    for r in results:
        logs = [h for h in r.get("log_history", []) if "gen_tokens" in h]
        if logs:
            g = [float(h["gen_tokens"]) for h in logs]
            on = [float(h.get("on_policy", 1.0)) for h in r["log_history"] if "on_policy" in h]
            share = sum(on) / len(on) if on else 1.0  # a window with gen_tokens was on-policy
            rows.setdefault(r["setting"], []).append((g[0], g[-1], sum(g) / len(g), share))
    out = []
    for setting, v in rows.items():
        mean = lambda j: round(sum(x[j] for x in v) / len(v), 1)  # noqa: E731
        out.append(
            {
                "setting": setting,
                "tokens, first window": mean(0),
                "tokens, last window": mean(1),
                "tokens, whole run": mean(2),
                "on-policy batches (%)": round(100 * sum(x[3] for x in v) / len(v), 1),
                "seeds": len(v),
            }
        )
    return pd.DataFrame(out)
