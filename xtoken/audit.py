"""Coverage audit: which student tokens land in the common set C (the paper's Table 8).

GOLD's common set holds the strict 1-to-1 matches (W rows of kind EXACT or SPECIAL). H-KL widens
it to every student token with a non-empty W row, paired with its top-1 teacher token. The audit
counts, per category of student token, how many fall in each set, and `recommend` applies the
paper's rule: P-KL when a critical category (multi-digit numerals, for math) falls outside the
strict set, H-KL when the partition is sound.

`occurrence_audit` weighs the same counts by how often each student token occurs in a corpus: the share of
the tokens a model actually trains on that the partition keeps, and the frequent tokens it leaves out.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from itertools import chain

import numpy as np
import pandas as pd

from .canonical import token_bytes
from .projection import EMPTY, EXACT, KIND_NAMES, SPECIAL, Projection, build_projection

__all__ = [
    "coverage_audit",
    "CoverageAudit",
    "occurrence_audit",
    "OccurrenceAudit",
    "occurrence_summary",
    "token_category",
    "CATEGORIES",
]

CATEGORIES = [
    "ascii_punctuation",
    "single_digit",
    "numeral_2digit",
    "numeral_3digit",
    "whitespace",
    "multibyte",
    "special",
    "word",
    "other",
]
_PUNCT = {c.encode() for c in string.punctuation}
_WS = set(b" \t\n\r\x0b\x0c")


def token_category(b: bytes | None) -> str:
    """Category of a student token from its raw bytes (None = special token)."""
    if b is None:
        return "special"
    if b in _PUNCT:
        return "ascii_punctuation"
    if b.isdigit() and b.isascii():
        return {1: "single_digit", 2: "numeral_2digit", 3: "numeral_3digit"}.get(len(b), "other")
    if b and all(x in _WS for x in b):
        return "whitespace"
    if any(x >= 0x80 for x in b):
        return "multibyte"
    core = b[1:] if b[:1] == b" " else b
    if core.isalpha() and core.isascii():
        return "word"
    return "other"


@dataclass
class CoverageAudit:
    """Per-category coverage of a student vocabulary by a teacher's common sets."""

    table: pd.DataFrame
    student: str
    teacher: str

    def recommend(self, critical=("numeral_2digit", "numeral_3digit"), threshold: float = 0.5) -> tuple[str, str]:
        """("P-KL" | "H-KL", reason): P-KL when any critical category has strict coverage below threshold."""
        rows = self.table.set_index("category")
        missing = [
            c
            for c in critical
            if c in rows.index
            and rows.loc[c, "student_tokens"] > 0
            and rows.loc[c, "gold_common"] / rows.loc[c, "student_tokens"] < threshold
        ]
        if missing:
            detail = ", ".join(f"{c} {rows.loc[c, 'gold_common']}/{rows.loc[c, 'student_tokens']}" for c in missing)
            return "P-KL", (
                f"critical tokens fall outside GOLD's strict common set ({detail}): a partition would "
                f"suppress them (Proposition 1), so drop it and project through W"
            )
        detail = ", ".join(
            f"{c} {rows.loc[c, 'gold_common']}/{rows.loc[c, 'student_tokens']}" for c in critical if c in rows.index
        )
        return "H-KL", (
            f"the partition is sound on the critical categories ({detail}): keep the hybrid loss "
            f"and widen C with W's top-1 pairs"
        )

    def _repr_html_(self):
        return self.table._repr_html_()

    def __repr__(self):
        return f"CoverageAudit({self.student} -> {self.teacher})\n{self.table.to_string(index=False)}"


