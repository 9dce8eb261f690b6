"""P-KL, X-Token's projected KL: D(q_T || W^T q_S) per chunk pair, no partition of the vocabularies.

(W^T q)[t] = sum_s W[s, t] q[s] is a gather-scatter over W's sparse rows, never a dense V_S x V_T matrix, and it
is computed on W's *image* only (the teacher ids some student row reaches, ~110k of Qwen3's 151,669 for Llama):
elsewhere r = 0, so those columns' terms of (D) are known without a pass over them. The student side is one
softmax of each chunk's first-token logits times the continuation mass m (the split of (C1)); the backward
applies the softmax Jacobian by hand (`ProjectedKL`). The teacher side is (C2) read on the image
(`xtoken.losses.chunks.w_merge_image`).
"""

from __future__ import annotations

import numpy as np
import torch

from .chunks import MERGES, continuation_log_mass, split_rows, teacher_chunks, w_merge_image
from .engine import EPS, Workspace, argmax, out, rowdot
from .plan import SparseSum, WPlan, chunk_batch


def sparse_sum(
    x: torch.Tensor, w: torch.Tensor, plan: SparseSum, ws: Workspace | None = None, name: str = "image"
) -> torch.Tensor:
    """x @ W onto one side by W's entries: x [n, V_S] -> [n, n_image] with ``plan=WPlan.to_image``, or x
    [n, n_image] -> [n, V_S] with ``WPlan.to_rows``; ``w`` the entries' values (fixed, or learned and
    differentiable upstream). A dense gather of each output column's first entry plus a scatter-add of the others."""
    result = torch.index_select(x, 1, plan.src_first, **out(ws, "sparse_" + name, x))
    result.mul_(torch.where(plan.has, w.index_select(0, plan.first), 0.0))
    if len(plan.rest):
        extra = torch.index_select(x, 1, plan.src_rest, **out(ws, "sparse_rest_" + name, x))
        result.index_add_(1, plan.dst_rest, extra.mul_(w.index_select(0, plan.rest)))
    return result


def _row_sums(w: torch.Tensor, plan: WPlan, width: int) -> torch.Tensor:
    """sum_t W[s, t] per student row: kept in the plan for W's own entries, recomputed for learned ones."""
    if w is plan.w and plan.row_sums is not None:
        return plan.row_sums
    sums = torch.zeros(width, dtype=w.dtype, device=w.device).index_add_(0, plan.rows, w)
    if w is plan.w:
        plan.row_sums = sums
    return sums


