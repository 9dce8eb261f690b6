"""Coverage audit: which student tokens land in the common set C (the paper's Table 8).

GOLD's common set holds the strict 1-to-1 matches (W rows of kind EXACT or SPECIAL). H-KL widens
it to every student token with a non-empty W row, paired with its top-1 teacher token. The audit
counts, per category of student token, how many fall in each set, and `recommend` applies the
paper's rule: P-KL when a critical category (multi-digit numerals, for math) falls outside the
strict set, H-KL when the partition is sound.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import pandas as pd

from .canonical import token_bytes
from .projection import EMPTY, EXACT, SPECIAL, Projection, build_projection

__all__ = ["coverage_audit", "CoverageAudit", "token_category", "CATEGORIES"]

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
