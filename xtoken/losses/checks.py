"""Input checks of the losses: O(1) or one pass over the alignments, none over the logits. Each raises a
ValueError that says which side is wrong."""

from __future__ import annotations

import math

import torch

DIRECTIONS = ("forward", "reverse")


def direction(value) -> str:
    if value not in DIRECTIONS:
        raise ValueError(f"direction must be 'forward' or 'reverse', not {value!r}")
    return value


def temperature(value) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a finite number > 0, not {value!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, not {value!r}")
    return t


def compute_dtype(*tensors) -> torch.dtype:
    """float32, or float64 when an input is float64 (float16 / bfloat16 are never computed in)."""
    for x in tensors:
        if not x.dtype.is_floating_point:
            raise ValueError(f"logits must be floating point, not {x.dtype}")
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def logits_3d(student_logits, teacher_logits) -> None:
    for side, x in (("student", student_logits), ("teacher", teacher_logits)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{side} logits must be [batch, length, vocab], not {shape}")


def w_widths(student_logits, teacher_logits, projection, student_vocab_size, teacher_vocab_size) -> None:
    """Logits at least as wide as the W columns/rows the loss reads; names the side (and a likely swap)."""
    n_s, n_t = student_logits.shape[-1], teacher_logits.shape[-1]
    rows, cols = projection.student_vocab_size, projection.teacher_vocab_size
    need_s = min(rows, student_vocab_size or rows)
    need_t = min(cols, teacher_vocab_size or cols)
    swapped = n_s == cols and n_t == rows and rows != cols
    hint = " (the student's and teacher's logits look swapped)" if swapped else ""
    if n_t < need_t:
        raise ValueError(
            f"teacher logits have {n_t} columns, narrower than W's {need_t} teacher columns; student "
            f"logits have {n_s}, W has {rows} student rows{hint}. For a teacher model of another width "
            "use W.with_teacher_width(n)"
        )
    if n_s < need_s:
        raise ValueError(
            f"student logits have {n_s} columns, narrower than W's {need_s} student rows; teacher "
            f"logits have {n_t}, W has {cols} teacher columns{hint}"
        )


def alignments(aligns, student_logits, teacher_logits) -> None:
    """One alignment per batch row, each within both sides' logit lengths."""
    for side, x in (("student", student_logits), ("teacher", teacher_logits)):
        if len(aligns) != x.shape[0]:
            raise ValueError(
                f"{len(aligns)} alignments for {side} logits of batch size {x.shape[0]}: pass one alignment per row"
            )
    L_s, L_t = student_logits.shape[1], teacher_logits.shape[1]
    for i, a in enumerate(aligns):
        s_end, t_end = len(a.student_ids), len(a.teacher_ids)
        if s_end > L_s or t_end > L_t:
            swapped = s_end <= L_t and t_end <= L_s and L_s != L_t
            raise ValueError(
                f"alignment {i} covers {s_end} student and {t_end} teacher positions, but the student logits have "
                f"length {L_s} and the teacher logits {L_t}"
                + (" (the student's and teacher's logits look swapped)" if swapped else "")
            )