class ProjectedKL(torch.autograd.Function):
    """Per row: D(q_T || W^T q) (forward) or D(W^T q || q_T) (reverse), from the logits z [n, V_S] of each
    chunk's first student token and the log-mass of its continuation, log m [n] (None: one-token chunks), so
    that q = softmax(z) * m is (C1). One softmax, no log-softmax or exp pass.

    Off W's image r = 0: the forward terms there are q_T[t] (log q_T[t] - log EPS) - q_T[t] (zero gradient, r
    clamped at EPS), the reverse ones q_T[t]. So the teacher comes as q_ti (q_T on the image, [n, n_image]),
    neg_ent_t (sum_v q_T log q_T over every id) and off_t (its mass off the image), all per row.
    Backward, with r = W^T q:
      forward:  dD/dr = 1 - q_T / r,   reverse: dD/dr = log r - log q_T,
      a[s] = dD/dq[s] = sum_k W[s, t_k] dD/dr[t_k]         (a gather over W's entries, then a scatter-add),
      dD/dz = m p * (a - sum_s p[s] a[s]),  dD/dlog m = m sum_s p[s] a[s]    (softmax's Jacobian, p = softmax(z)),
      dD/dW[s, t] = q[s] * dD/dr[t]                       (only when the weights are learned).
    r is clamped at EPS under the logs. Returns d per row; ``aux`` (a dict, if given) receives p, m (None
    for one-token chunks), r, and the row sums r_sum = sum r and q_sum = sum q_ti, without gradient.
    """

    @staticmethod
    def forward(
        ctx,
        z,
        log_m,
        q_ti,
        neg_ent_t,
        off_t,
        plan: WPlan,
        w,
        reverse: bool,
        ws: Workspace | None = None,
        aux: dict | None = None,
    ):
        p = torch.softmax(z, -1)
        m = None if log_m is None else log_m.exp()
        r = sparse_sum(p, w, plan.to_image, ws, "image")  # r = W^T q on the image
        if m is not None:
            r.mul_(m.unsqueeze(1))
        r_sum, q_sum = r.sum(-1), q_ti.sum(-1)
        m_t = q_sum + off_t  # sum_v q_T
        r_c = torch.clamp_min(r, EPS, **out(ws, "r_c", r))
        if not reverse:
            # dD/dr = 1 - q_T / r (the 1 added in backward), with r clamped at EPS as in the value. Where
            # r < EPS this is the gradient of the unclamped divergence with EPS for r: still bounded, since
            # q_S[s] W[s, t] <= r[t] makes each student term q_S[s] W[s, t] q_T[t] / EPS <= q_T[t].
            d_r = torch.div(q_ti, r_c, **out(ws, "d_r", r))
        log_r = r_c.log_()
        if reverse:  # sum_img r (log r - log q_T) - sum r + sum q_T
            d_r = log_r.sub_(torch.clamp_min(q_ti, EPS, **out(ws, "q_c", q_ti)).log_())  # dD/dr = log r - log q_T
            d = rowdot(r, d_r) - r_sum + m_t
        else:  # sum q_T log q_T - sum_img q_T log r - (mass off the image) log EPS - sum q_T + sum r
            d = neg_ent_t - rowdot(q_ti, log_r) - off_t * np.log(EPS) - m_t + r_sum
        ctx.save_for_backward(p, m, d_r, w)
        ctx.reverse, ctx.plan, ctx.ws = reverse, plan, ws
        if aux is not None:
            aux.update(p=p, m=m, r=r, r_sum=r_sum, q_sum=q_sum)
        return d

    @staticmethod
    def backward(ctx, g):
        p, m, d_r, w = ctx.saved_tensors
        plan: WPlan = ctx.plan
        gm = g if m is None else g * m  # the upstream gradient times the mass
        grad_w = grad_z = grad_log_m = None
        if ctx.needs_input_grad[6]:  # learned W: dD/dW[e] = q[rows_e] dD/dr[cols_e]
            d_r_e = d_r.index_select(1, plan.img_cols)
            d_r_e = d_r_e if ctx.reverse else d_r_e.neg_().add_(1.0)
            grad_w = (p.index_select(1, plan.rows) * d_r_e).mul_(gm.unsqueeze(1)).sum(0)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # a[s] = sum_k W[s, t_k] dD/dr[t_k]; forward: sum_k W[s, t_k] - sum_k W[s, t_k] q_T[t_k] / r[t_k]
            # (the sum with -W, then W's row sums added: one pass fewer than negating a)
            if ctx.reverse:
                a = sparse_sum(d_r, w, plan.to_rows, ctx.ws, "rows")
            else:
                a = sparse_sum(d_r, w.neg(), plan.to_rows, ctx.ws, "rows").add_(_row_sums(w, plan, p.shape[1]))
            pa = rowdot(p, a)  # sum_s p[s] a[s]
            if ctx.needs_input_grad[1]:
                grad_log_m = gm * pa
            if ctx.needs_input_grad[0]:
                grad_z = a.sub_(pa.unsqueeze(1)).mul_(p).mul_(gm.unsqueeze(1))
        return grad_z, grad_log_m, None, None, None, None, grad_w, None, None, None


def teacher_on_image(q_t: torch.Tensor, plan: WPlan):
    """`w_merge_image`'s outputs from a full teacher chunk distribution q_t [n, V_T] (the other merges):
    (q_T on the image, sum q_T log q_T, mass off the image, argmax q_T)."""
    return (
        q_t.index_select(1, plan.image_ids),
        torch.xlogy(q_t, q_t).sum(-1),
        q_t.index_select(1, plan.off_image_ids).sum(-1),
        argmax(q_t),
    )


def p_kl_divergence(
    log_q_s: torch.Tensor, q_t: torch.Tensor, plan: WPlan, direction: str = "forward", w: torch.Tensor | None = None
):
    """P-KL per chunk from chunk distributions: D(q_T || W^T q_S) (forward) or D(W^T q_S || q_T) (reverse).

    log_q_s [n, V_S] float (log q_S, may require grad), q_t [n, V_T] (probabilities), ``plan`` from
    `xtoken.losses.w_plan`; ``w``: W's non-zero entries in the plan's order (default ``plan.w``), a tensor that
    requires grad to learn them (`xtoken.learned_projection.LearnableProjection`). (`p_kl_loss` never forms log q_S nor
    the full q_T.) Returns (d [n], r [n, n_image] = W^T q_S on W's image only, ``image`` the teacher ids of r's
    columns (r is zero on every other id), q_S = exp(log_q_s) [n, V_S] without gradient)."""
    w = plan.w if w is None else w
    log_m = torch.logsumexp(log_q_s, -1)  # exp(log q) = softmax(log q) * sum exp(log q)
    q_ti, neg_ent_t, off_t, _ = teacher_on_image(q_t, plan)
    aux = {}
    d = ProjectedKL.apply(
        log_q_s, log_m, q_ti, neg_ent_t, off_t, plan, w.to(log_q_s.dtype), direction == "reverse", None, aux
    )
    return d, aux["r"], plan.image_ids, aux["p"] * aux["m"].unsqueeze(1)


