"""A frozen teacher (`Teacher`) and the check of its logits for non-finite values at the positions a loss reads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import LOSSES


class NonFiniteTeacher(Exception):
    """A teacher's logits are not finite at a used position (args: the message). The trainer turns it into
    `xtoken.hf.trainer.NonFiniteError` or a skipped step (``XTokenConfig.nonfinite_teacher``)."""


@dataclass
class Teacher:
    """A frozen teacher.

    ``projection``: W in the two models' own id spaces (rows = student logits, columns = teacher
    logits), required for every loss except ``kl``; ``kl`` needs a teacher that shares the student's
    tokenizer. ``cache``: optional `TeacherCache`; when set, the teacher model is never run in training.
    """

    name: str
    model: Any
    tokenizer: Any
    loss: str = "kl"
    projection: Any = None
    weight: float = 1.0
    cache: Any = None  # a TeacherCache (xtoken.hf.cache), or None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"Teacher {self.name!r}: loss must be one of {LOSSES}, not {self.loss!r}")
        if self.loss != "kl" and self.projection is None:
            raise ValueError(f"Teacher {self.name!r}: loss {self.loss!r} needs a projection W")
        if self.projection is not None and hasattr(self.projection, "check_tokenizers"):
            self.projection.check_tokenizers(None, self.tokenizer, source=f"W of teacher {self.name!r}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"Teacher {self.name!r}: weight must be finite and >= 0, not {self.weight!r}")


def check_finite(teacher: Teacher, t_logits: torch.Tensor, entry: dict, inputs: dict, step: int) -> None:
    """Raise `NonFiniteTeacher` when the teacher's logits [B, L_m, V_m] hold NaN or +inf, or a whole row of -inf,
    at a position the loss reads (a real token under the teacher's attention mask in ``entry``, the collator's
    batch entry of this teacher). A few -inf entries (a masked vocabulary) are fine. Cost: one float32 sum over
    the logits and one scalar read; the exact test runs on the rows whose sum is not finite only. ``step``: the
    optimizer step, for the message."""
    used = entry["attention_mask"].to(t_logits.device).bool()
    suspect = ~torch.isfinite(t_logits.sum(-1, dtype=torch.float32)) & used
    if not bool(suspect.any()):
        return
    bad = []
    for b, p in suspect.nonzero().tolist():
        row = t_logits[b, p]
        kind = (
            "NaN"
            if bool(torch.isnan(row).any())
            else "+inf"
            if bool(torch.isposinf(row).any())
            else "-inf everywhere"
            if bool(torch.isneginf(row).all())
            else None
        )
        if kind is not None:
            bad.append((b, p, kind))
    if not bad:
        return
    b, p, kind = bad[0]
    idx = f" (dataset idx {int(inputs['idx'][b])})" if "idx" in inputs else ""
    source = "cached log-probs" if "logprobs" in entry else "logits"
    raise NonFiniteTeacher(
        f"teacher {teacher.name!r}: non-finite {source} ({kind}) at step {step}, "
        f"batch row {b}{idx}, position {p} (teacher token id {int(entry['input_ids'][b, p])}); "
        f"{len(bad)} of {int(used.sum())} used positions affected. Set nonfinite_teacher='skip' to skip "
        "such steps instead of stopping"
    )
