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
