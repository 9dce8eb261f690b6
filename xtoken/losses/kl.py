"""Same-tokenizer KL (positions 1:1) and the dynamic KD scale."""

from __future__ import annotations

import math

import torch

from . import checks
from .chunks import log_softmax
from .engine import EPS, KL_BLOCK_ELEMENTS, Workspace, argmax, block_bounds, budget, gather_rows, run_blocks


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    metrics: bool = True,
    student_tok=None,
    teacher_tok=None,
) -> tuple[torch.Tensor, dict]:
    """Same tokenizer: the mean over positions of KL(p_T || p_S) (``direction="forward"``) or KL(p_S || p_T).

    student_logits, teacher_logits [B, L, V'] any float dtype (computed in float32, or float64 when either is),
    positions 1:1; mask [B, L] bool or 0/1 selects positions (default all). Columns beyond ``vocab_size``
    (default: the narrower side, and the tokenizer's size when ``student_tok`` or ``teacher_tok`` is given) are
    padding; both tokenizers given must be the same (by fingerprint). Teacher entries of -inf are probabilities
    of 0 (0 log 0 = 0; reverse: clamped at `EPS` on the right). chunk_size: positions per block.

    Returns (loss: a scalar in the compute dtype, differentiable w.r.t. student_logits; metrics: loss,
    n_positions and, with ``metrics``, top1_agreement)."""
    checks.direction(direction)
    temperature = checks.temperature(temperature)
    checks.logits_3d(student_logits, teacher_logits)
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"kl_loss compares positions 1:1: student logits {tuple(student_logits.shape)} and teacher "
            f"logits {tuple(teacher_logits.shape)} differ in [batch, length] (a teacher with another "
            "tokenizer needs a cross-tokenizer loss)"
        )
    dtype = checks.compute_dtype(student_logits, teacher_logits)
    v = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
    if student_tok is not None and teacher_tok is not None:
        from ..tokenizers import tokenizer_fingerprint

        if tokenizer_fingerprint(student_tok) != tokenizer_fingerprint(teacher_tok):
            raise ValueError("kl_loss needs one tokenizer on both sides: the student's and teacher's tokenizers differ")
    tok = teacher_tok if teacher_tok is not None else student_tok
    if tok is not None:
        from ..projection import _token_count

        v = min(v, _token_count(tok))
    if v > min(student_logits.shape[-1], teacher_logits.shape[-1]):
        raise ValueError(
            f"vocab_size={v} exceeds the logits' columns (student {student_logits.shape[-1]}, "
            f"teacher {teacher_logits.shape[-1]})"
        )
    B, L = student_logits.shape[:2]
    keep = torch.ones(B, L, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    if tuple(keep.shape) != (B, L):
        raise ValueError(f"mask has shape {tuple(keep.shape)}, the logits' [batch, length] is {(B, L)}")
    b_all, p_all = keep.nonzero(as_tuple=True)
    b_all, p_all = b_all.to(student_logits.device), p_all.to(student_logits.device)
    top1 = [0.0]
    ws = Workspace()

    def block(lo, hi, grad, _):
        b, p = b_all[lo:hi], p_all[lo:hi]
        leaf = gather_rows(student_logits, b, p, v, dtype=dtype).requires_grad_(grad)
        logp_s = log_softmax(leaf, temperature)
        with torch.no_grad():
            logp_t = log_softmax(gather_rows(teacher_logits, b, p, v, ws, dtype=dtype), temperature)
            if metrics:
                top1[0] += (argmax(logp_s) == argmax(logp_t)).sum().item()
        if direction == "forward":
            d = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
        else:
            d = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
        if not bool(d.isfinite().all()):  # -inf teacher entries (0 * -inf): recomputed for this block only
            if direction == "forward":
                p_t = logp_t.exp()
                d = torch.where(p_t > 0, p_t * (logp_t - logp_s), torch.zeros_like(p_t)).sum(-1)
            else:
                d = (logp_s.exp() * (logp_s - logp_t.clamp_min(math.log(EPS)))).sum(-1)
        return d.sum(), [(b, p, leaf)]

    n = len(b_all)
    cpu = student_logits.device.type == "cpu"
    bounds = block_bounds(
        n, chunk_size, widths=[v], budget=budget(student_logits.device, KL_BLOCK_ELEMENTS), floor=1 if cpu else 256
    )
    loss = run_blocks(student_logits, n, bounds, block, dtype=dtype)
    out = {"loss": float(loss.detach()), "n_positions": float(n)}
    if metrics:
        out.update(
            top1_agreement=top1[0] / max(n, 1),
            teacher_common_mass=1.0,
            student_common_mass=1.0,
            mass_lost_empty_rows=0.0,
        )
    return loss, out


def dynamic_kd_scale(ce: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
    """KD rescaled to CE's magnitude: kd * stopgrad(ce / kd), both scalars. The value equals ce; the gradient is
    kd's, scaled by ce / kd. Used as total = ce + dynamic_kd_scale(ce, kd)."""
    return kd * (ce / kd.clamp_min(1e-12)).detach()
