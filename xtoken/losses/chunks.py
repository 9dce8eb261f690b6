"""Chunk-level distributions: (C1) the chain rule along the observed path and (C2) the W-consistent merge, one
implementation each, plus the other teacher merges.

Logit row p predicts token p + 1; p_j = softmax(z_{j-1} / tau). A chunk spans tokens a..b-1 on one side, n = b - a.

    q(v) = p_a(v) * prod_{j=a+1}^{b-1} p_j(y_j)                                            (C1)

the probability that the chunk starts with v and continues as observed. Its mass m = prod_{j>a} p_j(y_j) <= 1 is
kept (not renormalized): the loss sees the continuation probability. In log space log q = log p_a + log m.

    q_T = sum_{i<n} omega_i p_T^{(i)},   omega_i = beta gamma^i / sum_{i'<n} beta gamma^{i'}       (C2)

with W's own decay (beta, gamma) = (0.9, 0.1) from `Projection.meta` (beta cancels). W spreads a student token
over its teacher spelling with exactly these weights, so a perfect pair (a student delta on '201', teacher
deltas on '2', '0', '1') has q_T = W^T q_S and zero P-KL. Taking the teacher's first position only
(merge="first") makes the optimum favour repeated-digit tokens: '999' puts all its projected mass on '9'
(0.9 + 0.09 + 0.009), so it best matches a teacher sure of '9'. merge="mean" is the mean-pooling of
log-probabilities used by the paper's public code, log q_T = (1/n) sum_i log p_T^{(i)}, given for comparison
only: it exponentiates to a vector whose mass is not the probability of anything. merge="chain" is (C1).

Rows come from the logits in two gathers per side and block (`split_rows`): each chunk's first token, and the
continuation tokens, so no [n_tokens, V] block is copied to pick the first rows out of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import Workspace, argmax, gather_rows, rowdot
from .plan import TokenTable, WPlan

MERGES = ("w", "chain", "first", "mean")


def log_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(x if temperature == 1 else x / temperature, dim=-1)


@dataclass
class Rows:
    """A block's logit rows of one side, padded columns dropped, divided by the temperature: ``first``
    [n_chunks, V] (each chunk's first token, in chunk order), ``rest`` [n_rest, V] (the continuation tokens;
    None when every chunk is one token), ``rest_index`` (their indices in the block's `TokenTable`) and
    ``leaves`` [(b, p, leaf)]: the gathered tensors, for `xtoken.losses.engine.run_blocks`."""

    first: torch.Tensor
    rest: torch.Tensor | None
    rest_index: torch.Tensor
    leaves: list


def split_rows(
    logits: torch.Tensor,
    table: TokenTable,
    width: int,
    temperature: float,
    grad: bool = False,
    ws: Workspace | None = None,
    name: str = "",
    dtype: torch.dtype | None = None,
) -> Rows:
    """The rows of ``table``'s tokens from ``logits`` [B, L, V'] as two gathers (first tokens, continuations).
    ``grad``: the leaves require grad (the student side); else the rows are divided in place."""
    first, rest = table.first_rest()
    xs, leaves = [], []
    for part, idx in (("first", first), ("rest", rest)):
        if part == "rest" and len(idx) == 0:
            xs.append(None)
            continue
        bi, pi = table.row.index_select(0, idx), table.pos.index_select(0, idx)
        leaf = gather_rows(logits, bi, pi, width, ws, name + part, dtype)
        leaf = leaf.detach().requires_grad_(True) if grad else leaf  # (an alias of the workspace buffer)
        leaves.append((bi, pi, leaf))
        xs.append(leaf if temperature == 1 else leaf / temperature if grad else leaf.div_(temperature))
    return Rows(xs[0], xs[1], rest, leaves)


# ---- (C1) ---------------------------------------------------------------------------------------


def _log_mass(observed: torch.Tensor, chunk_rest: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """log m = sum_{j>a} log p_j(y_j) per chunk [n_chunks] from the continuation tokens' observed log-probabilities
    and their chunks."""
    return torch.zeros(n_chunks, dtype=observed.dtype, device=observed.device).index_add(0, chunk_rest, observed)


def _with_continuation(log_q_first, observed, chunk_rest, n_chunks: int):
    """(C1) from each chunk's first-token log-probabilities [n_chunks, V] and the continuation tokens' observed
    log-probabilities log p_j(y_j) with their chunks: log q = log p_a + log m, log m added to the longer chunks'
    rows only (out of place when the rows require grad). Returns (log q, log m [n_chunks])."""
    log_mass = _log_mass(observed, chunk_rest, n_chunks)
    multi = torch.unique(chunk_rest)
    add = log_mass.index_select(0, multi).unsqueeze(1).expand(-1, log_q_first.shape[1])
    if log_q_first.requires_grad:
        return log_q_first.index_add(0, multi, add), log_mass
    return log_q_first.index_add_(0, multi, add), log_mass


def chain_rule_log_q(
    logp: torch.Tensor, chunk: torch.Tensor, ids: torch.Tensor, offset: torch.Tensor, n_chunks: int
) -> torch.Tensor:
    """(C1) in log space from per-token log-probabilities.

    logp [n_tokens, V] float: log p_j of every token of the chunks (chunk-major order); chunk / ids / offset
    [n_tokens] int64: each token's chunk, id and offset in its chunk. Returns log q [n_chunks, V], logp's dtype."""
    if len(chunk) == n_chunks:  # every chunk one token: log q = log p_a
        return logp
    first, rest = (offset == 0).nonzero().squeeze(1), (offset > 0).nonzero().squeeze(1)
    observed = logp.gather(1, ids.unsqueeze(1)).squeeze(1).index_select(0, rest)  # log p_j(y_j), j > a
    return _with_continuation(logp.index_select(0, first), observed, chunk.index_select(0, rest), n_chunks)[0]


def _observed(rows: Rows, table: TokenTable):
    """log p_j(y_j) of the continuation tokens of `split_rows`' rows [n_rest], and their chunks."""
    ids = table.ids.index_select(0, rows.rest_index)
    observed = torch.log_softmax(rows.rest, -1).gather(1, ids.unsqueeze(1)).squeeze(1)
    return observed, table.chunk.index_select(0, rows.rest_index)