def coverage_audit(student_tok, teacher_tok, projection: Projection | None = None) -> CoverageAudit:
    """Count, per category of student token, membership in GOLD's strict C and H-KL's widened C."""
    W = projection if projection is not None else build_projection(student_tok, teacher_tok)
    s_bytes = token_bytes(student_tok)
    kind = W.row_kind.tolist()
    counts = {c: [0, 0, 0, 0] for c in CATEGORIES}  # tokens, strict, widened, empty
    for s in range(min(len(s_bytes), W.student_vocab_size)):
        b = s_bytes[s]
        if b is None and s not in student_tok.added_tokens_decoder:
            continue  # a hole in the id space, not a token
        c = counts[token_category(b)]
        c[0] += 1
        c[1] += kind[s] in (EXACT, SPECIAL)
        c[2] += kind[s] != EMPTY
        c[3] += kind[s] == EMPTY
    table = pd.DataFrame(
        [(cat, *v) for cat, v in counts.items()],
        columns=["category", "student_tokens", "gold_common", "hkl_common", "empty_rows"],
    )
    table["gold_pct"] = (100 * table.gold_common / table.student_tokens.where(table.student_tokens > 0)).round(1)
    table["hkl_pct"] = (100 * table.hkl_common / table.student_tokens.where(table.student_tokens > 0)).round(1)
    return CoverageAudit(table, getattr(student_tok, "name_or_path", ""), getattr(teacher_tok, "name_or_path", ""))


@dataclass
class OccurrenceAudit:
    """Per-category coverage of a corpus's student token occurrences by a teacher's common sets.

    ``table``: one row per category of `CATEGORIES` and a final ``"all"`` row (the column totals), with columns
    category, occurrences, gold_common, hkl_common, outside_gold (int) and gold_pct, hkl_pct (percent of the
    row's occurrences, 2 decimals; NaN for a category that does not occur). ``top_outside``: the most frequent
    student tokens outside GOLD's strict C, one row each (see `occurrence_audit`).
    """

    table: pd.DataFrame
    top_outside: pd.DataFrame
    student: str
    teacher: str

    def _repr_html_(self):
        return self.table._repr_html_()

    def __repr__(self):
        return (
            f"OccurrenceAudit({self.student} -> {self.teacher})\n{self.table.to_string(index=False)}\n"
            f"most frequent outside GOLD's C:\n{self.top_outside.to_string(index=False)}"
        )


def _readable(tok, tok_bytes: list, i: int) -> str:
    """A token as text: its bytes decoded (invalid UTF-8 as backslash escapes), a special by its name."""
    b = tok_bytes[i] if i < len(tok_bytes) else None
    if b is None:
        return str(tok.convert_ids_to_tokens(i))
    return b.decode("utf-8", errors="backslashreplace")


