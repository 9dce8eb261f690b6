"""GOLD (baseline), H-KL and ULD: a KL on a common set C of paired ids plus ULD's sorted L1 on the rest.

    GOLD   C = strict 1-to-1 pairs (`Projection.exact_pairs`); common term sum_{(s,t) in C} q_T[t] (log q_T[t] -
           log q_S[s]) with q_S from the full softmax (no renormalization on C); plus ULD on the rest: the sorted
           L1 between the uncommon student and uncommon teacher probabilities, each sorted descending, zero-padded.
    H-KL   the same with C = {(s, top1(s))}: every non-empty student row paired with its largest W entry. Several
           student ids can share a teacher id t ('2', '20', '201' all have top-1 '2' under Qwen3); q_T[t] is then
           compared with the group's summed student mass g[t] = sum_{s: top1(s)=t} q_S[s]: q_T[t] log(q_T[t] /
           g[t]). This equals splitting q_T[t] among the group in proportion to the student's own probabilities,
           so the student is free to choose how the group shares the mass.
    ULD    the sorted L1 between the full chunk distributions.

Proposition 1 of the paper (GOLD's blind spot): the common term's gradient on an uncommon student logit j is
p_S[j] * M_C(T) >= 0, M_C(T) = sum_{t in C} q_T[t]; uncommon ids (Llama's multi-digit numerals under Qwen3) are
always pushed down. Both sides' chunk distributions are (C1) by default (``merge="chain"``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import checks
from .chunks import MERGES, chain_log_q, split_rows, teacher_chunks
from .engine import EPS, argmax, rowdot
from .plan import WPlan, chunk_batch


def sorted_l1(a: torch.Tensor, b: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """ULD's distance per row: sum_i |a_(i) - b_(i)|, both rows sorted descending and zero-padded to one length.

    a [n, V_a], b [n, V_b] float. top_k: compare only the k largest of each side, plus |remaining mass of a -
    remaining mass of b| (a lower bound on the exact value, equal to it when one side's tail is zero or the tails
    are ordered entry by entry). None: exact (`SortedL1`: partition, then sort only the k largest per side).
    Returns [n]."""
    if top_k is None or top_k >= min(a.shape[-1], b.shape[-1]):
        if b.requires_grad and not a.requires_grad:
            return SortedL1.apply(b, a)  # symmetric; gradient to the first
        if not b.requires_grad:
            return SortedL1.apply(a, b)
        k_max = max(a.shape[-1], b.shape[-1])  # both differentiable: plain autograd
        sa = F.pad(a.sort(-1, descending=True).values, (0, k_max - a.shape[-1]))
        sb = F.pad(b.sort(-1, descending=True).values, (0, k_max - b.shape[-1]))
        return (sa - sb).abs().sum(-1)
    ta = a.topk(top_k, -1).values
    tb = b.topk(top_k, -1).values
    rest = (a.sum(-1) - ta.sum(-1)) - (b.sum(-1) - tb.sum(-1))
    return (ta - tb).abs().sum(-1) + rest.abs()


class SortedL1(torch.autograd.Function):
    """Exact sorted L1, sum_i |a_(i) - b_(i)| (descending, zero-padded), gradient to a only (b is the teacher).

    Only the k = min(n_a, n_b) largest entries of each side are ever paired with non-zero partners; the
    rest meet the zero padding and add their sum. So the longer side is *partitioned* (linear time) at
    its k-th largest entry and only the k largest of each side are sorted (H-KL: k = 696 of ~42,000).
    Gradient: sign(a_(i) - b_(i)) at a's i-th largest entry, sign(a_j) = 1 (a_j > 0) in a's tail. On CPU the
    partitions and sorts are numpy's (SIMD sorts, several times faster than torch.sort)."""

    @staticmethod
    def forward(ctx, a, b):
        n_a, n_b = a.shape[-1], b.shape[-1]
        k = min(n_a, n_b)
        cpu = a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) and b.dtype == a.dtype
        lib_a = a.detach().numpy() if cpu else a.detach()
        lib_b = b.detach().numpy() if cpu else b.detach()
        # the k largest of b (values only) and the sum of the rest
        if cpu:
            part = np.partition(lib_b, n_b - k, axis=-1) if n_b > k > 0 else lib_b
            top_b, tail_b = np.sort(part[:, n_b - k :], axis=-1), part[:, : n_b - k].sum(-1)
        else:
            top_b = lib_b.topk(k, -1, sorted=False).values.sort(-1).values
            tail_b = lib_b.sum(-1) - top_b.sum(-1)
        # the k largest of a with their positions, ascending
        if cpu:
            idx = (
                np.argpartition(lib_a, n_a - k, axis=-1)[:, n_a - k :]
                if n_a > k and k > 0
                else np.broadcast_to(np.arange(n_a - k, n_a), (lib_a.shape[0], k))
            )
            idx = np.take_along_axis(idx, np.argsort(np.take_along_axis(lib_a, idx, -1), axis=-1), -1)
            top_a = np.take_along_axis(lib_a, idx, -1)
            diff = torch.from_numpy(top_a - top_b)
            idx = torch.from_numpy(np.ascontiguousarray(idx))
            tail_b = torch.as_tensor(tail_b, dtype=a.dtype)
        else:
            idx = lib_a.topk(k, -1, sorted=True).indices.flip(-1)
            diff = lib_a.gather(1, idx) - top_b
        tail_a = a.detach().sum(-1) - a.detach().gather(1, idx).sum(-1)
        if a.requires_grad:  # d/da: sign(a) in the tail, then the top k
            grad = torch.sign(a.detach())
            ctx.save_for_backward(grad.scatter_(1, idx, torch.sign(diff)))
        return diff.abs().sum(-1) + tail_a + tail_b

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.unsqueeze(1), None