def continuation_log_mass(rows: Rows, table: TokenTable, n_chunks: int) -> torch.Tensor | None:
    """log m per chunk [n_chunks] from `split_rows`' rows; None when every chunk is one token (m = 1)."""
    return None if rows.rest is None else _log_mass(*_observed(rows, table), n_chunks)


def chain_log_q(rows: Rows, table: TokenTable, n_chunks: int):
    """(C1) in log space from `split_rows`' rows. Returns (log q [n_chunks, V], log m [n_chunks] or None when
    every chunk is one token)."""
    log_q = torch.log_softmax(rows.first, -1)
    if rows.rest is None:
        return log_q, None
    return _with_continuation(log_q, *_observed(rows, table), n_chunks)


# ---- (C2) ---------------------------------------------------------------------------------------


def _w_mixtures(p_first, p_rest, table: TokenTable, n_chunks: int, gamma: float):
    """(C2) for the chunks longer than one token, at full width: each first row (p_first [n_chunks, V], chunk
    order) times omega_0, plus the continuation rows (p_rest, consumed) times their omega_i.
    Returns (multi, q_m): those chunks' indices and their mixtures [len(multi), V]."""
    offset, chunk = table.offset, table.chunk
    first, rest = table.first_rest()
    lens = torch.zeros(n_chunks, dtype=torch.long, device=p_first.device).index_add(0, chunk, torch.ones_like(chunk))
    # omega_i = gamma^i / sum_{i<n} gamma^i  (beta cancels), per token of the block
    omega = gamma ** offset.to(p_first.dtype) * (1 - gamma) / (1 - gamma ** lens[chunk].to(p_first.dtype))
    multi = (lens > 1).nonzero().squeeze(1)
    row_of = torch.zeros_like(lens).index_copy_(0, multi, torch.arange(len(multi), device=p_first.device))
    q_m = p_first.index_select(0, multi).mul_(omega.index_select(0, first.index_select(0, multi)).unsqueeze(1))
    q_m.index_add_(
        0, row_of.index_select(0, chunk.index_select(0, rest)), p_rest.mul_(omega.index_select(0, rest).unsqueeze(1))
    )
    return multi, q_m