def occurrence_audit(
    student_tok, projection: Projection, texts, *, teacher_name: str = "", teacher_tok=None, top: int = 15
) -> OccurrenceAudit:
    """Count, per category of student token, the occurrences in ``texts`` that fall in GOLD's strict C (W rows
    of kind EXACT or SPECIAL) and in H-KL's widened C (every non-EMPTY row).

    Args:
        student_tok: the student tokenizer; ``texts`` are tokenized with it (``add_special_tokens=False``).
        projection: W [V_S, k] for this student tokenizer; refused (`ProjectionMismatch`) when it records a
            different student tokenizer, and a ``ValueError`` names the first id the texts produce that has no
            row in W (id >= V_S).
        texts: a list (or any sequence, a `datasets` column) of strings, not empty.
        teacher_name: the teacher's name in the result (default: the one W records).
        teacher_tok: the teacher tokenizer, to spell the top-1 teacher tokens (default: the one W holds, if any);
            when given, W must record it (`Projection.check_tokenizers`).
        top: rows of ``top_outside``.

    Returns:
        `OccurrenceAudit` with ``table`` (per category and ``"all"``: occurrences, gold_common, hkl_common,
        outside_gold, gold_pct, hkl_pct) and ``top_outside``, the ``top`` most frequent student tokens outside
        GOLD's C (ties by token id), with columns token_id, token (its text), category, count, pct (of all
        occurrences), kind (W's row kind), top1_teacher_id (-1 for an empty row) and top1_teacher (its text;
        None when empty or without a teacher tokenizer). Deterministic.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("occurrence_audit: texts must be a list of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("occurrence_audit: texts is empty; pass the corpus as a non-empty list of strings")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"occurrence_audit: texts[{i}] is {type(t).__name__}, not str")
    projection.check_tokenizers(student_tok, teacher_tok)
    encoded = student_tok(texts, add_special_tokens=False)["input_ids"]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
    if ids.size == 0:
        raise ValueError(f"occurrence_audit: the {len(texts)} texts produce no student tokens")
    n_rows = projection.student_vocab_size
    outside = (ids < 0) | (ids >= n_rows)
    if outside.any():
        pos = int(np.argmax(outside))
        text = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
        raise ValueError(
            f"occurrence_audit: student id {int(ids[pos])} (in texts[{text}]) has no row in W, whose student "
            f"vocabulary has {n_rows} ids (0..{n_rows - 1}): W was built for a smaller vocabulary"
        )

    counts = np.bincount(ids, minlength=n_rows)  # [V_S] occurrences per student id
    seen = np.flatnonzero(counts)  # ids that occur, ascending
    n_seen = counts[seen]
    s_bytes = token_bytes(student_tok)
    cats = np.array([token_category(s_bytes[i] if i < len(s_bytes) else None) for i in seen.tolist()], dtype=object)
    code = np.array([CATEGORIES.index(c) for c in cats], dtype=np.int64)
    kind = projection.row_kind.numpy()[seen]
    gold = (kind == EXACT) | (kind == SPECIAL)
    hkl = kind != EMPTY

    def per_category(mask):
        return np.bincount(code[mask], weights=n_seen[mask], minlength=len(CATEGORIES)).astype(np.int64)

    table = pd.DataFrame(
        {
            "category": CATEGORIES,
            "occurrences": per_category(np.ones_like(gold)),
            "gold_common": per_category(gold),
            "hkl_common": per_category(hkl),
        }
    )
    table.loc[len(table)] = ["all", *table[["occurrences", "gold_common", "hkl_common"]].sum().tolist()]
    table["outside_gold"] = table.occurrences - table.gold_common
    table = table.astype({c: np.int64 for c in ("occurrences", "gold_common", "hkl_common", "outside_gold")})
    denom = table.occurrences.where(table.occurrences > 0)
    table["gold_pct"] = (100 * table.gold_common / denom).round(2)
    table["hkl_pct"] = (100 * table.hkl_common / denom).round(2)

    ttok = teacher_tok if teacher_tok is not None else projection.teacher_tok
    t_bytes = token_bytes(ttok) if ttok is not None else []
    n_teacher = projection.teacher_tokens
    top1 = projection.top1().numpy()
    out = np.flatnonzero(~gold)
    order = out[np.lexsort((seen[out], -n_seen[out]))][: max(int(top), 0)]  # by count, ties by id
    rows = []
    for j in order.tolist():
        s, t = int(seen[j]), int(top1[seen[j]])
        spell = ttok is not None and t >= 0 and (n_teacher is None or t < n_teacher)
        rows.append(
            (
                s,
                _readable(student_tok, s_bytes, s),
                cats[j],
                int(n_seen[j]),
                round(100 * int(n_seen[j]) / int(ids.size), 2),
                KIND_NAMES[int(kind[j])],
                t,
                _readable(ttok, t_bytes, t) if spell else None,
            )
        )
    top_outside = pd.DataFrame(
        rows, columns=["token_id", "token", "category", "count", "pct", "kind", "top1_teacher_id", "top1_teacher"]
    )
    teacher = teacher_name or projection.meta.get("teacher") or getattr(ttok, "name_or_path", "") or ""
    return OccurrenceAudit(table, top_outside, getattr(student_tok, "name_or_path", ""), teacher)


def occurrence_summary(
    audits: dict, categories=("all", "word", "single_digit", "numeral_2digit", "numeral_3digit")
) -> pd.DataFrame:
    """One row per teacher of ``audits`` ({teacher: `OccurrenceAudit`}): the share (percent) of the student's
    token occurrences in GOLD's strict C and in H-KL's widened C, overall (``"all"``) and per category
    (columns ``gold_pct <category>`` / ``hkl_pct <category>``), after the total of occurrences."""
    rows = []
    for teacher, audit in audits.items():
        t = audit.table.set_index("category")
        row = {"teacher": teacher, "occurrences": int(t.loc["all", "occurrences"])}
        for cat in categories:
            row[f"gold_pct {cat}"] = t.loc[cat, "gold_pct"]
            row[f"hkl_pct {cat}"] = t.loc[cat, "hkl_pct"]
        rows.append(row)
    return pd.DataFrame(rows)