class PermutedColumns(torch.autograd.Function):
    """x[:, perm] for a permutation of x's columns; backward: the inverse permutation's gather (index_select's
    backward zero-fills a buffer and scatter-adds into it)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.inverse = inverse
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx, g):
        return g.index_select(1, ctx.inverse), None, None


def hybrid_divergence(
    log_q_s: torch.Tensor,
    q_t: torch.Tensor | None,
    plan: WPlan,
    direction: str = "forward",
    common_weight: float = 1.0,
    uld_weight: float = 1.0,
    uld_top_k: int | None = None,
    log_q_t: torch.Tensor | None = None,
    need_g: bool = True,
    rest_mass: dict | None = None,
):
    """GOLD / H-KL per chunk: common-set KL + ULD sorted L1 on the uncommon rest.

    log_q_s [n, V_S] float (may require grad); the teacher as q_t [n, V_T] (probabilities) or log_q_t (then q_t may
    be None: the common term needs no xlogy pass and only the columns each term reads are exponentiated);
    ``plan`` from `xtoken.losses.w_plan` with ``pairing="exact"`` (GOLD) or ``"top1"`` (H-KL). ``rest_mass`` (a
    dict, if given) receives each side's uncommon mass. Returns (d [n], g the student mass per common teacher id
    [n, |t_common|] (None unless ``need_g``), q_t_c the teacher's [n, |t_common|])."""
    pairing = plan.pairing
    s_c, t_c, group = pairing.s_common, pairing.t_common, pairing.group
    teacher_cols = lambda cols: log_q_t.index_select(1, cols).exp() if q_t is None else q_t.index_select(1, cols)
    log_q_t_c = None if log_q_t is None else log_q_t.index_select(1, t_c)
    q_t_c = log_q_t_c.exp() if q_t is None else q_t.index_select(1, t_c)  # teacher mass on C
    g = None
    # the student's columns reordered once, common (in C's order) then uncommon, and split: the backward is
    # one gather and a concatenation (two index_selects would each zero-fill and scatter a [n, V_S] gradient)
    log_q_s_c, log_q_s_u = torch.split(
        PermutedColumns.apply(log_q_s, pairing.s_cols, pairing.s_cols_inv), [len(s_c), len(pairing.s_uncommon)], dim=1
    )
    if pairing.singleton:  # strict 1-to-1: exact logs
        log_g = log_q_s_c
    else:  # shared teacher ids: summed group mass
        g = torch.zeros_like(q_t_c).index_add(1, group, log_q_s_c.exp())
        log_g = torch.log(g.clamp_min(EPS))
    # plain KL terms on C (GOLD's common term; teacher probabilities from the full softmax)
    if direction == "forward":  # sum_C q_T log q_T - sum_C q_T log g (the first a constant: no gradient pass)
        neg_ent = None
        if log_q_t_c is not None:
            neg_ent = rowdot(q_t_c, log_q_t_c)
            if not bool(neg_ent.isfinite().all()):  # -inf teacher logits: 0 log 0 = 0 below
                neg_ent = None
        if neg_ent is None:
            neg_ent = torch.xlogy(q_t_c, q_t_c).sum(-1)
        common = neg_ent - (q_t_c * log_g).sum(-1)
    else:  # sum_C g (log g - log q_T)
        g = log_g.exp() if g is None else g
        common = (g * (log_g - torch.log(q_t_c.clamp_min(EPS)))).sum(-1)
    q_s_u, q_t_u = log_q_s_u.exp(), teacher_cols(pairing.t_uncommon)
    uld = sorted_l1(q_s_u, q_t_u, uld_top_k)
    if rest_mass is not None:  # the uncommon mass of each side (metrics)
        rest_mass.update(student=q_s_u.detach().sum(), teacher=q_t_u.sum())
    if g is None and need_g:
        g = log_g.detach().exp()
    return common_weight * common + uld_weight * uld, g, q_t_c


