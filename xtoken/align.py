"""Span alignment: group two tokenizations of the same text into chunk pairs (X-Token, Sec. 3.3).

Both token sequences spell the same text. A *chunk pair* is a student span [a, b) and a teacher
span [c, d) that decode to the identical byte string; chunks cover both sides in order.

    text      " 2024 apples"
    student   ' 202' '4' ' apples'          (Llama-3: digits packed by up to 3)
    teacher   ' ' '2' '0' '2' '4' ' apples'  (Qwen3: one digit per token)
    chunks    [' 202' '4'] ~ [' ' '2' '0' '2' '4'],   [' apples'] ~ [' apples']

How (linear time, no O(n*m) dynamic programme):

1. Each token's byte length comes from a per-tokenizer table (`token_bytes`), built once and cached.
   Special tokens (BOS, chat markers) have no bytes; they are taken out of the byte walk, so a BOS
   on one side only never shifts it.
2. Fast path: the cumulative byte lengths of both sides are their token end offsets; where the two
   sides' offsets coincide (each student end looked up in a table of teacher ends by byte offset), a
   chunk closes. Before trusting the offsets, the
   concatenated bytes of both sides are compared (one vectorised comparison), because equal offsets
   only mean something when the bytes agree.
3. Bounded local fallback where the bytes disagree (a normalizer that rewrote text on one side,
   Qwen's NFC on decomposed input; text present on one side only): chunks are closed up to the last
   common boundary before the first differing byte, then the walk *resynchronises*: among the next
   `window` token boundaries of each side it picks the nearest pair after which the next
   `agree_bytes` bytes agree, reports the skipped tokens as unpaired and continues from there. One
   mismatch therefore costs a few unpaired tokens, never the rest of the sequence (the defect of
   TRL's byte-offset walk, which sends everything after a disagreement into one final group).
   Truncation at different places: the tail beyond the shorter side is unpaired.
4. Special tokens between chunks are paired when both sides have one with the same role (bos,
   end_of_turn, ...) in the same gap, in order; otherwise they are unpaired. A special that lies
   strictly inside a text chunk on one side (a marker in the middle of a word) stays inside that
   chunk's span: it has no bytes, so the pair still decodes to identical bytes.

Every position of the valid region is either inside exactly one chunk span or listed as unpaired.

Next-token bookkeeping: the logit at position p predicts token p+1, so a chunk's tokens [a, b) are
predicted by logits a-1 .. b-2. A chunk starting at the first valid position has no predicting
logit; `Alignment.predictable` is False for it and `logit_positions` returns None for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .canonical import special_roles, token_bytes

__all__ = ["Alignment", "AlignmentMemo", "align", "align_batch", "byte_table"]


# ---- per-tokenizer byte tables (built once, cached) ---------------------------------------------


@dataclass
class ByteTable:
    lengths: np.ndarray  # [V] int64 byte length of each id (0 for specials and holes)
    starts: np.ndarray  # [V] int64 offset of each id's bytes in `flat`
    flat: np.ndarray  # [sum lengths] uint8, every id's bytes back to back
    is_special: np.ndarray  # [V] bool: no bytes (special token, hole, unknown id)
    role: dict  # special id -> role string (bos, end_of_turn, ...)
    id_limit: int = 0  # ids a row may hold: 0..id_limit-1 (the model's logit width; padded ids have no bytes)
    name: str = ""  # the tokenizer's name, for error messages


_TABLES: dict[int, tuple[object, ByteTable]] = {}


def byte_table(tok) -> ByteTable:
    """The tokenizer's byte table; cached by object identity (the tokenizer is kept alive with it)."""
    hit = _TABLES.get(id(tok))
    if hit is not None and hit[0] is tok:
        return hit[1]
    pieces = token_bytes(tok)
    size = max(len(pieces), len(tok)) + 1
    lengths = np.zeros(size, dtype=np.int64)
    for i, b in enumerate(pieces):
        if b is not None:
            lengths[i] = len(b)
    flat = np.frombuffer(b"".join(b for b in pieces if b is not None), dtype=np.uint8)
    starts = np.zeros(size, dtype=np.int64)
    starts[1:] = np.cumsum(lengths)[:-1]
    from .tokenizers import model_vocab_size

    table = ByteTable(
        lengths,
        starts,
        flat,
        lengths == 0,
        special_roles(tok),
        max(size - 1, model_vocab_size(tok)),
        str(getattr(tok, "name_or_path", "") or type(tok).__name__),
    )
    _TABLES[id(tok)] = (tok, table)
    return table