@torch.no_grad()
def _metrics(stats: dict, aux: dict, off_t, top_t, plan: WPlan) -> None:
    """From `ProjectedKL`'s ``aux`` (q_S = p m; r = W^T q_S and the row sums) and the teacher's mass off W's
    image and argmax: no pass beyond the argmax of r."""
    m_s = aux["m"] if aux["m"] is not None else torch.ones_like(aux["r_sum"])
    stats["mass_lost_empty_rows"] += (aux["p"].index_select(1, plan.empty).sum(-1) * m_s).sum().item()
    stats["top1_agreement"] += (plan.image_ids[argmax(aux["r"])] == top_t).sum().item()
    stats["student_common_mass"] += aux["r_sum"].sum().item()  # mass W carries to the teacher side
    stats["teacher_common_mass"] += aux["q_sum"].sum().item()  # teacher mass W can reach
    stats["student_chunk_mass"] += m_s.sum().item()
    stats["teacher_chunk_mass"] += (aux["q_sum"] + off_t).sum().item()


def p_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alignments: list,
    projection,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    merge: str = "w",
    chunk_size: int | None = None,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    student_id_map=None,
    teacher_id_map=None,
    weights: torch.Tensor | None = None,
    metrics: bool = True,
    student_tok=None,
    teacher_tok=None,
) -> tuple[torch.Tensor, dict]:
    """P-KL: the mean over the batch's predictable chunk pairs of D(q_T || W^T q_S) (``direction="forward"``) or
    D(W^T q_S || q_T) (``"reverse"``).

    student_logits [B, L_S, V_S'] and teacher_logits [B, L_T, V_T'], any float dtype (computed in float32, or
    float64 when either is float64); alignments: one `xtoken.align.Alignment` per row; projection: W
    (`xtoken.projection.Projection`). merge: the teacher's chunk distribution, "w" (C2), "chain", "first" or
    "mean". chunk_size: chunk pairs per block (None: sized by the element budget). *_vocab_size: real widths
    (columns beyond are padding); *_id_map: ids -> logit columns; student_tok / teacher_tok: checked against
    W, the teacher's size drops padded columns. weights [V_S, k]: row weights replacing ``projection.weights``
    (same pattern), differentiable: a learned W receives its gradient here. metrics=False: loss and counts only.

    Returns (loss: a scalar in the compute dtype, differentiable w.r.t. student_logits and weights; metrics:
    floats, see `xtoken.losses`)."""
    merge = merge or "w"
    if merge not in MERGES:
        raise ValueError(f"merge must be 'w', 'chain', 'first' or 'mean', not {merge!r}")
    batch = chunk_batch(
        student_logits,
        teacher_logits,
        alignments,
        projection,
        temperature=temperature,
        direction=direction,
        student_vocab_size=student_vocab_size,
        teacher_vocab_size=teacher_vocab_size,
        student_id_map=student_id_map,
        teacher_id_map=teacher_id_map,
        student_tok=student_tok,
        teacher_tok=teacher_tok,
    )
    plan, ws, dtype = batch.plan, batch.workspace, batch.dtype
    w_entries = None
    if weights is not None:  # learned W: [V_S, k] like projection.weights
        if tuple(weights.shape) != tuple(projection.weights.shape):
            raise ValueError(f"weights has shape {tuple(weights.shape)}, W has {tuple(projection.weights.shape)}")
        w_entries = weights[: batch.student_width].reshape(-1).index_select(0, plan.flat).to(dtype)
    stats = (
        dict.fromkeys(
            (
                "teacher_common_mass",
                "student_common_mass",
                "top1_agreement",
                "mass_lost_empty_rows",
                "student_chunk_mass",
                "teacher_chunk_mass",
            ),
            0.0,
        )
        if metrics
        else None
    )

    def block(lo, hi, grad, w_leaf):
        n = hi - lo
        s_tab, t_tab = batch.block(lo, hi)
        s_rows = split_rows(student_logits, s_tab, batch.student_width, batch.temperature, grad, ws, "s_", dtype)
        with torch.no_grad():
            if merge == "w":
                t_rows = split_rows(
                    teacher_logits, t_tab, batch.teacher_width, batch.temperature, ws=ws, name="t_", dtype=dtype
                )
                q_ti, neg_ent_t, off_t, top_t = w_merge_image(t_rows, t_tab, n, batch.gamma, plan)
            else:
                log_q_t, q_t = teacher_chunks(
                    teacher_logits, t_tab, n, merge, batch.teacher_width, batch.temperature, batch.gamma, ws, dtype
                )
                q_ti, neg_ent_t, off_t, top_t = teacher_on_image(log_q_t.exp() if q_t is None else q_t, plan)
        log_m = continuation_log_mass(s_rows, s_tab, n)
        w = plan.w if w_leaf is None else w_leaf
        aux = {} if metrics else None
        d = ProjectedKL.apply(
            s_rows.first, log_m, q_ti, neg_ent_t, off_t, plan, w.to(s_rows.first.dtype), direction == "reverse", ws, aux
        )
        if metrics:
            _metrics(stats, aux, off_t, top_t, plan)
        return d.sum(), s_rows.leaves

    return batch.result(batch.run(block, chunk_size, w_entries), alignments, stats)
