"""The typed plan of a loss call: W's entries and pairing (`WPlan`, cached), the chunk token tables of a batch
(`TokenTable`), and the validated cross-tokenizer call (`ChunkBatch`) that the loss families run block by block.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..align import span_tokens
from . import checks, engine
from .engine import BLOCK_ELEMENTS, BlockFn, Workspace, block_bounds, run_blocks

PAIRINGS = (None, "exact", "top1")


# ---- W, prepared for the losses -----------------------------------------------------------------


@dataclass(frozen=True)
class SparseSum:
    """x @ W onto one side (W's image, or the student rows), given by W's entries: each output column's first
    entry (``first``, an entry index; ``has``: the column has one; ``src_first``: the input column it reads) and
    the other entries (``rest``, ``src_rest``, ``dst_rest``). Most columns hold one entry, so a dense gather plus a
    scatter-add of the few others replaces a scatter-add of all of them (`xtoken.losses.projected.sparse_sum`)."""

    first: torch.Tensor
    has: torch.Tensor
    rest: torch.Tensor
    src_first: torch.Tensor
    src_rest: torch.Tensor
    dst_rest: torch.Tensor


@dataclass(frozen=True)
class Pairing:
    """A common set C of (student id, teacher id) pairs: GOLD's strict 1-to-1 pairs or H-KL's top-1 pairs.

    ``pair`` [V_S]: each student id's teacher id, -1 when uncommon. ``s_common`` / ``s_uncommon``: student ids in
    and out of C; ``t_common``: the distinct teacher ids of C (sorted); ``group`` [len(s_common)]: each common
    student id's index into ``t_common``; ``group_first``: each teacher id's first student id (index into
    ``s_common``); ``singleton``: C is 1-to-1; ``s_cols`` / ``s_cols_inv``: the student columns reordered common
    (in C's order) then uncommon, and the inverse permutation; ``t_uncommon``: teacher ids out of C."""

    pair: torch.Tensor
    s_common: torch.Tensor
    t_common: torch.Tensor
    group: torch.Tensor
    group_first: torch.Tensor
    singleton: bool
    s_uncommon: torch.Tensor
    s_cols: torch.Tensor
    s_cols_inv: torch.Tensor
    t_uncommon: torch.Tensor


@dataclass
class WPlan:
    """W's non-zero entries restricted to the real vocabulary columns, flat, on one device.

    ``rows``, ``cols``, ``w`` [n_entries]: student id, teacher id and weight of each entry; ``flat``: the entries'
    positions in ``projection.weights[:V_S].view(-1)`` (to read a learned W's weights). ``image`` [V_T] bool:
    the teacher ids some student row reaches; ``image_ids`` / ``off_image_ids``: those ids and the others;
    ``img_cols``: each entry's column among ``image_ids``. ``to_image`` / ``to_rows``: `SparseSum` plans of
    x @ W (student rows -> image) and back. ``empty``: the student ids with an empty W row. ``pairing``: GOLD's
    or H-KL's common set, None for P-KL. ``row_sums``: sum_t W[s, t] per student id, filled on first use."""

    rows: torch.Tensor
    cols: torch.Tensor
    w: torch.Tensor
    flat: torch.Tensor
    image: torch.Tensor
    image_ids: torch.Tensor
    img_cols: torch.Tensor
    off_image_ids: torch.Tensor
    to_image: SparseSum
    to_rows: SparseSum
    empty: torch.Tensor
    pairing: Pairing | None = None
    row_sums: torch.Tensor | None = None


# W plans by (projection, pairing, widths, device). Building one costs about 1 ms at the miniature's
# vocabularies and much more at the real ones, and a loss is called with the same W at every step. Bounded: the
# least recently used plan goes beyond `PLAN_CACHE_SIZE` entries (an entry holds its projection alive).
PLAN_CACHE_SIZE = 32
_PLANS: OrderedDict = OrderedDict()


def w_plan(projection, student_width: int, teacher_width: int, device, pairing: str | None = None) -> WPlan:
    """The `WPlan` of ``projection`` (an `xtoken.projection.Projection`) for logits ``student_width`` and
    ``teacher_width`` columns wide, on ``device``; ``pairing``: None (P-KL), "exact" (GOLD: strict 1-to-1
    pairs, `Projection.exact_pairs`) or "top1" (H-KL: every non-empty row with its largest entry). Cached."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, not {pairing!r}")
    key = (id(projection), pairing, student_width, teacher_width, str(device))
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is projection:
        _PLANS.move_to_end(key)
        return hit[1]
    plan = _build_plan(projection, student_width, teacher_width, device, pairing)
    _PLANS[key] = (projection, plan)
    _PLANS.move_to_end(key)
    while len(_PLANS) > PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def _sparse_sum_plan(src, dst, width: int, device) -> SparseSum:
    """Entries read at input columns ``src`` and summed into output columns ``dst`` (``width`` of them)."""
    first = torch.full((width,), len(dst), dtype=torch.long).scatter_reduce_(
        0, dst, torch.arange(len(dst)), reduce="amin"
    )
    has = first < len(dst)
    rest = torch.ones(len(dst), dtype=torch.bool)
    rest[first[has]] = False
    rest = rest.nonzero().squeeze(1)
    first = first.clamp_max(max(len(dst) - 1, 0))  # columns without entries: any entry, weight 0
    src_first = src[first] if len(src) else torch.zeros_like(first)  # (an all-empty W: any column, weight 0)
    return SparseSum(
        first.to(device),
        has.to(device),
        rest.to(device),
        src_first.to(device),
        src[rest].to(device),
        dst[rest].to(device),
    )


def _pairing(projection, kind: str, student_width: int, teacher_width: int, device) -> Pairing:
    pair = projection.exact_pairs() if kind == "exact" else projection.top1()
    pair = pair[:student_width]
    pair = torch.where(pair < teacher_width, pair, torch.full_like(pair, -1))
    s_common = (pair >= 0).nonzero().squeeze(1)
    t_ids, group = torch.unique(pair[s_common], return_inverse=True)  # group: s -> index into t_common
    first = torch.full((len(t_ids),), -1, dtype=torch.long)
    first.scatter_reduce_(0, group, torch.arange(len(s_common)), reduce="amin", include_self=False)
    t_mask = torch.ones(teacher_width, dtype=torch.bool)
    t_mask[t_ids] = False
    s_uncommon = (pair < 0).nonzero().squeeze(1)
    s_cols = torch.cat([s_common[first] if len(t_ids) == len(s_common) else s_common, s_uncommon])
    s_cols_inv = torch.empty_like(s_cols)
    s_cols_inv[s_cols] = torch.arange(len(s_cols))  # (common and uncommon: every student id)
    return Pairing(
        pair.to(device),
        s_common.to(device),
        t_ids.to(device),
        group.to(device),
        first.to(device),
        len(t_ids) == len(s_common),
        s_uncommon.to(device),
        s_cols.to(device),
        s_cols_inv.to(device),
        t_mask.nonzero().squeeze(1).to(device),
    )


def _build_plan(projection, student_width: int, teacher_width: int, device, pairing: str | None) -> WPlan:
    from ..projection import EMPTY

    idx, w = projection.indices[:student_width], projection.weights[:student_width]
    keep = (idx >= 0) & (idx < teacher_width) & (w > 0)
    rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)[keep]
    cols = idx[keep]
    image_ids, img_cols = torch.unique(cols, return_inverse=True)
    image = torch.zeros(teacher_width, dtype=torch.bool)
    image[image_ids] = True
    return WPlan(
        rows=rows.to(device),
        cols=cols.to(device),
        w=w[keep].to(device),
        flat=keep.reshape(-1).nonzero().squeeze(1).to(device),
        image=image.to(device),
        image_ids=image_ids.to(device),
        img_cols=img_cols.to(device),
        off_image_ids=(~image).nonzero().squeeze(1).to(device),
        to_image=_sparse_sum_plan(rows, img_cols, len(image_ids), device),
        to_rows=_sparse_sum_plan(img_cols, rows, student_width, device),
        empty=(projection.row_kind[:student_width] == EMPTY).nonzero().squeeze(1).to(device),
        pairing=None if pairing is None else _pairing(projection, pairing, student_width, teacher_width, device),
    )


# ---- chunk token tables -------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenTable:
    """One side's tokens of a run of chunk pairs, chunk-major, each [n_tokens] int64: batch ``row``, logit
    position ``pos`` (the row predicting the token: its position - 1), token ``ids``, ``offset`` in its chunk
    and ``chunk`` index."""

    row: torch.Tensor
    pos: torch.Tensor
    ids: torch.Tensor
    offset: torch.Tensor
    chunk: torch.Tensor

    def block(self, lo: int, hi: int, id_map: torch.Tensor | None = None) -> "TokenTable":
        """The tokens of chunks [lo, hi) (a contiguous slice), chunks renumbered from 0, ids through ``id_map``."""
        i, j = torch.searchsorted(self.chunk, torch.tensor([lo, hi], device=self.chunk.device)).tolist()
        ids = self.ids[i:j] if id_map is None else id_map[self.ids[i:j]]
        return TokenTable(self.row[i:j], self.pos[i:j], ids, self.offset[i:j], self.chunk[i:j] - lo)

    def first_rest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices of each chunk's first token (in chunk order) and of the continuation tokens."""
        return (self.offset == 0).nonzero().squeeze(1), (self.offset > 0).nonzero().squeeze(1)


@dataclass(frozen=True)
class ChunkTables:
    """The predictable chunk pairs of a batch: ``n_chunks`` of them, the ``student`` and ``teacher`` tokens."""

    student: TokenTable
    teacher: TokenTable
    n_chunks: int


def chunk_tables(alignments, device) -> ChunkTables:
    """Token tables over the predictable chunks of all rows (`xtoken.align.span_tokens` of each side's spans,
    chunk indices running on across rows), with one set of array ops per side, not one per row."""
    keep = [np.flatnonzero(a.predictable) for a in alignments]
    counts = np.array([len(k) for k in keep], dtype=np.int64)
    n_chunks = int(counts.sum())
    row_of_chunk = np.repeat(np.arange(len(alignments)), counts)
    sides = {}
    for side in ("student", "teacher"):
        if n_chunks == 0:
            sides[side] = TokenTable(*[torch.zeros(0, dtype=torch.long, device=device) for _ in range(5)])
            continue
        spans = np.concatenate(
            [(a.student_spans if side == "student" else a.teacher_spans)[k] for a, k in zip(alignments, keep)]
        )
        rows = [a.student_ids if side == "student" else a.teacher_ids for a in alignments]
        row_start = np.zeros(len(rows), dtype=np.int64)
        row_start[1:] = np.cumsum([len(r) for r in rows])[:-1]
        chunk, pos, offset = span_tokens(spans)
        batch = row_of_chunk[chunk]
        ids = np.concatenate(rows)[row_start[batch] + pos]
        sides[side] = TokenTable(
            *[torch.as_tensor(x.astype(np.int64), device=device) for x in (batch, pos - 1, ids, offset, chunk)]
        )
    return ChunkTables(sides["student"], sides["teacher"], n_chunks)


# ---- one cross-tokenizer loss call --------------------------------------------------------------


@dataclass
class ChunkBatch:
    """A validated cross-tokenizer loss call: the logits, the chunk tables, the real vocabulary widths
    (``student_width`` / ``teacher_width``: padded columns beyond them are dropped), the compute ``dtype``, the
    temperature, W's plan and decay ``gamma`` (None / 0.1 without W), the id maps and the call's workspace."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    tables: ChunkTables
    student_width: int
    teacher_width: int
    dtype: torch.dtype
    temperature: float
    plan: WPlan | None
    gamma: float
    student_id_map: torch.Tensor | None
    teacher_id_map: torch.Tensor | None
    workspace: Workspace

    @property
    def n_chunks(self) -> int:
        return self.tables.n_chunks

    def block(self, lo: int, hi: int) -> tuple[TokenTable, TokenTable]:
        """The student's and teacher's tokens of chunks [lo, hi)."""
        return (
            self.tables.student.block(lo, hi, self.student_id_map),
            self.tables.teacher.block(lo, hi, self.teacher_id_map),
        )

    def run(self, block_fn: BlockFn, chunk_size: int | None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The mean over chunk pairs of ``block_fn``'s block sums (`xtoken.losses.engine.run_blocks`), blocks of
        ``chunk_size`` chunk pairs, or sized by the element budget (on CPU each side's token rows count)."""
        n, device = self.n_chunks, self.student_logits.device
        widths = [self.student_width, self.teacher_width]
        if device.type == "cpu":
            starts = [
                torch.searchsorted(t.chunk, torch.arange(n + 1, device=device)).cpu().numpy()
                for t in (self.tables.student, self.tables.teacher)
            ]
            bounds = block_bounds(n, chunk_size, starts, widths, engine.CPU_BLOCK_ELEMENTS)
        else:
            bounds = block_bounds(n, chunk_size, widths=widths, budget=BLOCK_ELEMENTS, floor=64)
        return run_blocks(self.student_logits, n, bounds, block_fn, extra, self.dtype)

    def result(self, loss: torch.Tensor, alignments, stats: dict | None) -> tuple[torch.Tensor, dict]:
        """(loss, metrics): ``stats`` (sums over chunk pairs) as means, the counts, the loss value."""
        out = {k: v / max(self.n_chunks, 1) for k, v in stats.items()} if stats is not None else {}
        out.update(
            n_chunks=float(self.n_chunks),
            unpaired_student=float(sum(len(a.student_unpaired) for a in alignments)),
            unpaired_teacher=float(sum(len(a.teacher_unpaired) for a in alignments)),
        )
        out["loss"] = float(loss.detach())
        return loss, out


def chunk_batch(
    student_logits,
    teacher_logits,
    alignments,
    projection=None,
    *,
    temperature=1.0,
    direction="forward",
    pairing: str | None = None,
    student_vocab_size=None,
    teacher_vocab_size=None,
    student_id_map=None,
    teacher_id_map=None,
    student_tok=None,
    teacher_tok=None,
) -> ChunkBatch:
    """Check a cross-tokenizer loss call (`xtoken.losses.checks`) and plan it. The real widths: the logits',
    capped by ``*_vocab_size``, W's shape and the teacher tokenizer's size (W's ``teacher_tokens``, else
    ``teacher_tok``'s): the teacher model's padded columns get zero probability."""
    checks.direction(direction)
    temperature = checks.temperature(temperature)
    checks.logits_3d(student_logits, teacher_logits)
    checks.alignments(alignments, student_logits, teacher_logits)
    dtype = checks.compute_dtype(student_logits, teacher_logits)
    device = student_logits.device
    v_s = student_vocab_size or student_logits.shape[-1]
    v_t = teacher_vocab_size or teacher_logits.shape[-1]
    teacher_tokens = None
    if projection is not None:
        if student_tok is not None or teacher_tok is not None:
            projection.check_tokenizers(student_tok, teacher_tok)
        checks.w_widths(student_logits, teacher_logits, projection, student_vocab_size, teacher_vocab_size)
        v_s = min(v_s, projection.student_vocab_size)
        v_t = min(v_t, projection.teacher_vocab_size)
        teacher_tokens = projection.teacher_tokens
    if teacher_tokens is None and teacher_tok is not None:
        from ..projection import _token_count

        teacher_tokens = _token_count(teacher_tok)
    if teacher_tokens is not None:  # the teacher model's padded columns
        v_t = min(v_t, teacher_tokens)
    for side, v, x in (("student", v_s, student_logits), ("teacher", v_t, teacher_logits)):
        if v > x.shape[-1]:
            raise ValueError(f"{side}_vocab_size={v} exceeds the {side} logits' {x.shape[-1]} columns")
    plan = None if projection is None else w_plan(projection, v_s, v_t, device, pairing)
    gamma = 0.1 if projection is None else float(projection.meta.get("gamma", 0.1))
    return ChunkBatch(
        student_logits,
        teacher_logits,
        chunk_tables(alignments, device),
        v_s,
        v_t,
        dtype,
        temperature,
        plan,
        gamma,
        None if student_id_map is None else torch.as_tensor(student_id_map, device=device),
        None if teacher_id_map is None else torch.as_tensor(teacher_id_map, device=device),
        Workspace(),
    )