def _gather_bytes(table: ByteTable, ids: np.ndarray) -> np.ndarray:
    """Concatenated bytes of `ids` as a uint8 array, without a Python loop over tokens."""
    lens = table.lengths[ids]
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint8)
    out_starts = np.cumsum(lens) - lens
    # byte k of the output comes from flat[starts[id] + (k - out_start[token of k])]
    shift = np.repeat(table.starts[ids] - out_starts, lens)
    return table.flat[shift + np.arange(total)]


# ---- the alignment ------------------------------------------------------------------------------


@dataclass
class Alignment:
    """Chunk pairs of one sequence pair. Positions index the (possibly padded) input rows."""

    student_spans: np.ndarray  # [n_chunks, 2] int64: chunk k covers student positions [a, b)
    teacher_spans: np.ndarray  # [n_chunks, 2] int64: and teacher positions [c, d)
    student_unpaired: np.ndarray  # [*] int64 student positions in no chunk
    teacher_unpaired: np.ndarray  # [*] int64 teacher positions in no chunk
    student_ids: np.ndarray  # [L_S] the student row (padding included)
    teacher_ids: np.ndarray  # [L_T]
    student_valid: tuple  # (first, end) valid positions of the student row
    teacher_valid: tuple
    is_special: np.ndarray  # [n_chunks] bool: a paired special-token chunk

    def __len__(self) -> int:
        return len(self.student_spans)

    def _side(self, side: str) -> bool:
        if side not in ("student", "teacher"):
            raise ValueError(f"side must be 'student' or 'teacher', not {side!r}")
        return side == "student"

    @property
    def predictable(self) -> np.ndarray:
        """[n_chunks] bool: both sides' chunk has a predicting logit (it does not start a valid row)."""
        return (self.student_spans[:, 0] > self.student_valid[0]) & (self.teacher_spans[:, 0] > self.teacher_valid[0])

    def logit_positions(self, side: str = "student") -> list:
        """For each chunk, the logit positions a-1 .. b-2 predicting its tokens; None if not predictable."""
        spans = self.student_spans if self._side(side) else self.teacher_spans
        return [np.arange(a - 1, b - 1) if ok else None for (a, b), ok in zip(spans.tolist(), self.predictable)]

    def token_table(self, side: str, chunks: np.ndarray | None = None):
        """Flat per-token view of the given chunks (default: all predictable ones), for vectorised losses.

        Returns (chunk, logit_pos, token_id, offset): for every token of every listed chunk, the index
        into `chunks` it belongs to, the logit position predicting it, its id, and its offset in its chunk.
        """
        student = self._side(side)
        if chunks is None:
            chunks = np.flatnonzero(self.predictable)
        chunks = np.asarray(chunks)
        if len(chunks) and (chunks.min() < 0 or chunks.max() >= len(self)):
            raise IndexError(f"chunk indices must lie in 0..{len(self) - 1} (this alignment has {len(self)} chunks)")
        spans = (self.student_spans if student else self.teacher_spans)[chunks]
        ids = self.student_ids if side == "student" else self.teacher_ids
        chunk, pos, offset = span_tokens(spans)
        return chunk, pos - 1, ids[pos], offset

    def chunk_bytes(self, k: int, student_tok, teacher_tok) -> tuple[bytes, bytes]:
        """The bytes both sides of chunk k decode to (specials contribute none)."""
        if not 0 <= int(k) < len(self):
            raise IndexError(f"chunk {k} out of range: this alignment has chunks 0..{len(self) - 1}")
        (a, b), (c, d) = self.student_spans[k], self.teacher_spans[k]
        return (
            _gather_bytes(byte_table(student_tok), self.student_ids[a:b]).tobytes(),
            _gather_bytes(byte_table(teacher_tok), self.teacher_ids[c:d]).tobytes(),
        )


