"""Reference implementations: the plain, dense forms of the losses' building blocks, written for reading and
for the tests to compare the fast paths against (`xtoken.losses.projected`, `xtoken.losses.hybrid`).

The chunk distributions (C1) and (C2) have one implementation each, in `xtoken.losses.chunks`
(`chain_rule_log_q`, `teacher_merge` take per-token log-probabilities and are their readable entry points).
"""

from __future__ import annotations

import torch

from .engine import EPS


def project_to_teacher(
    q_s: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, w: torch.Tensor, teacher_width: int
) -> torch.Tensor:
    """(W^T q)[t] = sum_s W[s, t] q[s] for each row of q_s [n, V_S] float, as a gather at W's non-zero entries
    (rows, cols int64, w float: flat, as in `xtoken.losses.plan.WPlan`) and a scatter-add into teacher columns;
    no dense W. Returns [n, teacher_width] in q_s's dtype."""
    out = torch.zeros(q_s.shape[0], teacher_width, dtype=q_s.dtype, device=q_s.device)
    return out.index_add(1, cols, q_s.index_select(1, rows) * w.to(q_s.dtype))


def generalized_kl(
    q: torch.Tensor, r: torch.Tensor, log_q: torch.Tensor | None = None, log_r: torch.Tensor | None = None
) -> torch.Tensor:
    """The generalized KL (D) per row of sub-distributions q, r [n, V] (mass <= 1):
    sum_v q log(q / r) - sum_v q + sum_v r, non-negative and zero iff q = r; 0 log 0 = 0; r clamped at `EPS`
    under the log. Returns [n]."""
    log_q = torch.log(q.clamp_min(EPS)) if log_q is None else log_q
    log_r = torch.log(r.clamp_min(EPS)) if log_r is None else log_r
    term = torch.where(q > 0, q * (log_q - log_r), torch.zeros_like(q))
    return term.sum(-1) - q.sum(-1) + r.sum(-1)