@torch.no_grad()
def _metrics(stats, log_q_s, log_m_s, log_q_t, q_t, q_t_c, rest_mass, plan: WPlan) -> None:
    """From the slices the loss exponentiated (common and uncommon partition each vocabulary): no full-width
    exp. The student's common mass is its chunk mass m (log_m_s; None: 1 per chunk) minus the uncommon mass."""
    student_chunk = float(len(log_q_s)) if log_m_s is None else log_m_s.detach().exp().sum().item()
    teacher_common, student_common = q_t_c.sum().item(), student_chunk - rest_mass["student"].item()
    stats["teacher_common_mass"] += teacher_common
    stats["student_common_mass"] += student_common
    stats["student_chunk_mass"] += student_chunk
    stats["teacher_chunk_mass"] += teacher_common + rest_mass["teacher"].item()
    stats["mass_lost_empty_rows"] += log_q_s.detach().index_select(1, plan.empty).exp().sum().item()
    teacher_top = argmax(log_q_t if log_q_t is not None else q_t)
    stats["top1_agreement"] += (plan.pairing.pair[argmax(log_q_s)] == teacher_top).sum().item()


_STATS = (
    "teacher_common_mass",
    "student_common_mass",
    "top1_agreement",
    "mass_lost_empty_rows",
    "student_chunk_mass",
    "teacher_chunk_mass",
)


def _hybrid_loss(
    pairing,
    student_logits,
    teacher_logits,
    alignments,
    projection,
    *,
    temperature,
    direction,
    merge,
    chunk_size,
    student_vocab_size,
    teacher_vocab_size,
    student_id_map,
    teacher_id_map,
    common_weight,
    uld_weight,
    uld_top_k,
    weights,
    metrics,
    student_tok,
    teacher_tok,
):
    """GOLD (pairing "exact"), H-KL ("top1") or ULD (None: no W, no common set)."""
    checks.direction(direction)
    if weights is not None:
        raise ValueError("weights= (a learned W) is a P-KL option: GOLD and H-KL use W only through its pattern")
    merge = merge or "chain"
    if merge not in MERGES:
        raise ValueError(f"merge must be 'w', 'chain', 'first' or 'mean', not {merge!r}")
    batch = chunk_batch(
        student_logits,
        teacher_logits,
        alignments,
        projection,
        temperature=temperature,
        direction=direction,
        pairing=pairing,
        student_vocab_size=student_vocab_size,
        teacher_vocab_size=teacher_vocab_size,
        student_id_map=student_id_map,
        teacher_id_map=teacher_id_map,
        student_tok=student_tok,
        teacher_tok=teacher_tok,
    )
    plan, ws, dtype = batch.plan, batch.workspace, batch.dtype
    stats = dict.fromkeys(_STATS, 0.0) if metrics else None

    def block(lo, hi, grad, _):
        n = hi - lo
        s_tab, t_tab = batch.block(lo, hi)
        s_rows = split_rows(student_logits, s_tab, batch.student_width, batch.temperature, grad, ws, "s_", dtype)
        with torch.no_grad():
            log_q_t, q_t = teacher_chunks(
                teacher_logits, t_tab, n, merge, batch.teacher_width, batch.temperature, batch.gamma, ws, dtype
            )
            if pairing is None and q_t is None:  # ULD reads the full q_T
                q_t = log_q_t.exp()
        log_q_s, log_m_s = chain_log_q(s_rows, s_tab, n)
        if pairing is None:  # ULD
            q_s = log_q_s.exp()
            d = sorted_l1(q_s, q_t, uld_top_k)
            if metrics:
                stats["student_chunk_mass"] += q_s.detach().sum().item()
                stats["teacher_chunk_mass"] += q_t.sum().item()
            return d.sum(), s_rows.leaves
        rest_mass = {} if metrics else None
        d, _, q_t_c = hybrid_divergence(
            log_q_s,
            q_t,
            plan,
            direction,
            common_weight,
            uld_weight,
            uld_top_k,
            log_q_t,
            need_g=False,
            rest_mass=rest_mass,
        )
        if metrics:
            _metrics(stats, log_q_s, log_m_s, log_q_t, q_t, q_t_c, rest_mass, plan)
        return d.sum(), s_rows.leaves

    return batch.result(batch.run(block, chunk_size), alignments, stats)


