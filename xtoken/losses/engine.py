"""Distillation losses: same-tokenizer KL, ULD, GOLD (baseline), X-Token's P-KL and H-KL (Sec. 3.3-3.5).

Plain tensors in, `(loss, metrics)` out. Every cross-tokenizer loss works on *chunk pairs* from
`xtoken.align` (spans of both tokenizations that decode to the same bytes) and on chunk-level
distributions built from the per-position distributions of the tokens in a chunk.

Notation. Logit row p predicts token p+1 (`Alignment.token_table`). p_j is the softmax of the logits
predicting token j, at temperature tau: p_j = softmax(z_{j-1} / tau). A chunk spans tokens a..b-1 on one
side; n = b - a.

Chunk-level distributions
-------------------------
chain rule along the observed path (student side; both sides of GOLD, H-KL and ULD):

    q(v) = p_a(v) * prod_{j=a+1}^{b-1} p_j(y_j)                                          (C1)

  the probability that the chunk starts with v and continues as observed. Its mass
  m = prod_{j>a} p_j(y_j) <= 1 is kept, not renormalized: the loss sees the continuation
  probability. Computed in log space: log q = log p_a + sum_j log p_j(y_j).

W-consistent merge (teacher side of P-KL, the default):

    q_T = sum_{i<n} omega_i p_T^{(i)},   omega_i = beta gamma^i / sum_{i'<n} beta gamma^{i'}     (C2)

  with W's own decay (beta, gamma) = (0.9, 0.1) from `Projection.meta`. W spreads a student token
  over its teacher spelling with exactly these weights, so a perfect pair (student delta on '201',
  teacher deltas on '2', '0', '1') has q_T = W^T q_S and zero loss. Taking the teacher's first
  position only (merge="first") makes the optimum favour repeated-digit tokens: '999' puts all
  its projected mass on '9' (0.9 + 0.09 + 0.009), so it best matches a teacher sure of '9'; a
  trial here measured 65% of P-KL answers being such tokens.

  merge="mean" is the official code's mean-pooling, log q_T = (1/n) sum_i log p_T^{(i)}, given for
  comparison only: averaged log-probabilities exponentiate to an unnormalized vector with no
  probabilistic meaning (its mass is not the probability of anything, and it can be far below 1
  even when every position is confident), so it is not the default. merge="chain" applies (C1).

Divergences
-----------
On sub-distributions (mass <= 1) the generalized KL

    D(q || r) = sum_v q(v) log(q(v) / r(v)) - sum_v q(v) + sum_v r(v)                      (D)

is non-negative and zero iff q = r. direction="forward" is D(teacher || student), "reverse" is
D(student || teacher). Zero-probability entries on the right are clamped at `EPS` (their
term is then constant, with zero gradient); `metrics` reports the teacher mass concerned.

Losses (each returns the mean over predictable chunk pairs of the batch):

  P-KL (X-Token eq. for P-KL)   D(q_T || W^T q_S), no partition. (W^T q)[t] = sum_s W[s,t] q[s] is a
                                gather-scatter over W's sparse rows, never a dense V_S x V_T matrix.
  GOLD (baseline)               C = strict 1-to-1 pairs (`Projection.exact_pairs`);
                                common term  sum_{(s,t) in C} q_T[t] (log q_T[t] - log q_S[s]) with
                                q_S from the full softmax (no renormalization on C);
                                + ULD on the rest: sorted L1 between the uncommon student and uncommon
                                teacher probabilities, each sorted descending, zero-padded.
  H-KL                          the same with C = {(s, top1(s))}: every non-empty student row is paired
                                with its largest W entry. Several student tokens can share a teacher
                                id t ('2', '20', '201' all have top-1 '2' under Qwen); the teacher mass
                                q_T[t] is then compared with the group's summed student mass
                                g[t] = sum_{s: top1(s)=t} q_S[s]:   q_T[t] log(q_T[t] / g[t]).
                                This equals splitting q_T[t] among the group in proportion to the
                                student's own probabilities (sum_s q_T[t] (q_S[s]/g) log(q_T[t] (q_S[s]/g) / q_S[s])),
                                so the student is free to choose how the group shares the mass.
  ULD                           sorted L1 between the full chunk distributions.
  KL (same tokenizer)           D(p_T || p_S) per position, positions 1:1.

Proposition 1 (GOLD's blind spot): the common term's gradient on an uncommon student logit j is
p_S[j] * M_C(T) >= 0, M_C(T) = sum_{t in C} q_T[t]; uncommon tokens (Llama's multi-digit numerals
under Qwen) are always pushed down. P-KL has no such sign constraint (tests/test_losses.py).

Temperature divides every logit on every path. No tau^2 factor is applied. Teacher logits are
treated as constants (no gradient flows to them).

Metrics (floats, means over chunk pairs unless a count): n_chunks, unpaired_student/_teacher (token
counts), teacher_common_mass (GOLD/H-KL: teacher mass on C; P-KL: teacher mass on W's image, the
teacher ids some student row reaches), student_common_mass (GOLD/H-KL: student mass on C; P-KL: mass
of W^T q_S), mass_lost_empty_rows (student mass on empty W rows), top1_agreement (teacher argmax ==
the student argmax mapped through the pairing, or argmax of W^T q_S for P-KL), student/teacher
chunk_mass (mass of the sub-distributions), loss. ``metrics=False`` (every loss) skips all but loss and
the counts: the argmaxes and masses cost a pass over each block, and a trainer needs them only on steps
it logs.

Memory: chunks are processed in blocks of `chunk_size`; each block's loss is differentiated at once
(`torch.autograd.grad`) and its gradient written into one buffer shaped like the student logits, so
peak extra memory is one block's work, whatever the batch size. ``chunk_size=None`` (default) sizes
blocks by a fixed element budget, proportionally larger at narrower vocabularies, where each block's ~50
small tensor ops would otherwise cost more than their arithmetic (the miniature's 372-1,362-id
vocabularies run in one block per batch). On GPUs: 64 chunks at Qwen3's 151,936 columns (256 positions
at 128,256 for `kl_loss`). On CPU: every block tensor within 2^23 elements (32 MiB in fp32), counting
the token rows of *both* sides (Qwen spells numbers digit by digit), so 32-55 chunks (42 on average)
at Qwen3's width in benchmarks/bench_losses.py, and 65 positions for `kl_loss` at Llama's. glibc maps
larger buffers afresh and page-faults them on every use, which cost 3-4x the arithmetic of such a
temporary here (benchmarks/README.md).
Precision: every loss computes in float32 whatever the logits' dtypes (float64 when either side is float64):
a block's rows are converted as they are gathered (float32 logits are not copied again), and the gradient is
returned in the student logits' dtype. float16 arithmetic would lose the probabilities below 6e-8 that KD
compares, and turns `EPS` into 0.

Padded vocabulary columns (Qwen3: 151,669 tokens, 151,936 logits) have zero probability on every path: they
are dropped when a block's rows are gathered (the same as masking them to -inf before the softmax). Which
columns are padding comes from W's ``meta["teacher_tokens"]`` (the teacher tokenizer's size, recorded by
`xtoken.projection.build_projection`), else from ``teacher_tok`` when given (ULD, or a W file written before
that was recorded), else from ``teacher_vocab_size`` / ``vocab_size``; with none of these every column up to
W's width counts. ``student_tok`` / ``teacher_tok`` (optional, every loss) are also checked against W's
recorded tokenizers (`xtoken.projection.Projection.check_tokenizers`).

Bad input fails loudly: a temperature that is not a finite number > 0, logits narrower than W (or the
student's and teacher's logits swapped), alignments that do not fit the logits' batch or length each raise a
ValueError saying which side is wrong. Teacher logits of -inf (a top-k masked teacher) are probabilities of
0: 0 log 0 = 0, and where a -inf teacher entry stands on the right of the divergence (reverse direction) its
probability is clamped at `EPS`, as for every zero there.

Every loss gathers a block's first-token rows (one per chunk) and continuation rows separately from the
logits (`_split_rows`), so neither side copies a [tokens, V] block to pick the first rows out of it, and
the student's backward writes each leaf's gradient straight into the buffer (no zero-filled block and
scatter). The continuations enter only through log m = sum_{j>a} log p_j(y_j).

P-KL never forms log q: its student side is one softmax of each chunk's first-token logits times the
continuation mass m = prod_{j>a} p_j(y_j) (the split of (C1)), and its backward applies the softmax
Jacobian by hand (`_ProjectedKL`): one softmax where the log-softmax route takes a log-softmax and an exp on
each side, and no log-softmax backward. Its teacher side (`_w_merge_image`) is one softmax per token
(sum_v p log p = p.x - logsumexp(x), a dot product), read only where P-KL reads it: the columns of W's image
and the mass off it; the (C2) mixtures are formed at full width for the longer chunks' rows only.
GOLD and H-KL reorder the student's columns once (common, then uncommon) with a permutation whose backward
is a gather (`_PermutedColumns`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["kl_loss", "uld_loss", "gold_loss", "p_kl_loss", "h_kl_loss", "dynamic_kd_scale",
           "chain_rule_log_q", "teacher_merge", "project_to_teacher", "generalized_kl", "sorted_l1",
           "p_kl_divergence", "hybrid_divergence", "EPS"]

EPS = 1e-12
BLOCK_ELEMENTS = 64 * 151_936         # default block budget on GPUs: cross-tokenizer losses (chunks x widest vocab)
KL_BLOCK_ELEMENTS = 256 * 128_256     # and kl_loss (positions x vocab)
# On CPU every tensor of a block stays within 2^23 elements (32 MiB in fp32): glibc serves larger buffers by
# a fresh mmap, page-faulted again on every use, which made each such temporary cost 3-4x its arithmetic here
# (benchmarks/README.md). Token rows on either side count, so a block of 64 Qwen chunks (~80 teacher rows) is split.
CPU_BLOCK_ELEMENTS = 1 << 23


def _budget(device, gpu_budget: int) -> int:
    return CPU_BLOCK_ELEMENTS if torch.device(device).type == "cpu" else gpu_budget


def _block_size(chunk_size: int | None, width: int, budget: int, floor: int) -> int:
    """``chunk_size`` if given, else as many rows as fit ``budget`` elements at ``width`` (at least ``floor``)."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
        return int(chunk_size)
    return max(floor, budget // max(int(width), 1))


def _block_bounds(n_items: int, chunk_size: int | None, starts: list | None = None, widths: list | None = None,
                  budget: int = CPU_BLOCK_ELEMENTS, floor: int = 1) -> list[tuple[int, int]]:
    """Blocks [lo, hi) of items (positions, or chunk pairs). ``chunk_size`` given: that many items per block.
    Else greedy: as many items as keep every side's token rows x width within ``budget`` elements (at least
    ``floor`` items, at least one). starts[i]: a side's token-row index where each item starts (length n_items+1)."""
    if chunk_size is not None or starts is None:
        step = _block_size(chunk_size, max(widths or [1]), budget, floor)
        return [(lo, min(lo + step, n_items)) for lo in range(0, n_items, step)]
    caps = [max(budget // max(int(w), 1), 1) for w in widths]
    bounds, lo = [], 0
    while lo < n_items:
        hi = min(int(np.searchsorted(st, st[lo] + cap, side="right")) - 1 for st, cap in zip(starts, caps))
        hi = min(max(hi, lo + floor, lo + 1), n_items)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim (first maximum, as torch's). On CPU numpy's SIMD argmax: 8x faster at 128,256
    columns than torch's (0.9 vs 6.9 ms for 64 rows)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.argmax(x.detach().numpy(), axis=-1))
    return x.argmax(-1)


# ---- chunk-level distributions ------------------------------------------------------------------

def _first_rest(offset: torch.Tensor):
    """Token-row indices of each chunk's first token (in chunk order: the tables are chunk-major) and of the
    continuation tokens."""
    return (offset == 0).nonzero().squeeze(1), (offset > 0).nonzero().squeeze(1)


def _continuation_log_mass(log_p_rest, chunk_rest, n_chunks: int):
    """log m = sum_{j>a} log p_j(y_j) per chunk, from the continuation tokens' log-probabilities and chunks."""
    return torch.zeros(n_chunks, dtype=log_p_rest.dtype, device=log_p_rest.device).index_add(0, chunk_rest, log_p_rest)


def chain_rule_log_q(logp: torch.Tensor, chunk: torch.Tensor, ids: torch.Tensor, offset: torch.Tensor,
                     n_chunks: int) -> torch.Tensor:
    """(C1) in log space. logp [n_tokens, V] per token of the chunks (chunk-major order);
    chunk/ids/offset [n_tokens]. Returns log q [n_chunks, V]."""
    if len(chunk) == n_chunks:                                            # every chunk one token: log q = log p_a
        return logp
    first, rest = _first_rest(offset)
    cont = logp.gather(1, ids.unsqueeze(1)).squeeze(1).index_select(0, rest)   # log p_j(y_j), j > a
    log_mass = _continuation_log_mass(cont, chunk.index_select(0, rest), n_chunks)
    multi = torch.unique(chunk.index_select(0, rest))                     # only longer chunks get a mass added
    return logp.index_select(0, first).index_add_(                       # log p_a(v) + log m
        0, multi, log_mass.index_select(0, multi).unsqueeze(1).expand(-1, logp.shape[1]))


def _chunk_log_mass(x_rest, ids_rest, chunk_rest, n_chunks: int):
    """log m = sum_{j>a} log p_j(y_j) per chunk from the continuation tokens' logit rows (log-softmax, then
    the observed ids' entries: the same numbers as `chain_rule_log_q`'s)."""
    log_p = torch.log_softmax(x_rest, -1).gather(1, ids_rest.unsqueeze(1)).squeeze(1)
    return _continuation_log_mass(log_p, chunk_rest, n_chunks)


def _split_rows(logits, table, width: int, temperature: float, grad: bool = False, ws: dict | None = None,
                name: str = "", dtype: torch.dtype | None = None):
    """A block's token rows as two gathers from the logits: each chunk's first token (one row per chunk, in
    chunk order) and the continuation tokens, padded columns dropped, divided by the temperature. Splitting
    at the gather saves the [n_tokens, V] copy (and, for the student, its backward's zero-filled buffer and
    scatter) that selecting the first rows out of one gathered block costs.

    Returns (x_first, x_rest, rest, parts): x_rest None when every chunk is one token; rest the table's
    continuation rows; parts [(b, p, leaf)] the leaves for `_run_blocks` (requiring grad if ``grad``)."""
    b, p, _, off, _ = table
    first, rest = _first_rest(off)
    xs, parts = [], []
    for part, idx in (("first", first), ("rest", rest)):
        if part == "rest" and len(idx) == 0:
            xs.append(None)
            continue
        bi, pi = b.index_select(0, idx), p.index_select(0, idx)
        leaf = _gather_rows(logits, bi, pi, width, ws, name + part, dtype)
        leaf = leaf.detach().requires_grad_(True) if grad else leaf        # (an alias of the workspace buffer)
        parts.append((bi, pi, leaf))
        xs.append(leaf if temperature == 1 else leaf / temperature if grad else leaf.div_(temperature))
    return xs[0], xs[1], rest, parts


def _chain_log_q(x_first, x_rest, table, rest, n_chunks: int):
    """(C1) in log space from `_split_rows`' rows: log_softmax of the first rows, plus log m on the rows of
    the longer chunks (out of place when the rows require grad: log_softmax's backward reads its output).
    Returns (log q, log m), log m None when every chunk is one token (m = 1: each row's mass is its m)."""
    log_q = torch.log_softmax(x_first, -1)
    if x_rest is None:
        return log_q, None
    _, _, ids, _, chunk = table
    chunk_rest = chunk.index_select(0, rest)
    log_mass = _chunk_log_mass(x_rest, ids.index_select(0, rest), chunk_rest, n_chunks)
    multi = torch.unique(chunk_rest)
    add = log_mass.index_select(0, multi).unsqueeze(1).expand(-1, log_q.shape[1])
    return (log_q.index_add(0, multi, add) if log_q.requires_grad else log_q.index_add_(0, multi, add)), log_mass


def teacher_merge(logp: torch.Tensor, chunk: torch.Tensor, ids: torch.Tensor, offset: torch.Tensor,
                  n_chunks: int, merge: str = "w", gamma: float = 0.1) -> torch.Tensor:
    """Teacher chunk distribution q_T [n_chunks, V] (not log): merge = "w" (C2), "chain" (C1),
    "first" (first position only), "mean" (official mean-pooling of log-probs)."""
    if merge == "chain":
        return chain_rule_log_q(logp, chunk, ids, offset, n_chunks).exp()
    if merge == "first":
        return logp.index_select(0, (offset == 0).nonzero().squeeze(1)).exp()
    lens = torch.zeros(n_chunks, dtype=torch.long, device=logp.device).index_add(0, chunk, torch.ones_like(chunk))
    n = lens[chunk].to(logp.dtype)
    if merge == "mean":
        mean = torch.zeros(n_chunks, logp.shape[1], dtype=logp.dtype, device=logp.device)
        return mean.index_add(0, chunk, logp / n.unsqueeze(1)).exp()
    if merge != "w":
        raise ValueError(f"merge must be 'w', 'chain', 'first' or 'mean', not {merge!r}")
    p = logp.exp()
    return _w_merge(p, _neg_entropy(p, logp, torch.zeros_like(p[:, 0])), chunk, offset, n_chunks, gamma)[0]


def _neg_entropy(p, x, lse):
    """sum_v p log p per row, with p = softmax(x) and lse = logsumexp(x): sum_v p (x - lse) = p.x - lse
    (a dot product, no log pass); xlogy where x has -inf entries (0 log 0 = 0)."""
    neg_ent = _rowdot(p, x) - lse
    return neg_ent if bool(neg_ent.isfinite().all()) else torch.xlogy(p, p).sum(-1)


def _teacher_probs(x):
    """p = softmax(x) per row, sum_v p log p and argmax p, from one softmax (no log-softmax, no exp pass):
    logsumexp(x) = x_i - log p_i at i = argmax p, the best-conditioned entry (one argmax pass, which the
    metrics' teacher top-1 reuses, instead of a max over x and one over p)."""
    p = torch.softmax(x, -1)
    top = _argmax(p)
    at = lambda y: y.gather(1, top.unsqueeze(1)).squeeze(1)
    return p, _neg_entropy(p, x, at(x) - at(p).log()), top


def _w_merge(p, neg_ent, chunk, offset, n_chunks: int, gamma: float):
    """(C2) and each chunk's sum_v q_T log q_T (the teacher's side of (D)) from the per-token probabilities
    p and their sum_v p log p: one-token chunks take both as they are, the mixtures of longer chunks are
    summed onto their first token's row and take xlogy on those rows only. p is consumed."""
    if len(chunk) == n_chunks:                                            # every chunk one token: omega = 1
        return p, neg_ent
    lens = torch.zeros(n_chunks, dtype=torch.long, device=p.device).index_add(0, chunk, torch.ones_like(chunk))
    n = lens[chunk].to(p.dtype)
    # omega_i = gamma^i / sum_{i<n} gamma^i  (beta cancels)
    omega = gamma ** offset.to(p.dtype) * (1 - gamma) / (1 - gamma ** n)
    first, rest = _first_rest(offset)
    q = p.index_select(0, first).mul_(omega.index_select(0, first).unsqueeze(1))
    p_rest = p.index_select(0, rest).mul_(omega.index_select(0, rest).unsqueeze(1))
    q.index_add_(0, chunk.index_select(0, rest), p_rest)
    neg = neg_ent.index_select(0, first)
    multi = (lens > 1).nonzero().squeeze(1)
    q_m = q.index_select(0, multi)
    return q, neg.index_copy_(0, multi, torch.xlogy(q_m, q_m).sum(-1))


def _w_merge_image(x_first, x_rest, table, rest, n_chunks: int, gamma: float, prep: dict):
    """(C2) where P-KL reads it, from `_split_rows`' teacher rows: q_T on W's image (q_ti [n_chunks, n_image]),
    and per chunk sum_v q_T log q_T, the mass off the image and argmax q_T (a teacher id). One-token chunks
    take their token's softmax as it is (omega = 1, the only columns copied being the image's); the
    mixtures of longer chunks are formed at full width, for their rows only (the same mixtures as `_w_merge`)."""
    p, neg_ent, top = _teacher_probs(x_first)
    q_ti = p.index_select(1, prep["image_ids"])
    off = p.index_select(1, prep["off_image_ids"]).sum(-1)
    if x_rest is None:
        return q_ti, neg_ent, off, top
    _, _, _, offset, chunk = table
    lens = torch.zeros(n_chunks, dtype=torch.long, device=p.device).index_add(0, chunk, torch.ones_like(chunk))
    # omega_i = gamma^i / sum_{i<n} gamma^i  (beta cancels), per token row of the block
    omega = gamma ** offset.to(p.dtype) * (1 - gamma) / (1 - gamma ** lens[chunk].to(p.dtype))
    first, _ = _first_rest(offset)
    multi = (lens > 1).nonzero().squeeze(1)
    row_of = torch.zeros_like(lens).index_copy_(0, multi, torch.arange(len(multi), device=p.device))
    q_m = p.index_select(0, multi).mul_(omega.index_select(0, first.index_select(0, multi)).unsqueeze(1))
    p_rest = torch.softmax(x_rest, -1).mul_(omega.index_select(0, rest).unsqueeze(1))
    q_m.index_add_(0, row_of.index_select(0, chunk.index_select(0, rest)), p_rest)
    q_ti.index_copy_(0, multi, q_m.index_select(1, prep["image_ids"]))
    off.index_copy_(0, multi, q_m.index_select(1, prep["off_image_ids"]).sum(-1))
    return q_ti, neg_ent.index_copy_(0, multi, _xlogx_sum(q_m)), off, top.index_copy_(0, multi, _argmax(q_m))


def _xlogx_sum(q):
    """sum_v q log q per row of probabilities (0 log 0 = 0): q . log(max(q, tiny)), a log pass and a dot
    product (xlogy, then a sum, costs twice that here)."""
    return _rowdot(q, q.clamp_min(torch.finfo(q.dtype).tiny).log_())


def _teacher_on_image(q_t: torch.Tensor, prep: dict):
    """`_w_merge_image`'s outputs from a full teacher chunk distribution q_t [n, V_T] (other merges)."""
    return (q_t.index_select(1, prep["image_ids"]), torch.xlogy(q_t, q_t).sum(-1),
            q_t.index_select(1, prep["off_image_ids"]).sum(-1), _argmax(q_t))


def project_to_teacher(q_s: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, w: torch.Tensor,
                       teacher_width: int) -> torch.Tensor:
    """(W^T q)[t] = sum_s W[s, t] q[s] for each row of q_s [n, V_S]: gather q at W's non-zero entries
    (rows, cols, w: flat, from `_prepared`) and scatter-add into teacher columns. No dense W."""
    out = torch.zeros(q_s.shape[0], teacher_width, dtype=q_s.dtype, device=q_s.device)
    return out.index_add(1, cols, q_s.index_select(1, rows) * w.to(q_s.dtype))


def generalized_kl(q: torch.Tensor, r: torch.Tensor, log_q: torch.Tensor | None = None,
                   log_r: torch.Tensor | None = None) -> torch.Tensor:
    """(D) per row: sum q log(q/r) - sum q + sum r; 0 log 0 = 0; r clamped at EPS under the log."""
    log_q = torch.log(q.clamp_min(EPS)) if log_q is None else log_q
    log_r = torch.log(r.clamp_min(EPS)) if log_r is None else log_r
    term = torch.where(q > 0, q * (log_q - log_r), torch.zeros_like(q))
    return term.sum(-1) - q.sum(-1) + r.sum(-1)


def sorted_l1(a: torch.Tensor, b: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """ULD: sum_i |a_(i) - b_(i)| per row, both sorted descending and zero-padded to one length.

    top_k: compare only the k largest of each side, plus |remaining mass of a - remaining mass of b|
    (a lower bound on the exact value, equal to it when one side's tail is zero or the tails are
    ordered entry by entry). None: exact (`_SortedL1`: partition, then sort only the k largest per side).
    """
    if top_k is None or top_k >= min(a.shape[-1], b.shape[-1]):
        if b.requires_grad and not a.requires_grad:
            return _SortedL1.apply(b, a)                                  # symmetric; gradient to the first
        if not b.requires_grad:
            return _SortedL1.apply(a, b)
        k_max = max(a.shape[-1], b.shape[-1])                             # both differentiable: plain autograd
        sa = F.pad(a.sort(-1, descending=True).values, (0, k_max - a.shape[-1]))
        sb = F.pad(b.sort(-1, descending=True).values, (0, k_max - b.shape[-1]))
        return (sa - sb).abs().sum(-1)
    ta = a.topk(top_k, -1).values
    tb = b.topk(top_k, -1).values
    rest = (a.sum(-1) - ta.sum(-1)) - (b.sum(-1) - tb.sum(-1))
    return (ta - tb).abs().sum(-1) + rest.abs()


def _rowdot(x, y):
    """Row-wise sum(x * y). On CPU, wide rows (>= 8,192 columns) take a loop of dot products (no [n, V]
    temporary; 3-7x faster than bmm or x * y at 151,936 columns); narrow rows one vectorised x * y
    (the loop's per-row call costs more than the arithmetic: 15x slower at 1,400 x 372)."""
    if x.device.type == "cpu" and x.shape[-1] >= 8192:
        return torch.stack([a.dot(b) for a, b in zip(x, y)]) if len(x) else x.new_zeros(0)
    if x.device.type == "cpu":
        return (x * y).sum(-1)
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)


def _out(ws: dict | None, name: str, like: torch.Tensor) -> dict:
    """``out=`` for a block temporary: a buffer kept in the call's workspace ``ws`` and reused by every block
    (torch resizes it in place; its storage only grows), so on CPU it is page-faulted in once per loss call
    instead of once per block. No workspace (None): a fresh tensor."""
    if ws is None:
        return {}
    key = (name, like.dtype, like.device)
    buf = ws.get(key)
    if buf is None or not buf.untyped_storage().resizable():             # (numpy views pin a storage: `_argmax`)
        buf = ws[key] = torch.empty(0, dtype=like.dtype, device=like.device)
    return {"out": buf.resize_(0)}                                        # (resize_ keeps the storage)


def _sparse_sum(x, w, plan: dict, into: str, ws: dict | None = None):
    """x @ W restricted to W's image (``into="image"``: x [n, V_S] -> [n, n_image]) or x @ W^T back onto the
    student rows (``into="rows"``: x [n, n_image] -> [n, V_S]); W given by its entry lists in ``plan`` and
    the entry values ``w`` (fixed, or learned and differentiable upstream).

    Most of W's columns (and rows) hold a single entry, so a dense gather of each output column's first
    entry plus a scatter-add of the few others replaces a scatter-add of all of them (same sum, fewer
    scattered writes). (A CSR sparse-dense product was measured too: no faster inside the loss, at the
    miniature's or the full vocabularies.)"""
    first, has, rest = plan[into + "_first"], plan[into + "_has"], plan[into + "_rest"]
    out = torch.index_select(x, 1, plan[into + "_src_first"], **_out(ws, "sparse_" + into, x))
    out.mul_(torch.where(has, w.index_select(0, first), 0.0))
    if len(rest):
        extra = torch.index_select(x, 1, plan[into + "_src_rest"], **_out(ws, "sparse_rest_" + into, x))
        out.index_add_(1, plan[into + "_dst_rest"], extra.mul_(w.index_select(0, rest)))
    return out


class _PermutedColumns(torch.autograd.Function):
    """x[:, perm] for a permutation of x's columns; backward: the inverse permutation's gather (index_select's
    backward zero-fills a buffer and scatter-adds into it)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.inverse = inverse
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx, g):
        return g.index_select(1, ctx.inverse), None, None


class _SortedL1(torch.autograd.Function):
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
            top_b, tail_b = np.sort(part[:, n_b - k:], axis=-1), part[:, :n_b - k].sum(-1)
        else:
            top_b = lib_b.topk(k, -1, sorted=False).values.sort(-1).values
            tail_b = lib_b.sum(-1) - top_b.sum(-1)
        # the k largest of a with their positions, ascending
        if cpu:
            idx = np.argpartition(lib_a, n_a - k, axis=-1)[:, n_a - k:] if n_a > k and k > 0 else \
                np.broadcast_to(np.arange(n_a - k, n_a), (lib_a.shape[0], k))
            idx = np.take_along_axis(idx, np.argsort(np.take_along_axis(lib_a, idx, -1), axis=-1), -1)
            top_a = np.take_along_axis(lib_a, idx, -1)
            diff = torch.from_numpy(top_a - top_b)
            idx = torch.from_numpy(np.ascontiguousarray(idx))
            tail_b = torch.as_tensor(tail_b, dtype=a.dtype)
        else:
            idx = lib_a.topk(k, -1, sorted=True).indices.flip(-1)
            diff = lib_a.gather(1, idx) - top_b
        tail_a = a.detach().sum(-1) - a.detach().gather(1, idx).sum(-1)
        if a.requires_grad:                                               # d/da: sign(a) in the tail, then the top k
            grad = torch.sign(a.detach())
            ctx.save_for_backward(grad.scatter_(1, idx, torch.sign(diff)))
        return diff.abs().sum(-1) + tail_a + tail_b

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.unsqueeze(1), None


class _ProjectedKL(torch.autograd.Function):
    """Per row: D(q_T || W^T q) (forward) or D(W^T q || q_T) (reverse), from the logits z [n, V_S] of each
    chunk's first student token and the log-mass of its continuation, log m = sum_{j>a} log p_j(y_j) [n]
    (None: one-token chunks), so that q = softmax(z) * m is (C1). One softmax, no log-softmax or exp pass.

    r = W^T q is computed only on W's *image* (the teacher ids some student row reaches, ~110k of
    Qwen's 151,669 for Llama): elsewhere r = 0, so those columns' terms of (D) are known without a
    pass over them: forward q_T[t] (log q_T[t] - log EPS) - q_T[t] (zero gradient, r clamped at EPS),
    reverse q_T[t]. So the teacher comes as q_ti (q_T on the image, [n, n_image]), neg_ent_t
    (sum_v q_T log q_T over every id) and off_t (its mass off the image), all per row (`_w_merge_image`).
    Hand-written backward (fewer full-width passes than autograd's): with r = W^T q,
      forward:  dD/dr = 1 - q_T / r,   reverse: dD/dr = log r - log q_T,
      a[s] = dD/dq[s] = sum_k W[s, t_k] dD/dr[t_k]         (a gather over W's entries, then a scatter-add),
      dD/dz = m p * (a - sum_s p[s] a[s]),  dD/dlog m = m sum_s p[s] a[s]    (softmax's Jacobian, p = softmax(z)),
      dD/dW[s, t] = q[s] * dD/dr[t]                       (only when the weights are learned, issue 8).
    r is clamped at EPS under the logs. Returns d per row; ``aux`` (a dict, if given) receives p, m (None
    for one-token chunks), r, and the row sums r_sum = sum r and q_sum = sum q_ti, without gradient.
    """

    @staticmethod
    def forward(ctx, z, log_m, q_ti, neg_ent_t, off_t, plan, w, reverse: bool, ws: dict | None = None,
                aux: dict | None = None):
        p = torch.softmax(z, -1)
        m = None if log_m is None else log_m.exp()
        r = _sparse_sum(p, w, plan, "image", ws)                            # r = W^T q on the image
        if m is not None:
            r.mul_(m.unsqueeze(1))
        r_sum, q_sum = r.sum(-1), q_ti.sum(-1)
        m_t = q_sum + off_t                                               # sum_v q_T
        r_c = torch.clamp_min(r, EPS, **_out(ws, "r_c", r))
        if not reverse:
            # dD/dr = 1 - q_T / r (the 1 added in backward), with r clamped at EPS as in the value. Where
            # r < EPS this is the gradient of the unclamped divergence with EPS for r: still bounded, since
            # q_S[s] W[s, t] <= r[t] makes each student term q_S[s] W[s, t] q_T[t] / EPS <= q_T[t].
            d_r = torch.div(q_ti, r_c, **_out(ws, "d_r", r))
        log_r = r_c.log_()
        if reverse:     # sum_img r (log r - log q_T) - sum r + sum q_T
            d_r = log_r.sub_(torch.clamp_min(q_ti, EPS, **_out(ws, "q_c", q_ti)).log_())   # dD/dr = log r - log q_T
            d = _rowdot(r, d_r) - r_sum + m_t
        else:           # sum q_T log q_T - sum_img q_T log r - (mass off the image) log EPS - sum q_T + sum r
            d = neg_ent_t - _rowdot(q_ti, log_r) - off_t * np.log(EPS) - m_t + r_sum
        ctx.save_for_backward(p, m, d_r, w)
        ctx.reverse, ctx.plan, ctx.ws = reverse, plan, ws
        if aux is not None:
            aux.update(p=p, m=m, r=r, r_sum=r_sum, q_sum=q_sum)
        return d

    @staticmethod
    def backward(ctx, g):
        p, m, d_r, w = ctx.saved_tensors
        plan = ctx.plan
        gm = g if m is None else g * m                                    # the upstream gradient times the mass
        grad_w = grad_z = grad_log_m = None
        if ctx.needs_input_grad[6]:                                       # learned W: dD/dW[e] = q[rows_e] dD/dr[cols_e]
            d_r_e = d_r.index_select(1, plan["img_cols"])
            d_r_e = d_r_e if ctx.reverse else d_r_e.neg_().add_(1.0)
            grad_w = (p.index_select(1, plan["rows"]) * d_r_e).mul_(gm.unsqueeze(1)).sum(0)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # a[s] = sum_k W[s, t_k] dD/dr[t_k]; forward: sum_k W[s, t_k] - sum_k W[s, t_k] q_T[t_k] / r[t_k]
            # (the sum with -W, then W's row sums added: one pass fewer than negating a)
            if ctx.reverse:
                a = _sparse_sum(d_r, w, plan, "rows", ctx.ws)
            else:
                a = _sparse_sum(d_r, w.neg(), plan, "rows", ctx.ws).add_(_row_sums(w, plan, p.shape[1]))
            pa = _rowdot(p, a)                                            # sum_s p[s] a[s]
            if ctx.needs_input_grad[1]:
                grad_log_m = gm * pa
            if ctx.needs_input_grad[0]:
                grad_z = a.sub_(pa.unsqueeze(1)).mul_(p).mul_(gm.unsqueeze(1))
        return grad_z, grad_log_m, None, None, None, None, grad_w, None, None, None


def _row_sums(w, plan: dict, width: int) -> torch.Tensor:
    """sum_t W[s, t] per student row: cached for W's own entries, recomputed for learned ones."""
    if w is plan["w"] and "row_sums" in plan:
        return plan["row_sums"]
    sums = torch.zeros(width, dtype=w.dtype, device=w.device).index_add_(0, plan["rows"], w)
    if w is plan["w"]:
        plan["row_sums"] = sums
    return sums


def p_kl_divergence(log_q_s: torch.Tensor, q_t: torch.Tensor, prep: dict, direction: str = "forward",
                    w: torch.Tensor | None = None):
    """P-KL per chunk: D(q_T || W^T q_S) (forward) or D(W^T q_S || q_T) (reverse), from log q_S [n, V_S] and
    q_T [n, V_T] (the losses themselves never form log q_S nor the full q_T: `_cross_tokenizer`).

    Returns (d, r, image, q_S): r = W^T q_S on W's image only, ``image`` the teacher ids of r's columns
    (r is zero on every other id), q_S = exp(log_q_s) (no gradient). w: W's non-zero entries in ``prep``'s order
    (default ``prep["w"]``); pass a tensor that requires grad to learn them (`xtoken.projection.LearnableProjection`)."""
    w = prep["w"] if w is None else w
    log_m = torch.logsumexp(log_q_s, -1)                                  # exp(log q) = softmax(log q) * sum exp(log q)
    q_ti, neg_ent_t, off_t, _ = _teacher_on_image(q_t, prep)
    aux = {}
    d = _ProjectedKL.apply(log_q_s, log_m, q_ti, neg_ent_t, off_t, prep, w.to(log_q_s.dtype), direction == "reverse",
                           None, aux)
    return d, aux["r"], prep["image_ids"], aux["p"] * aux["m"].unsqueeze(1)


def hybrid_divergence(log_q_s: torch.Tensor, q_t: torch.Tensor | None, prep: dict, direction: str = "forward",
                      common_weight: float = 1.0, uld_weight: float = 1.0, uld_top_k: int | None = None,
                      log_q_t: torch.Tensor | None = None, need_g: bool = True, rest_mass: dict | None = None):
    """GOLD / H-KL per chunk: common-set KL + ULD sorted L1 on the uncommon rest. Returns (d, g, q_t_c):
    d per chunk, g the student mass per common teacher id (None unless ``need_g`` or computed anyway), q_t_c
    the teacher's.

    prep: from `_prepared` with the pairing (strict for GOLD, top-1 for H-KL). Give q_t, or log_q_t (the chain
    rule's teacher side; q_t may then be None): with log q_T the common term needs no xlogy pass, and only the
    columns each term reads are exponentiated (with a strict 1-to-1 pairing the full-width q_S is never formed)."""
    s_c, t_c, group = prep["s_common"], prep["t_common"], prep["group"]
    teacher_cols = lambda cols: log_q_t.index_select(1, cols).exp() if q_t is None else q_t.index_select(1, cols)
    log_q_t_c = None if log_q_t is None else log_q_t.index_select(1, t_c)
    q_t_c = log_q_t_c.exp() if q_t is None else q_t.index_select(1, t_c)                  # teacher mass on C
    g = None
    # the student's columns reordered once, common (in C's order) then uncommon, and split: the backward is
    # one gather and a concatenation (two index_selects would each zero-fill and scatter a [n, V_S] gradient)
    log_q_s_c, log_q_s_u = torch.split(_PermutedColumns.apply(log_q_s, prep["s_cols"], prep["s_cols_inv"]),
                                       [len(s_c), len(prep["s_uncommon"])], dim=1)
    if prep["singleton"]:                                                 # strict 1-to-1: exact logs
        log_g = log_q_s_c
    else:                                                                 # shared teacher ids: summed group mass
        g = torch.zeros_like(q_t_c).index_add(1, group, log_q_s_c.exp())
        log_g = torch.log(g.clamp_min(EPS))
    # plain KL terms on C (GOLD's common term; teacher probabilities from the full softmax)
    if direction == "forward":      # sum_C q_T log q_T - sum_C q_T log g (the first a constant: no gradient pass)
        neg_ent = None
        if log_q_t_c is not None:
            neg_ent = _rowdot(q_t_c, log_q_t_c)
            if not bool(neg_ent.isfinite().all()):                        # -inf teacher logits: 0 log 0 = 0 below
                neg_ent = None
        if neg_ent is None:
            neg_ent = torch.xlogy(q_t_c, q_t_c).sum(-1)
        common = neg_ent - (q_t_c * log_g).sum(-1)
    else:                           # sum_C g (log g - log q_T)
        g = log_g.exp() if g is None else g
        common = (g * (log_g - torch.log(q_t_c.clamp_min(EPS)))).sum(-1)
    q_s_u, q_t_u = log_q_s_u.exp(), teacher_cols(prep["t_uncommon"])
    uld = sorted_l1(q_s_u, q_t_u, uld_top_k)
    if rest_mass is not None:                                             # the uncommon mass of each side (metrics)
        rest_mass.update(student=q_s_u.detach().sum(), teacher=q_t_u.sum())
    if g is None and need_g:
        g = log_g.detach().exp()
    return common_weight * common + uld_weight * uld, g, q_t_c


# ---- W preparation (cached per Projection object) -----------------------------------------------

_PREP: dict = {}


def _prepared(proj, kind: str, student_width: int, teacher_width: int, device) -> dict:
    """Flat non-zero entries of W and the common-set pairing, restricted to the real vocab columns."""
    key = (id(proj), kind, student_width, teacher_width, str(device))
    hit = _PREP.get(key)
    if hit is not None and hit[0] is proj:
        return hit[1]
    idx, w = proj.indices[:student_width], proj.weights[:student_width]
    keep = (idx >= 0) & (idx < teacher_width) & (w > 0)
    rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)[keep]
    prep = {"rows": rows.to(device), "cols": idx[keep].to(device), "w": w[keep].to(device),
            "flat": keep.reshape(-1).nonzero().squeeze(1).to(device)}  # entries' positions in weights[:V_S].view(-1)
    from .projection import EMPTY
    image_ids, img_cols = torch.unique(prep["cols"].cpu(), return_inverse=True)
    image = torch.zeros(teacher_width, dtype=torch.bool)
    image[image_ids] = True
    prep["image"] = image.to(device)                                      # teacher ids some student row reaches
    prep["image_ids"], prep["img_cols"] = image_ids.to(device), img_cols.to(device)   # and each entry's column among them
    prep["off_image_ids"] = (~image).nonzero().squeeze(1).to(device)     # the teacher ids no student row reaches
    # for _sparse_sum, per direction: each output column's first entry (gathered densely) and the other entries
    for name, src, dst, width in (("image", rows, img_cols, len(image_ids)), ("rows", img_cols, rows, student_width)):
        first = torch.full((width,), len(dst), dtype=torch.long).scatter_reduce_(
            0, dst, torch.arange(len(dst)), reduce="amin")
        has = first < len(dst)
        rest = torch.ones(len(dst), dtype=torch.bool)
        rest[first[has]] = False
        rest = rest.nonzero().squeeze(1)
        first = first.clamp_max(max(len(dst) - 1, 0))               # columns without entries: any entry, weight 0
        src_first = src[first] if len(src) else torch.zeros_like(first)   # (an all-empty W: any column, weight 0)
        prep.update({name + "_first": first.to(device), name + "_has": has.to(device), name + "_rest": rest.to(device),
                     name + "_src_first": src_first.to(device), name + "_src_rest": src[rest].to(device),
                     name + "_dst_rest": dst[rest].to(device)})
    prep["empty"] = (proj.row_kind[:student_width] == EMPTY).nonzero().squeeze(1).to(device)
    if kind in ("gold", "hkl"):
        pair = proj.exact_pairs() if kind == "gold" else proj.top1()
        pair = pair[:student_width]
        pair = torch.where(pair < teacher_width, pair, torch.full_like(pair, -1))
        s_common = (pair >= 0).nonzero().squeeze(1)
        t_ids, group = torch.unique(pair[s_common], return_inverse=True)   # group: s -> index into t_common
        first = torch.full((len(t_ids),), -1, dtype=torch.long)
        first.scatter_reduce_(0, group, torch.arange(len(s_common)), reduce="amin", include_self=False)
        t_mask = torch.ones(teacher_width, dtype=torch.bool)
        t_mask[t_ids] = False
        s_uncommon = (pair < 0).nonzero().squeeze(1)
        s_cols = torch.cat([s_common[first] if len(t_ids) == len(s_common) else s_common, s_uncommon])
        s_cols_inv = torch.empty_like(s_cols)
        s_cols_inv[s_cols] = torch.arange(len(s_cols))                    # (common and uncommon: every student id)
        prep.update(s_common=s_common.to(device), t_common=t_ids.to(device), group=group.to(device),
                    group_first=first.to(device), singleton=len(t_ids) == len(s_common),
                    s_uncommon=s_uncommon.to(device), s_cols=s_cols.to(device), s_cols_inv=s_cols_inv.to(device),
                    t_uncommon=t_mask.nonzero().squeeze(1).to(device), pair=pair.to(device))
    _PREP[key] = (proj, prep)
    return prep


# ---- batching: chunk tables, blocks, eager per-block gradients ----------------------------------

def _chunk_plan(alignments, device):
    """Flat token tables over the predictable chunks of all rows, student and teacher sides:
    (row, logit position, token id, offset in chunk, chunk index), chunk-major. `Alignment.token_table`
    for the whole batch at once (one set of array ops per side, not one per row)."""
    keep = [np.flatnonzero(a.predictable) for a in alignments]
    counts = np.array([len(k) for k in keep], dtype=np.int64)
    n_chunks = int(counts.sum())
    row_of_chunk = np.repeat(np.arange(len(alignments)), counts)
    sides = {}
    for side in ("student", "teacher"):
        if n_chunks == 0:
            sides[side] = [torch.zeros(0, dtype=torch.long, device=device) for _ in range(5)]
            continue
        spans = np.concatenate([(a.student_spans if side == "student" else a.teacher_spans)[k]
                                for a, k in zip(alignments, keep)])
        rows = [a.student_ids if side == "student" else a.teacher_ids for a in alignments]
        row_start = np.zeros(len(rows), dtype=np.int64)
        row_start[1:] = np.cumsum([len(r) for r in rows])[:-1]
        lens = spans[:, 1] - spans[:, 0]
        chunk = np.repeat(np.arange(n_chunks), lens)
        offset = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        pos = np.repeat(spans[:, 0], lens) + offset
        batch = row_of_chunk[chunk]
        ids = np.concatenate(rows)[row_start[batch] + pos]
        sides[side] = [torch.as_tensor(x.astype(np.int64), device=device) for x in (batch, pos - 1, ids, offset, chunk)]
    return sides, n_chunks


def _block(table, lo: int, hi: int, id_map: torch.Tensor | None = None):
    """Token rows of chunks [lo, hi) (tables are chunk-major, so a contiguous slice); token ids through
    ``id_map`` if given."""
    batch, pos, ids, off, chunk = table
    i, j = torch.searchsorted(chunk, torch.tensor([lo, hi], device=chunk.device)).tolist()
    ids = ids[i:j] if id_map is None else id_map[ids[i:j]]
    return batch[i:j], pos[i:j], ids, off[i:j], chunk[i:j] - lo


class _EagerBlockGrad(torch.autograd.Function):
    """Returns a loss computed block by block whose gradients w.r.t. the student logits (and the
    learned W entries, if any) were already accumulated during the forward pass (each block
    differentiated and freed at once)."""

    @staticmethod
    def forward(ctx, student_logits, extra, total, grad, grad_extra):
        ctx.save_for_backward(grad, grad_extra)
        return total.clone()

    @staticmethod
    def backward(ctx, g):
        grad, grad_extra = ctx.saved_tensors
        one = g.numel() == 1 and float(g) == 1.0                          # the common case: no extra copy
        scale = lambda x: x if one else x * g.to(x.dtype)
        return (scale(grad) if ctx.needs_input_grad[0] else None,
                scale(grad_extra) if ctx.needs_input_grad[1] else None, None, None, None)


def _run_blocks(student_logits, n_items: int, bounds: list[tuple[int, int]], block_fn,
                extra: torch.Tensor | None = None, dtype: torch.dtype | None = None):
    """Mean over the n_items of block_fn(lo, hi, grad, extra_leaf) over the blocks ``bounds``; block_fn returns
    (loss_sum, parts), parts [(b, p, leaf)]: leaves holding the student logit rows (b, p); gradients
    buffered. Each block's sum is divided by n_items before it is differentiated, so the buffer already holds
    the mean's gradient and a plain ``loss.backward()`` hands it on without a [B, L, V] rescaling copy.

    extra: an optional second differentiable input shared by all blocks (learned W entries); each
    block sees it as a fresh leaf ``extra_leaf`` and its gradient is summed over the blocks. dtype: the loss
    value's (the compute dtype; default the student logits'), the gradient being in the student's."""
    grad_on = torch.is_grad_enabled()
    needs_s = student_logits.requires_grad and grad_on
    needs_x = extra is not None and extra.requires_grad and grad_on
    grad = torch.zeros_like(student_logits) if needs_s else torch.zeros(0, dtype=student_logits.dtype)
    x_leaf = None if extra is None else extra.detach().requires_grad_(needs_x)
    grad_x = torch.zeros_like(extra) if needs_x else torch.zeros(0)
    total = torch.zeros((), dtype=torch.float64)
    inv_n = 1.0 / max(n_items, 1)
    for lo, hi in bounds:
        with torch.enable_grad():
            loss_sum, parts = block_fn(lo, hi, needs_s, x_leaf)
            loss_sum = loss_sum * inv_n
            if (needs_s or needs_x) and loss_sum.requires_grad:
                inputs = ([leaf for _, _, leaf in parts] if needs_s else []) + ([x_leaf] if needs_x else [])
                gs = torch.autograd.grad(loss_sum, inputs, allow_unused=True)
                for (b, p, _), g in zip(parts if needs_s else [], gs):    # (padded columns: no gradient)
                    if g is not None:
                        grad.view(-1, grad.shape[-1])[:, :g.shape[1]].index_add_(0, b * grad.shape[1] + p,
                                                                                  g.to(grad.dtype))
                if needs_x and gs[-1] is not None:
                    grad_x += gs[-1]
        total += loss_sum.detach().double().cpu()
    total = total.to(dtype or student_logits.dtype)
    if needs_s or needs_x:
        return _EagerBlockGrad.apply(student_logits, extra, total, grad, grad_x)
    return total


def _gather_rows(logits, b, p, width: int, ws: dict | None = None, name: str = "rows",
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logit rows (b, p) without the padded columns beyond ``width``: one contiguous [n, width] copy (gathered
    from the sliced view, so log_softmax needs no second copy; into the workspace buffer ``name`` if given),
    in ``dtype`` (default: at least float32; a float32 input is not copied twice)."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    flat = flat[:, :width] if width < flat.shape[1] else flat
    dtype = dtype or torch.promote_types(flat.dtype, torch.float32)
    if flat.dtype != dtype:
        return torch.index_select(flat, 0, b * logits.shape[1] + p).to(dtype)
    return torch.index_select(flat, 0, b * logits.shape[1] + p, **_out(ws, name, flat))


def _rows(logits, b, p, width: int, temperature: float, grad: bool, dtype: torch.dtype | None = None):
    """A block's logit rows, padded columns dropped, as a fresh leaf; and their log-softmax."""
    leaf = _gather_rows(logits, b, p, width, dtype=dtype).requires_grad_(grad)
    return leaf, _log_softmax(leaf, temperature)


# ---- input checks (O(1) or one pass over the alignments: none over the logits) ------------------

def _check_temperature(temperature) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a finite number > 0, not {temperature!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, not {temperature!r}")
    return t


def _compute_dtype(*tensors) -> torch.dtype:
    """float32, or float64 when an input is float64 (float16 / bfloat16 are never computed in)."""
    for x in tensors:
        if not x.dtype.is_floating_point:
            raise ValueError(f"logits must be floating point, not {x.dtype}")
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _check_3d(student_logits, teacher_logits):
    for side, x in (("student", student_logits), ("teacher", teacher_logits)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{side} logits must be [batch, length, vocab], not {shape}")


def _check_w_widths(student_logits, teacher_logits, projection, student_vocab_size, teacher_vocab_size):
    """Logits at least as wide as the W columns/rows the loss reads; names the side (and a likely swap)."""
    n_s, n_t = student_logits.shape[-1], teacher_logits.shape[-1]
    rows, cols = projection.student_vocab_size, projection.teacher_vocab_size
    need_s = min(rows, student_vocab_size or rows)
    need_t = min(cols, teacher_vocab_size or cols)
    swapped = n_s == cols and n_t == rows and rows != cols
    hint = " (the student's and teacher's logits look swapped)" if swapped else ""
    if n_t < need_t:
        raise ValueError(f"teacher logits have {n_t} columns, narrower than W's {need_t} teacher columns; student "
                         f"logits have {n_s}, W has {rows} student rows{hint}. For a teacher model of another width "
                         "use W.with_teacher_width(n)")
    if n_s < need_s:
        raise ValueError(f"student logits have {n_s} columns, narrower than W's {need_s} student rows; teacher "
                         f"logits have {n_t}, W has {cols} teacher columns{hint}")


def _check_alignments(alignments, student_logits, teacher_logits):
    """One alignment per batch row, each within both sides' logit lengths."""
    for side, x in (("student", student_logits), ("teacher", teacher_logits)):
        if len(alignments) != x.shape[0]:
            raise ValueError(f"{len(alignments)} alignments for {side} logits of batch size {x.shape[0]}: "
                             "pass one alignment per row")
    L_s, L_t = student_logits.shape[1], teacher_logits.shape[1]
    for i, a in enumerate(alignments):
        s_end, t_end = len(a.student_ids), len(a.teacher_ids)
        if s_end > L_s or t_end > L_t:
            swapped = s_end <= L_t and t_end <= L_s and L_s != L_t
            raise ValueError(
                f"alignment {i} covers {s_end} student and {t_end} teacher positions, but the student logits have "
                f"length {L_s} and the teacher logits {L_t}"
                + (" (the student's and teacher's logits look swapped)" if swapped else ""))


def _log_softmax(x, temperature: float):
    return torch.log_softmax(x if temperature == 1 else x / temperature, dim=-1)


# ---- the losses ---------------------------------------------------------------------------------

@torch.no_grad()
def _p_kl_metrics(stats, aux, off_t, top_t, prep):
    """From `_ProjectedKL`'s ``aux`` (q_S = p m; r = W^T q_S and the row sums) and the teacher's mass off W's
    image and argmax: no pass beyond the argmax of r."""
    m_s = aux["m"] if aux["m"] is not None else torch.ones_like(aux["r_sum"])
    stats["mass_lost_empty_rows"] += (aux["p"].index_select(1, prep["empty"]).sum(-1) * m_s).sum().item()
    stats["top1_agreement"] += (prep["image_ids"][_argmax(aux["r"])] == top_t).sum().item()
    stats["student_common_mass"] += aux["r_sum"].sum().item()            # mass W carries to the teacher side
    stats["teacher_common_mass"] += aux["q_sum"].sum().item()            # teacher mass W can reach
    stats["student_chunk_mass"] += m_s.sum().item()
    stats["teacher_chunk_mass"] += (aux["q_sum"] + off_t).sum().item()


@torch.no_grad()
def _hybrid_metrics(stats, log_q_s, log_m_s, log_q_t, q_t_c, rest_mass, prep):
    """From the slices the loss exponentiated (common and uncommon partition each vocabulary): no full-width
    exp. The student's common mass is its chunk mass m (log_m_s; None: 1 per chunk) minus the uncommon mass."""
    student_chunk = float(len(log_q_s)) if log_m_s is None else log_m_s.detach().exp().sum().item()
    teacher_common, student_common = q_t_c.sum().item(), student_chunk - rest_mass["student"].item()
    stats["teacher_common_mass"] += teacher_common
    stats["student_common_mass"] += student_common
    stats["student_chunk_mass"] += student_chunk
    stats["teacher_chunk_mass"] += teacher_common + rest_mass["teacher"].item()
    stats["mass_lost_empty_rows"] += log_q_s.detach().index_select(1, prep["empty"]).exp().sum().item()
    stats["top1_agreement"] += (prep["pair"][_argmax(log_q_s)] == _argmax(log_q_t)).sum().item()


def _cross_tokenizer(kind, student_logits, teacher_logits, alignments, projection=None, *, temperature=1.0,
                     direction="forward", merge=None, chunk_size=None, student_vocab_size=None,
                     teacher_vocab_size=None, student_id_map=None, teacher_id_map=None, common_weight=1.0,
                     uld_weight=1.0, uld_top_k=None, weights=None, metrics=True, student_tok=None, teacher_tok=None):
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', not {direction!r}")
    if weights is not None and kind != "pkl":
        raise ValueError("weights= (a learned W) is a P-KL option: GOLD and H-KL use W only through its pattern")
    temperature = _check_temperature(temperature)
    _check_3d(student_logits, teacher_logits)
    _check_alignments(alignments, student_logits, teacher_logits)
    dtype = _compute_dtype(student_logits, teacher_logits)
    device = student_logits.device
    v_s = student_vocab_size or student_logits.shape[-1]
    v_t = teacher_vocab_size or teacher_logits.shape[-1]
    teacher_tokens = None
    if projection is not None:
        if student_tok is not None or teacher_tok is not None:
            projection.check_tokenizers(student_tok, teacher_tok)
        _check_w_widths(student_logits, teacher_logits, projection, student_vocab_size, teacher_vocab_size)
        v_s = min(v_s, projection.student_vocab_size)
        v_t = min(v_t, projection.teacher_vocab_size)
        teacher_tokens = projection.teacher_tokens
    if teacher_tokens is None and teacher_tok is not None:
        from .projection import _token_count
        teacher_tokens = _token_count(teacher_tok)
    if teacher_tokens is not None:                                        # the teacher model's padded columns
        v_t = min(v_t, teacher_tokens)
    for side, v, x in (("student", v_s, student_logits), ("teacher", v_t, teacher_logits)):
        if v > x.shape[-1]:
            raise ValueError(f"{side}_vocab_size={v} exceeds the {side} logits' {x.shape[-1]} columns")
    if projection is not None:
        prep = _prepared(projection, kind, v_s, v_t, device)
        gamma = float(projection.meta.get("gamma", 0.1))
    else:
        prep, gamma = None, 0.1
    merge = merge or ("w" if kind == "pkl" else "chain")
    w_entries = None
    if weights is not None:                                                # learned W: [V_S, k] like projection.weights
        if tuple(weights.shape) != tuple(projection.weights.shape):
            raise ValueError(f"weights has shape {tuple(weights.shape)}, W has {tuple(projection.weights.shape)}")
        w_entries = weights[:v_s].reshape(-1).index_select(0, prep["flat"]).to(dtype)
    sides, n_chunks = _chunk_plan(alignments, device)
    s_map = None if student_id_map is None else torch.as_tensor(student_id_map, device=device)
    t_map = None if teacher_id_map is None else torch.as_tensor(teacher_id_map, device=device)
    ws = {}                     # the call's reused block buffers (`_out`)
    stats = {"teacher_common_mass": 0.0, "student_common_mass": 0.0, "top1_agreement": 0.0,
             "mass_lost_empty_rows": 0.0, "student_chunk_mass": 0.0, "teacher_chunk_mass": 0.0}

    def block_fn(lo, hi, grad, w_leaf):
        n = hi - lo
        s_tab, t_tab = _block(sides["student"], lo, hi, s_map), _block(sides["teacher"], lo, hi, t_map)
        x_s, x_s_rest, s_rest, parts = _split_rows(student_logits, s_tab, v_s, temperature, grad, ws, "s_", dtype)
        with torch.no_grad():
            if merge in ("w", "chain"):
                x_t, x_t_rest, t_rest, _ = _split_rows(teacher_logits, t_tab, v_t, temperature, ws=ws, name="t_",
                                                       dtype=dtype)
            if kind == "pkl" and merge == "w":
                q_ti, neg_ent_t, off_t, top_t = _w_merge_image(x_t, x_t_rest, t_tab, t_rest, n, gamma, prep)
            else:
                if merge == "chain":
                    log_q_t = _chain_log_q(x_t, x_t_rest, t_tab, t_rest, n)[0]
                    q_t = None if kind in ("gold", "hkl") else log_q_t.exp()    # GOLD / H-KL read log q_T
                else:
                    tb, tp, tid, toff, tch = t_tab
                    log_q_t = None
                    q_t = teacher_merge(_log_softmax(_gather_rows(teacher_logits, tb, tp, v_t, ws, dtype=dtype),
                                                     temperature),
                                        tch, tid, toff, n, merge, gamma)
                if kind == "pkl":
                    q_ti, neg_ent_t, off_t, top_t = _teacher_on_image(q_t, prep)
        if kind == "pkl":           # P-KL works from the logits: one softmax per side (_ProjectedKL)
            _, _, sid, _, sch = s_tab
            log_m = None if x_s_rest is None else _chunk_log_mass(x_s_rest, sid.index_select(0, s_rest),
                                                                  sch.index_select(0, s_rest), n)
            w = prep["w"] if w_leaf is None else w_leaf
            aux = {} if metrics else None
            d = _ProjectedKL.apply(x_s, log_m, q_ti, neg_ent_t, off_t, prep, w.to(x_s.dtype), direction == "reverse",
                                   ws, aux)
            if metrics:
                _p_kl_metrics(stats, aux, off_t, top_t, prep)
            return d.sum(), parts
        log_q_s, log_m_s = _chain_log_q(x_s, x_s_rest, s_tab, s_rest, n)
        if kind in ("gold", "hkl"):
            rest_mass = {} if metrics else None
            d, _, q_t_c = hybrid_divergence(log_q_s, q_t, prep, direction, common_weight, uld_weight, uld_top_k,
                                            log_q_t, need_g=False, rest_mass=rest_mass)
            if metrics:
                _hybrid_metrics(stats, log_q_s, log_m_s, log_q_t, q_t_c, rest_mass, prep)
        else:                                                             # uld
            q_s = log_q_s.exp()
            d = sorted_l1(q_s, q_t, uld_top_k)
            if metrics:
                stats["student_chunk_mass"] += q_s.detach().sum().item()
                stats["teacher_chunk_mass"] += q_t.sum().item()
        return d.sum(), parts

    if device.type == "cpu":     # token rows of each side within the budget (32-55 Qwen chunks per block)
        starts = [torch.searchsorted(sides[k][4], torch.arange(n_chunks + 1, device=device)).cpu().numpy()
                  for k in ("student", "teacher")]
        bounds = _block_bounds(n_chunks, chunk_size, starts, [v_s, v_t], CPU_BLOCK_ELEMENTS)
    else:
        bounds = _block_bounds(n_chunks, chunk_size, widths=[v_s, v_t], budget=BLOCK_ELEMENTS, floor=64)
    loss = _run_blocks(student_logits, n_chunks, bounds, block_fn, w_entries, dtype)
    out = {k: v / max(n_chunks, 1) for k, v in stats.items()} if metrics else {}
    out.update(n_chunks=float(n_chunks),
               unpaired_student=float(sum(len(a.student_unpaired) for a in alignments)),
               unpaired_teacher=float(sum(len(a.teacher_unpaired) for a in alignments)))
    out["loss"] = float(loss.detach())
    return loss, out


def p_kl_loss(student_logits, teacher_logits, alignments, projection, **kw):
    """P-KL: mean over chunk pairs of D(q_T || W^T q_S) (module docstring). kw: temperature, direction,
    merge ("w" default, "chain", "first", "mean"), chunk_size, *_vocab_size, *_id_map, metrics,
    student_tok / teacher_tok (checked against W; the teacher's size drops padded columns), and
    weights: [V_S, k] row weights replacing ``projection.weights`` (same pattern), differentiable: the
    learnable W of `xtoken.projection.LearnableProjection` receives its gradient through this argument."""
    return _cross_tokenizer("pkl", student_logits, teacher_logits, alignments, projection, **kw)


def gold_loss(student_logits, teacher_logits, alignments, projection, **kw):
    """GOLD baseline: KL on strict 1-to-1 pairs + ULD sorted L1 on the rest. kw as p_kl_loss plus
    common_weight, uld_weight, uld_top_k."""
    return _cross_tokenizer("gold", student_logits, teacher_logits, alignments, projection, **kw)


def h_kl_loss(student_logits, teacher_logits, alignments, projection, **kw):
    """H-KL: GOLD's hybrid with C = {(s, top1_W(s))}; shared teacher ids compare group sums."""
    return _cross_tokenizer("hkl", student_logits, teacher_logits, alignments, projection, **kw)


def uld_loss(student_logits, teacher_logits, alignments, **kw):
    """ULD: mean over chunk pairs of the sorted L1 between chain-rule chunk distributions. kw as p_kl_loss
    (no W: ``teacher_tok``, when given, only drops the teacher's padded columns)."""
    return _cross_tokenizer("uld", student_logits, teacher_logits, alignments, None, **kw)


def kl_loss(student_logits, teacher_logits, mask=None, *, temperature=1.0, direction="forward",
            chunk_size=None, vocab_size=None, metrics=True, student_tok=None, teacher_tok=None):
    """Same tokenizer: mean over positions of KL(p_T || p_S) (forward) or KL(p_S || p_T) (reverse).

    Logits [B, L, V'] on both sides, positions 1:1; mask [B, L] selects positions (default all);
    columns beyond `vocab_size` (default: the narrower side, and the tokenizer's size when ``student_tok`` or
    ``teacher_tok`` is given) are padding. Both tokenizers given must be the same (by fingerprint).
    Teacher entries of -inf are probabilities of 0 (0 log 0 = 0; reverse: clamped at `EPS` on the right).
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', not {direction!r}")
    temperature = _check_temperature(temperature)
    _check_3d(student_logits, teacher_logits)
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(f"kl_loss compares positions 1:1: student logits {tuple(student_logits.shape)} and teacher "
                         f"logits {tuple(teacher_logits.shape)} differ in [batch, length] (a teacher with another "
                         "tokenizer needs a cross-tokenizer loss)")
    dtype = _compute_dtype(student_logits, teacher_logits)
    v = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
    if student_tok is not None and teacher_tok is not None:
        from .tokenizers import tokenizer_fingerprint
        if tokenizer_fingerprint(student_tok) != tokenizer_fingerprint(teacher_tok):
            raise ValueError("kl_loss needs one tokenizer on both sides: the student's and teacher's tokenizers differ")
    tok = teacher_tok if teacher_tok is not None else student_tok
    if tok is not None:
        from .projection import _token_count
        v = min(v, _token_count(tok))
    if v > min(student_logits.shape[-1], teacher_logits.shape[-1]):
        raise ValueError(f"vocab_size={v} exceeds the logits' columns (student {student_logits.shape[-1]}, "
                         f"teacher {teacher_logits.shape[-1]})")
    B, L = student_logits.shape[:2]
    keep = torch.ones(B, L, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    if tuple(keep.shape) != (B, L):
        raise ValueError(f"mask has shape {tuple(keep.shape)}, the logits' [batch, length] is {(B, L)}")
    b_all, p_all = keep.nonzero(as_tuple=True)
    b_all, p_all = b_all.to(student_logits.device), p_all.to(student_logits.device)
    stats = {"top1_agreement": 0.0}
    ws = {}                     # the call's reused block buffers (`_out`)

    def block_fn(lo, hi, grad, _):
        b, p = b_all[lo:hi], p_all[lo:hi]
        leaf, logp_s = _rows(student_logits, b, p, v, temperature, grad, dtype)
        with torch.no_grad():
            logp_t = _log_softmax(_gather_rows(teacher_logits, b, p, v, ws, dtype=dtype), temperature)   # (T = 1: no division)
            if metrics:
                stats["top1_agreement"] += (_argmax(logp_s) == _argmax(logp_t)).sum().item()
        if direction == "forward":
            d = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
        else:
            d = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
        if not bool(d.isfinite().all()):          # -inf teacher entries (0 * -inf): recomputed for this block only
            if direction == "forward":
                p_t = logp_t.exp()
                d = torch.where(p_t > 0, p_t * (logp_t - logp_s), torch.zeros_like(p_t)).sum(-1)
            else:
                d = (logp_s.exp() * (logp_s - logp_t.clamp_min(math.log(EPS)))).sum(-1)
        return d.sum(), [(b, p, leaf)]

    n = len(b_all)
    bounds = _block_bounds(n, chunk_size, widths=[v], budget=_budget(student_logits.device, KL_BLOCK_ELEMENTS),
                           floor=1 if student_logits.device.type == "cpu" else 256)
    loss = _run_blocks(student_logits, n, bounds, block_fn, dtype=dtype)
    out = {"loss": float(loss.detach()), "n_positions": float(n)}
    if metrics:
        out.update(top1_agreement=stats["top1_agreement"] / max(n, 1), teacher_common_mass=1.0,
                   student_common_mass=1.0, mass_lost_empty_rows=0.0)
    return loss, out


def dynamic_kd_scale(ce: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
    """KD rescaled to CE's magnitude: kd * stopgrad(ce / kd) (value equals ce; gradient is kd's,
    scaled by ce/kd). Used as total = ce + dynamic_kd_scale(ce, kd)."""
    return kd * (ce / kd.clamp_min(1e-12)).detach()
