"""Several teachers at once (X-Token, Sec. 3.6): one W_m and one loss per teacher, combined as

    L_KD = sum_m alpha_m L_m,      sum_m alpha_m = 1                                         (MT)

Cross-tokenizer teachers use P-KL or H-KL with their own W_m; a teacher sharing the student's
tokenizer uses plain KL (`xtoken.losses.kl_loss`).

Weights alpha_m (`teacher_weights`):

  static       given alphas, normalized to sum 1 (the paper's best: Phi-mini H-KL + Llama-3B KL)
  ce           confidence from the teacher's cross-entropy on the batch's text:  softmax_m(-CE_m / tau)
               (lower CE -> higher weight)
  entropy      softmax_m(-H_m / tau), H_m the mean entropy of the teacher's predictions
  max_prob     mean max-probability of each teacher, normalized: c_m / sum_m' c_m'

per="batch": one weight per teacher (statistics averaged over the batch); per="sample": one weight
per teacher and sample, statistics given per sample ([M, B]); then each L_m must be per sample too
and `aggregate` averages over samples. The paper found static weights better than every adaptive
scheme; the adaptive ones are here to reproduce that comparison.

Statistics are inputs (floats or tensors), never gradients: weights carry no gradient.
"""

from __future__ import annotations

import torch

__all__ = ["teacher_weights", "aggregate", "teacher_stats"]

SCHEMES = ("static", "ce", "entropy", "max_prob")


def teacher_stats(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    mask=None,
    vocab_size: int | None = None,
    chunk_size: int = 256,
) -> dict:
    """Per-sample confidence statistics of one teacher: {"ce", "entropy", "max_prob"}, each [B].

    teacher_logits [B, L, V']; labels [B, L] the teacher's own next tokens (label p is predicted by
    logit p-1), -100 to ignore; mask [B, L] positions to average over (default all, or the labelled ones).
    Positions are processed ``chunk_size`` at a time, so the extra memory is [chunk_size, V], not
    [B, L, V] (3.7 GB of float32 copies at paper sizes otherwise).
    """
    with torch.no_grad():
        B, L = teacher_logits.shape[:2]
        v = vocab_size or teacher_logits.shape[-1]
        dev = teacher_logits.device
        flat = teacher_logits.reshape(B * L, teacher_logits.shape[-1])
        keep = (
            torch.ones(B, L, dtype=torch.bool, device=dev) if mask is None else torch.as_tensor(mask, device=dev).bool()
        )
        ent = torch.empty(B * L, device=dev)
        mx = torch.empty(B * L, device=dev)
        nll = torch.zeros(B * L, device=dev)
        if labels is not None:  # position p predicts label p+1
            nxt = torch.full((B, L), -100, dtype=torch.long, device=dev)
            nxt[:, :-1] = labels[:, 1:]
            nxt = nxt.reshape(-1)
        for a in range(0, B * L, chunk_size):
            b = min(a + chunk_size, B * L)
            logp = torch.log_softmax(flat[a:b, :v].float(), -1)
            p = logp.exp()
            ent[a:b] = -(p * logp).sum(-1)
            mx[a:b] = p.max(-1).values
            if labels is not None:
                t = nxt[a:b]
                nll[a:b] = -logp.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1) * (t != -100)
        denom = keep.sum(1).clamp_min(1)
        out = {"entropy": (ent.view(B, L) * keep).sum(1) / denom, "max_prob": (mx.view(B, L) * keep).sum(1) / denom}
        if labels is not None:
            ok = (nxt != -100).view(B, L)
            out["ce"] = nll.view(B, L).sum(1) / ok.sum(1).clamp_min(1)
        return out


def teacher_weights(
    scheme: str, teacher_stats=None, *, alphas=None, per: str = "batch", temperature: float = 1.0
) -> torch.Tensor:
    """Weights alpha [M] (per="batch") or [M, B] (per="sample"), summing to 1 over teachers.

    scheme: "static" (needs alphas), "ce", "entropy", "max_prob" (need teacher_stats: a list, one per
    teacher, of either a float/[B] tensor of that statistic, or a dict from `teacher_stats`).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, not {scheme!r}")
    if per not in ("batch", "sample"):
        raise ValueError(f"per must be 'batch' or 'sample', not {per!r}")
    if scheme == "static":
        if alphas is None:
            raise ValueError("static weights need alphas")
        a = torch.as_tensor(alphas, dtype=torch.float64)
        if (a < 0).any() or a.sum() <= 0:
            raise ValueError(f"alphas must be non-negative with a positive sum, got {a.tolist()}")
        return (a / a.sum()).float()
    if teacher_stats is None:
        raise ValueError(f"scheme {scheme!r} needs teacher_stats")
    rows = []
    for s in teacher_stats:
        x = s[scheme] if isinstance(s, dict) else s
        rows.append(torch.as_tensor(x, dtype=torch.float64).reshape(-1))
    stat = torch.stack(rows)  # [M, B] (or [M, 1])
    if per == "batch":
        stat = stat.mean(1, keepdim=True)
    if scheme == "max_prob":  # higher max-prob -> more weight
        w = stat / stat.sum(0, keepdim=True).clamp_min(1e-12)
    else:  # lower CE / entropy -> more weight
        w = torch.softmax(-stat / temperature, dim=0)
    w = w.float()
    return w.squeeze(1) if per == "batch" else w


def aggregate(losses, weights: torch.Tensor) -> torch.Tensor:
    """(MT): sum_m alpha_m L_m. losses: list of scalars (per-batch weights) or of [B] tensors
    (per-sample weights [M, B]: the weighted sum is averaged over samples)."""
    L = torch.stack([torch.as_tensor(x) for x in losses])
    w = weights.to(L.dtype).to(L.device)
    if w.dim() == 1:
        if L.dim() == 2:  # per-sample losses, batch weights
            L = L.mean(1)
        return (w * L).sum()
    if L.dim() != 2:
        raise ValueError("per-sample weights need per-sample losses [B] for every teacher")
    return (w * L).sum(0).mean()