def gold_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alignments: list,
    projection,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    merge: str = "chain",
    chunk_size: int | None = None,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    student_id_map=None,
    teacher_id_map=None,
    common_weight: float = 1.0,
    uld_weight: float = 1.0,
    uld_top_k: int | None = None,
    weights=None,
    metrics: bool = True,
    student_tok=None,
    teacher_tok=None,
) -> tuple[torch.Tensor, dict]:
    """GOLD (baseline): the mean over chunk pairs of common_weight * KL on W's strict 1-to-1 pairs + uld_weight *
    ULD's sorted L1 on the rest.

    Inputs and options as `xtoken.losses.p_kl_loss` (merge default "chain": (C1) on both sides), plus
    ``uld_top_k`` (None: exact sorted L1; k: the k largest per side plus the remainder mass). ``weights`` is
    refused (ValueError): GOLD reads W's pattern only. Returns (scalar loss in the compute dtype, metrics)."""
    return _hybrid_loss(
        "exact",
        student_logits,
        teacher_logits,
        alignments,
        projection,
        temperature=temperature,
        direction=direction,
        merge=merge,
        chunk_size=chunk_size,
        student_vocab_size=student_vocab_size,
        teacher_vocab_size=teacher_vocab_size,
        student_id_map=student_id_map,
        teacher_id_map=teacher_id_map,
        common_weight=common_weight,
        uld_weight=uld_weight,
        uld_top_k=uld_top_k,
        weights=weights,
        metrics=metrics,
        student_tok=student_tok,
        teacher_tok=teacher_tok,
    )


def h_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alignments: list,
    projection,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    merge: str = "chain",
    chunk_size: int | None = None,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    student_id_map=None,
    teacher_id_map=None,
    common_weight: float = 1.0,
    uld_weight: float = 1.0,
    uld_top_k: int | None = None,
    weights=None,
    metrics: bool = True,
    student_tok=None,
    teacher_tok=None,
) -> tuple[torch.Tensor, dict]:
    """H-KL: GOLD's hybrid with C = {(s, top1_W(s))}; teacher ids shared by several student ids compare the
    group's summed student mass. Inputs, options and returns as `gold_loss`."""
    return _hybrid_loss(
        "top1",
        student_logits,
        teacher_logits,
        alignments,
        projection,
        temperature=temperature,
        direction=direction,
        merge=merge,
        chunk_size=chunk_size,
        student_vocab_size=student_vocab_size,
        teacher_vocab_size=teacher_vocab_size,
        student_id_map=student_id_map,
        teacher_id_map=teacher_id_map,
        common_weight=common_weight,
        uld_weight=uld_weight,
        uld_top_k=uld_top_k,
        weights=weights,
        metrics=metrics,
        student_tok=student_tok,
        teacher_tok=teacher_tok,
    )


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alignments: list,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    merge: str = "chain",
    chunk_size: int | None = None,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    student_id_map=None,
    teacher_id_map=None,
    uld_top_k: int | None = None,
    metrics: bool = True,
    student_tok=None,
    teacher_tok=None,
) -> tuple[torch.Tensor, dict]:
    """ULD: the mean over chunk pairs of the sorted L1 between the chunk distributions (no W; ``direction`` is
    checked but the distance is symmetric; ``teacher_tok``, when given, only drops the teacher's padded columns).
    Other inputs and returns as `gold_loss`."""
    return _hybrid_loss(
        None,
        student_logits,
        teacher_logits,
        alignments,
        None,
        temperature=temperature,
        direction=direction,
        merge=merge,
        chunk_size=chunk_size,
        student_vocab_size=student_vocab_size,
        teacher_vocab_size=teacher_vocab_size,
        student_id_map=student_id_map,
        teacher_id_map=teacher_id_map,
        common_weight=1.0,
        uld_weight=1.0,
        uld_top_k=uld_top_k,
        weights=None,
        metrics=metrics,
        student_tok=student_tok,
        teacher_tok=teacher_tok,
    )