def teacher_merge(
    logp: torch.Tensor,
    chunk: torch.Tensor,
    ids: torch.Tensor,
    offset: torch.Tensor,
    n_chunks: int,
    merge: str = "w",
    gamma: float = 0.1,
) -> torch.Tensor:
    """The teacher's chunk distribution q_T [n_chunks, V] (probabilities, not logs) from per-token log-probabilities
    logp [n_tokens, V] (chunk-major; chunk / ids / offset [n_tokens] int64 as in `chain_rule_log_q`).

    merge: "w" (C2, the default), "chain" (C1), "first" (first position only), "mean" (mean-pooled log-probs)."""
    if merge == "chain":
        return chain_rule_log_q(logp, chunk, ids, offset, n_chunks).exp()
    if merge == "first":
        return logp.index_select(0, (offset == 0).nonzero().squeeze(1)).exp()
    if merge == "mean":
        lens = torch.zeros(n_chunks, dtype=torch.long, device=logp.device).index_add(0, chunk, torch.ones_like(chunk))
        n = lens[chunk].to(logp.dtype)
        mean = torch.zeros(n_chunks, logp.shape[1], dtype=logp.dtype, device=logp.device)
        return mean.index_add(0, chunk, logp / n.unsqueeze(1)).exp()
    if merge != "w":
        raise ValueError(f"merge must be 'w', 'chain', 'first' or 'mean', not {merge!r}")
    p = logp.exp()
    if len(chunk) == n_chunks:  # every chunk one token: omega = 1
        return p
    table = TokenTable(chunk, chunk, ids, offset, chunk)  # (row and pos unused)
    first, rest = table.first_rest()
    q = p.index_select(0, first)
    multi, q_m = _w_mixtures(q, p.index_select(0, rest), table, n_chunks, gamma)
    return q.index_copy_(0, multi, q_m)


def _neg_entropy(p, x, lse):
    """sum_v p log p per row, with p = softmax(x) and lse = logsumexp(x): sum_v p (x - lse) = p.x - lse
    (a dot product, no log pass); xlogy where x has -inf entries (0 log 0 = 0)."""
    neg_ent = rowdot(p, x) - lse
    return neg_ent if bool(neg_ent.isfinite().all()) else torch.xlogy(p, p).sum(-1)


def xlogx_sum(q: torch.Tensor) -> torch.Tensor:
    """sum_v q log q per row of probabilities (0 log 0 = 0): q . log(max(q, tiny)), a log pass and a dot
    product (xlogy, then a sum, costs twice that here)."""
    return rowdot(q, q.clamp_min(torch.finfo(q.dtype).tiny).log_())


def _teacher_probs(x):
    """p = softmax(x) per row, sum_v p log p and argmax p, from one softmax (no log-softmax, no exp pass):
    logsumexp(x) = x_i - log p_i at i = argmax p, the best-conditioned entry (one argmax pass, which the
    metrics' teacher top-1 reuses, instead of a max over x and one over p)."""
    p = torch.softmax(x, -1)
    top = argmax(p)
    at = lambda y: y.gather(1, top.unsqueeze(1)).squeeze(1)
    return p, _neg_entropy(p, x, at(x) - at(p).log()), top


def w_merge_image(rows: Rows, table: TokenTable, n_chunks: int, gamma: float, plan: WPlan):
    """(C2) where P-KL reads it, from `split_rows`' teacher rows: q_T on W's image (q_ti [n_chunks, n_image]), and
    per chunk sum_v q_T log q_T, the mass off the image and argmax q_T (a teacher id). One-token chunks take
    their token's softmax as it is (omega = 1: only the image's columns are copied); the mixtures of longer
    chunks are formed at full width, for their rows only."""
    p, neg_ent, top = _teacher_probs(rows.first)
    q_ti = p.index_select(1, plan.image_ids)
    off = p.index_select(1, plan.off_image_ids).sum(-1)
    if rows.rest is None:
        return q_ti, neg_ent, off, top
    multi, q_m = _w_mixtures(p, torch.softmax(rows.rest, -1), table, n_chunks, gamma)
    q_ti.index_copy_(0, multi, q_m.index_select(1, plan.image_ids))
    off.index_copy_(0, multi, q_m.index_select(1, plan.off_image_ids).sum(-1))
    return q_ti, neg_ent.index_copy_(0, multi, xlogx_sum(q_m)), off, top.index_copy_(0, multi, argmax(q_m))


def teacher_chunks(
    teacher_logits: torch.Tensor,
    table: TokenTable,
    n_chunks: int,
    merge: str,
    width: int,
    temperature: float,
    gamma: float,
    ws: Workspace | None,
    dtype: torch.dtype,
):
    """The teacher's chunk distribution of a block for any merge: "chain" gives (log q_T, None) from split rows,
    the others (None, q_T) from `teacher_merge`. (P-KL's default, (C2) on W's image, is `w_merge_image`.)"""
    if merge == "chain":
        rows = split_rows(teacher_logits, table, width, temperature, ws=ws, name="t_", dtype=dtype)
        return chain_log_q(rows, table, n_chunks)[0], None
    logp = log_softmax(gather_rows(teacher_logits, table.row, table.pos, width, ws, dtype=dtype), temperature)
    return None, teacher_merge(logp, table.chunk, table.ids, table.offset, n_chunks, merge, gamma)