def span_tokens(spans: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every token of the spans [n, 2] (token ranges [a, b)), in order: (its span's index, its position, its
    offset in its span), each [sum of the span lengths] int64. The one token table of chunk spans: the
    losses' batched tables (`xtoken.losses.plan.chunk_tables`) are these over a batch's spans."""
    lens = spans[:, 1] - spans[:, 0]
    chunk = np.repeat(np.arange(len(spans)), lens)
    offset = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return chunk, np.repeat(spans[:, 0], lens) + offset, offset


def _text_walk(s_bytes, s_ends, t_bytes, t_ends, window: int, agree_bytes: int):
    """Chunks over text tokens only (indices into the text-token arrays), plus unpaired text tokens.

    `*_ends` are cumulative byte ends of each text token. Returns (s_chunks, t_chunks, s_unpaired,
    t_unpaired): chunk k = text tokens [s_chunks[k, 0], s_chunks[k, 1]) ~ [t_chunks[k, 0], t_chunks[k, 1]).

    The walk alternates two steps from a pair of token boundaries (si, ti) at byte offsets (sb, tb):
    an agreeing stretch (the bytes agree from there up to the first difference, and its chunks close
    wherever both sides end a token: where a student end, shifted by tb - sb, is a teacher end), then a
    resynchronisation from the last chunk's end. Clean text is a single stretch. A stretch costs a fixed
    handful of numpy calls and only appends its chunk stops; the chunk starts are filled in once at the
    end, so a sample with ~50 disagreements pays no per-stretch stacking or set intersection.
    """
    ns, nt = len(s_ends), len(t_ends)
    # t_stop_at[x] = 1 + index of the teacher token whose bytes end at offset x; 0 where none ends
    t_stop_at = np.zeros(len(t_bytes) + 1, dtype=np.int64)
    t_stop_at[t_ends] = np.arange(1, nt + 1)
    s_stops, t_stops = [], []  # per stretch: its chunks' stops (exclusive token indices) on each side
    firsts = []  # per stretch with chunks: (index of its first chunk, si, ti where it starts)
    n_chunks = 0
    un_s, un_t = [], []
    py = None  # Python copies for the small-window resync, made at the first disagreement
    si = ti = sb = tb = 0  # next text token on each side, and its byte offset
    while si < ns and ti < nt:
        agree = _agreement(s_bytes, sb, t_bytes, tb)
        s_hi = int(s_ends.searchsorted(sb + agree, side="right"))  # student ends inside the agreed run,
        t_stop = t_stop_at[s_ends[si:s_hi] + (tb - sb)]  # moved to teacher offsets (<= tb + agree)
        hit = np.flatnonzero(t_stop)  # the common ends: chunks close there
        if len(hit):
            firsts.append((n_chunks, si, ti))
            s_stops.append(si + 1 + hit)
            t_stops.append(t_stop[hit])
            n_chunks += len(hit)
            si, ti = si + 1 + int(hit[-1]), int(t_stop[hit[-1]])
            sb, tb = int(s_ends[si - 1]), int(t_ends[ti - 1])
        if si >= ns or ti >= nt:
            break
        # the sides disagree (or one side's bytes ran out): resynchronise within the window
        if py is None:
            s_begin, t_begin = np.concatenate([[0], s_ends[:-1]]), np.concatenate([[0], t_ends[:-1]])
            py = (s_bytes.tobytes(), s_begin.tolist(), t_bytes.tobytes(), t_begin.tolist())
        found = _resync(s_bytes, s_begin, si, t_bytes, t_begin, ti, window, agree_bytes, *py)
        if found is None:
            break
        new_si, new_ti = found
        un_s.extend(range(si, new_si))
        un_t.extend(range(ti, new_ti))
        si, ti = new_si, new_ti
        sb, tb = int(s_begin[si]), int(t_begin[ti])
    un_s.extend(range(si, ns))
    un_t.extend(range(ti, nt))
    cs, ct = np.zeros((n_chunks, 2), dtype=np.int64), np.zeros((n_chunks, 2), dtype=np.int64)
    if n_chunks:
        cs[:, 1], ct[:, 1] = np.concatenate(s_stops), np.concatenate(t_stops)
        # a chunk starts where the previous one stopped, except the first chunk of each stretch
        cs[1:, 0], ct[1:, 0] = cs[:-1, 1], ct[:-1, 1]
        k, s0, t0 = np.array(firsts, dtype=np.int64).T
        cs[k, 0], ct[k, 0] = s0, t0
    return cs, ct, np.array(un_s, dtype=np.int64), np.array(un_t, dtype=np.int64)


def _agreement(s_bytes, sb, t_bytes, tb) -> int:
    """Length of the byte run on which both sides agree from (sb, tb). Compares in doubling windows,
    so finding a nearby mismatch costs O(distance), not O(rest of the sequence)."""
    n = min(len(s_bytes) - sb, len(t_bytes) - tb)
    lo, size = 0, 256
    while lo < n:
        hi = min(lo + size, n)
        diff = np.flatnonzero(s_bytes[sb + lo : sb + hi] != t_bytes[tb + lo : tb + hi])
        if len(diff):
            return lo + int(diff[0])
        lo, size = hi, size * 4
    return n


def _resync(s_bytes, s_begin, si, t_bytes, t_begin, ti, window, agree_bytes, s_py, s_begin_py, t_py, t_begin_py):
    """Nearest pair of token starts (i >= si, j >= ti, not both equal) after which the bytes agree.

    "Agree": the next `agree_bytes` bytes are equal; or the first tokens from there are byte-identical
    (another disagreement may follow soon: NFC rewrites every accented letter); or both sides' remaining
    bytes are equal. Nearest: fewest skipped tokens, then the longest agreement, then the most balanced
    skip. None if no pair in the window qualifies. `*_py`: the same bytes and token starts as Python
    `bytes` and lists, for the small-window search.
    """
    small = min(4, window)  # a small window first: most mismatches are local
    found = _resync_small(s_py, s_begin_py, si, t_py, t_begin_py, ti, small, agree_bytes)
    if found is None and window > small:
        found = _resync_in(s_bytes, s_begin, si, t_bytes, t_begin, ti, window, agree_bytes)
    return found


def _resync_small(s_bytes: bytes, s_begin: list, si, t_bytes: bytes, t_begin: list, ti, window, agree_bytes):
    """`_resync_in` for a small window in plain Python (same criteria, same choice): on (window+1)^2
    candidate pairs the numpy version's fixed per-call cost (~0.1 ms) dominates. Pairs are tried by
    number of skipped tokens, fewest first, so the search stops at the first count with a qualifying pair."""

    def candidates(data, begin, i0):
        """Per candidate start: its next agree_bytes bytes (fewer at the end) and its first token's length."""
        b = begin[i0 : i0 + window + 2]
        nxt = b[1:] + ([len(data)] if i0 + len(b) >= len(begin) else [])  # next token's start, or the end
        return [(data[x0 : x0 + agree_bytes], x1 - x0) for x0, x1 in zip(b[: window + 1], nxt)]

    ss, ts = candidates(s_bytes, s_begin, si), candidates(t_bytes, t_begin, ti)
    for skipped in range(1, len(ss) + len(ts) - 1):
        best = None
        for di in range(max(0, skipped - len(ts) + 1), min(skipped, len(ss) - 1) + 1):
            dj = skipped - di
            (x, s_first), (y, t_first) = ss[di], ts[dj]
            # The criteria on these capped windows: equal windows always qualify (agree_bytes equal bytes, or
            # both sides' remaining bytes equal); unequal ones only if the first tokens are byte-identical.
            if x == y:
                run = len(x)  # agreed bytes, capped
            elif s_first == t_first and x[: min(s_first, agree_bytes)] == y[: min(s_first, agree_bytes)]:
                run = next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
            else:
                continue  # no agreement (most pairs)
            key = (-run, abs(di - dj), di)  # then longest, balanced
            if run and (best is None or key < best[0]):
                best = (key, si + di, ti + dj)
        if best is not None:
            return best[1:]
    return None


def _resync_in(s_bytes, s_begin, si, t_bytes, t_begin, ti, window, agree_bytes):
    ci = np.arange(si, min(si + window + 1, len(s_begin)))
    cj = np.arange(ti, min(ti + window + 1, len(t_begin)))
    s_first = (
        np.append(s_begin[ci[1:]], s_begin[ci[-1] + 1] if ci[-1] + 1 < len(s_begin) else len(s_bytes)) - s_begin[ci]
    )
    t_first = (
        np.append(t_begin[cj[1:]], t_begin[cj[-1] + 1] if cj[-1] + 1 < len(t_begin) else len(t_bytes)) - t_begin[cj]
    )

    def windows(data, begins, pad):
        idx = np.minimum(begins[:, None] + np.arange(agree_bytes)[None, :], len(data) + agree_bytes - 1)
        padded = np.concatenate([data.astype(np.int16), np.full(agree_bytes, pad, dtype=np.int16)])
        return padded[idx], len(data) - begins

    ws, rem_s = windows(s_bytes, s_begin[ci], -1)
    wt, rem_t = windows(t_bytes, t_begin[cj], -2)
    run = np.cumprod(ws[:, None, :] == wt[None, :, :], axis=-1).sum(-1)  # agreed bytes, capped
    same_first = (s_first[:, None] == t_first[None, :]) & (run >= np.minimum(s_first[:, None], agree_bytes))
    both_end = (rem_s[:, None] == rem_t[None, :]) & (run >= rem_s[:, None])
    ok = (run > 0) & ((run >= agree_bytes) | same_first | both_end)
    ok[0, 0] = False
    if not ok.any():
        return None
    di, dj = np.nonzero(ok)
    best = np.lexsort((np.abs(di - dj), -run[di, dj], di + dj))[0]
    return int(ci[di[best]]), int(cj[dj[best]])


def _align_valid(
    s_ids: np.ndarray, t_ids: np.ndarray, s_table: ByteTable, t_table: ByteTable, window: int, agree_bytes: int
):
    """Chunks and unpaired positions of two unpadded rows (positions relative to the rows)."""
    s_ids = np.clip(s_ids, 0, len(s_table.lengths) - 1)
    t_ids = np.clip(t_ids, 0, len(t_table.lengths) - 1)
    s_txt = np.flatnonzero(~s_table.is_special[s_ids])  # positions of text tokens
    t_txt = np.flatnonzero(~t_table.is_special[t_ids])
    s_bytes = _gather_bytes(s_table, s_ids[s_txt])
    t_bytes = _gather_bytes(t_table, t_ids[t_txt])
    s_ends = np.cumsum(s_table.lengths[s_ids[s_txt]])
    t_ends = np.cumsum(t_table.lengths[t_ids[t_txt]])
    cs, ct, us, ut = _text_walk(s_bytes, s_ends, t_bytes, t_ends, window, agree_bytes)
    # text-token indices -> positions: a chunk spans from its first to its last text token
    s_spans = np.stack([s_txt[cs[:, 0]], s_txt[cs[:, 1] - 1] + 1], 1) if len(cs) else cs
    t_spans = np.stack([t_txt[ct[:, 0]], t_txt[ct[:, 1] - 1] + 1], 1) if len(ct) else ct
    s_unpaired, t_unpaired = list(s_txt[us]), list(t_txt[ut])

    # special tokens outside every chunk span: pair same-role specials in the same gap, in order
    def loose_specials(ids, txt, spans, table):
        covered = np.bincount(spans[:, 0], minlength=len(ids) + 1) - np.bincount(spans[:, 1], minlength=len(ids) + 1)
        inside = np.cumsum(covered)[:-1] > 0
        special = np.ones(len(ids), dtype=bool)
        special[txt] = False
        pos = np.flatnonzero(special & ~inside)
        gap = np.searchsorted(spans[:, 0], pos, side="right")
        return [(int(g), table.role.get(int(ids[p]), "unknown"), int(p)) for g, p in zip(gap, pos)]

    s_loose = loose_specials(s_ids, s_txt, s_spans, s_table)
    t_loose = loose_specials(t_ids, t_txt, t_spans, t_table)
    t_by_gap: dict[int, list] = {}
    for g, role, p in t_loose:
        t_by_gap.setdefault(g, []).append((role, p))
    s_by_gap: dict[int, list] = {}
    for g, role, p in s_loose:
        s_by_gap.setdefault(g, []).append((role, p))
    pairs = []
    for g in sorted(set(s_by_gap) | set(t_by_gap)):
        ts, j = t_by_gap.get(g, []), 0
        for role, p in s_by_gap.get(g, []):  # greedy in-order matching by role
            k = next((k for k in range(j, len(ts)) if ts[k][0] == role), None)
            if k is None:
                s_unpaired.append(p)
            else:
                t_unpaired.extend(q for _, q in ts[j:k])
                pairs.append((p, ts[k][1]))
                j = k + 1
        t_unpaired.extend(q for _, q in ts[j:])
    special_chunk = np.zeros(len(s_spans), dtype=bool)
    if pairs:
        ps = np.array(pairs, dtype=np.int64)
        s_spans = np.concatenate([s_spans, np.stack([ps[:, 0], ps[:, 0] + 1], 1)])
        t_spans = np.concatenate([t_spans, np.stack([ps[:, 1], ps[:, 1] + 1], 1)])
        special_chunk = np.concatenate([special_chunk, np.ones(len(ps), dtype=bool)])
        order = np.argsort(s_spans[:, 0], kind="stable")
        s_spans, t_spans, special_chunk = s_spans[order], t_spans[order], special_chunk[order]
    return (
        s_spans.astype(np.int64),
        t_spans.astype(np.int64),
        np.sort(np.array(s_unpaired, dtype=np.int64)),
        np.sort(np.array(t_unpaired, dtype=np.int64)),
        special_chunk,
    )


def _int_array(x) -> np.ndarray:
    """An int64 copy the Alignment owns (never a view: a DataLoader worker moves a batch's tensors into
    shared memory after collation, which frees their old storage under any view of it)."""
    if isinstance(x, np.ndarray):
        return np.array(x, dtype=np.int64)
    return np.asarray(x.tolist() if hasattr(x, "tolist") else x, dtype=np.int64)


def _check_row(side: str, ids: np.ndarray, mask) -> None:
    """A 1-D row whose mask (if any) has its length, and whose ids are ids of the tokenizer (no -100)."""
    if ids.ndim != 1:
        raise ValueError(
            f"{side}_ids must be one row (1-D), not shape {ids.shape}: use align_batch for [batch, length]"
        )
    if mask is not None and np.shape(mask) != ids.shape:
        raise ValueError(f"{side}_mask has shape {np.shape(mask)}, {side}_ids {ids.shape}: one mask entry per id")


def _check_ids(side: str, ids: np.ndarray, first: int, table: ByteTable) -> None:
    if len(ids) == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= table.id_limit:
        i = int(np.flatnonzero((ids < 0) | (ids >= table.id_limit))[0])
        hint = (
            " (-100 is the labels' ignore value: pass input ids, and an attention mask for padding)"
            if int(ids[i]) == -100
            else ""
        )
        raise ValueError(
            f"{side} id {int(ids[i])} at position {first + i} is not an id of {table.name!r}: valid ids "
            f"are 0..{table.id_limit - 1}{hint}"
        )


def _valid_range(mask) -> tuple[int, int]:
    """(first, end) of the valid region of a row given its attention mask (left or right padding)."""
    nz = np.flatnonzero(np.asarray(mask))
    return (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)


class AlignmentMemo:
    """Remembers per-row collation work by content, for text that comes by more than once (several
    epochs, or the miniature's ~70 student runs over one corpus, where aligning and tokenizing were
    ~60% of a batch's collation): alignments (`align`, ``memo=``) and tokenizations
    (`xtoken.train.DistillCollator`, ``memo=``).

    Alignment keys are the two tokenizers' byte tables, the search settings and the ids of both valid
    regions, so a hit is the very result `align` would compute (padding and batch width do not
    matter). Holds at most ``max_rows`` entries (the oldest are dropped first); ``hits``/``misses``
    count lookups.
    """

    def __init__(self, max_rows: int = 200_000):
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.max_rows = int(max_rows)
        self._rows: dict = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key):
        """The stored value, or None (counted as a hit or a miss)."""
        hit = self._rows.get(key)
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(self, key, value) -> None:
        if key not in self._rows and len(self._rows) >= self.max_rows:
            self._rows.pop(next(iter(self._rows)))
        self._rows[key] = value

    def lookup(self, key, compute):
        """get, or compute() and put."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value


def align(
    student_ids,
    teacher_ids,
    student_tok,
    teacher_tok,
    *,
    student_mask=None,
    teacher_mask=None,
    window: int = 32,
    agree_bytes: int = 16,
    memo: AlignmentMemo | None = None,
) -> Alignment:
    """Align one student row with one teacher row of the same text (see the module docstring).

    ids: sequences or 1-D tensors; masks (optional): 1 on valid positions, one contiguous run
    (left or right padding). Positions in the result index the rows as given. ``memo``: an
    `AlignmentMemo` to reuse the result for rows aligned before.
    """
    s, t = _int_array(student_ids), _int_array(teacher_ids)
    s_table, t_table = byte_table(student_tok), byte_table(teacher_tok)
    _check_row("student", s, student_mask)
    _check_row("teacher", t, teacher_mask)
    sv = _valid_range(student_mask) if student_mask is not None else (0, len(s))
    tv = _valid_range(teacher_mask) if teacher_mask is not None else (0, len(t))
    s_valid, t_valid = s[sv[0] : sv[1]], t[tv[0] : tv[1]]
    _check_ids("student", s_valid, sv[0], s_table)  # (ids outside the valid region: padding)
    _check_ids("teacher", t_valid, tv[0], t_table)
    compute = lambda: _align_valid(s_valid, t_valid, s_table, t_table, window, agree_bytes)
    if memo is None:
        ss, ts, su, tu, sp = compute()
    else:  # byte tables live as long as their tokenizer (byte_table's cache), so ids are stable
        key = (id(s_table), id(t_table), window, agree_bytes, s_valid.tobytes(), t_valid.tobytes())
        ss, ts, su, tu, sp = memo.lookup(key, compute)
    return Alignment(ss + sv[0], ts + tv[0], su + sv[0], tu + tv[0], s, t, sv, tv, sp)


def align_batch(
    student_ids, teacher_ids, student_tok, teacher_tok, *, student_mask=None, teacher_mask=None, **kwargs
) -> list[Alignment]:
    """`align` for each row: lists of sequences, or padded [B, L] tensors with attention masks.
    kwargs: window, agree_bytes, memo (see `align`)."""
    # one conversion per batch, not per row; views are fine here: `align` copies each row it keeps
    as_np = lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    student_ids, teacher_ids, student_mask, teacher_mask = map(
        as_np, (student_ids, teacher_ids, student_mask, teacher_mask)
    )
    n = len(student_ids)
    for name, x in (("teacher_ids", teacher_ids), ("student_mask", student_mask), ("teacher_mask", teacher_mask)):
        if x is not None and len(x) != n:
            raise ValueError(f"{name} has {len(x)} rows, student_ids {n}: one row per sequence pair")
    out = []
    for b in range(len(student_ids)):
        out.append(
            align(
                student_ids[b],
                teacher_ids[b],
                student_tok,
                teacher_tok,
                student_mask=None if student_mask is None else student_mask[b],
                teacher_mask=None if teacher_mask is None else teacher_mask[b],
                **kwargs,
            )
        )
    return out
