"""The block engine: every loss runs over blocks of chunk pairs (or positions) and differentiates each block at once.

A loss hands `run_blocks` a function computing one block's summed loss from leaves holding that block's student
logit rows. Each block's sum is divided by the item count, differentiated (`torch.autograd.grad`) and its gradient
written into one buffer shaped like the student logits; the block's graph is then freed. Peak extra memory is
one block's work whatever the batch size, and `EagerBlockGrad` hands the buffered gradient on at ``backward()``.

Block sizes (``chunk_size=None``) come from a fixed element budget, proportionally larger at narrower
vocabularies, where each block's ~50 small tensor ops would otherwise cost more than their arithmetic (the
miniature's 372-1,362-id vocabularies run in one block per batch):

- GPUs: 64 chunks at Qwen3's 151,936 columns (`BLOCK_ELEMENTS`), 256 positions at 128,256 for `kl_loss`
  (`KL_BLOCK_ELEMENTS`).
- CPU: every block tensor within 2^23 elements, 32 MiB in float32 (`CPU_BLOCK_ELEMENTS`), counting the token rows
  of *both* sides (Qwen spells numbers digit by digit): 32-55 chunks at Qwen3's width, 65 positions for `kl_loss`
  at Llama's. glibc serves larger buffers with a fresh ``mmap`` and page-faults them again on every use, which
  costs 3-4 times the arithmetic of such a temporary (benchmarks/measurements.csv). For the same reason block
  temporaries are written into buffers kept for the whole call (`Workspace`).

CPU row operations: `argmax` and `rowdot` pick the fastest route at the row width (numpy's SIMD argmax; a loop of
dot products on wide rows).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

EPS = 1e-12  # zero probabilities on the right of a divergence are clamped here
BLOCK_ELEMENTS = 64 * 151_936  # GPU block budget of the cross-tokenizer losses (chunks x widest vocabulary)
KL_BLOCK_ELEMENTS = 256 * 128_256  # and of kl_loss (positions x vocabulary)
CPU_BLOCK_ELEMENTS = 1 << 23  # CPU: every block tensor within 2^23 elements (see the module docstring)


def budget(device, gpu_budget: int) -> int:
    """The block element budget on ``device``: `CPU_BLOCK_ELEMENTS` on CPU, else ``gpu_budget``."""
    return CPU_BLOCK_ELEMENTS if torch.device(device).type == "cpu" else gpu_budget


def block_size(chunk_size: int | None, width: int, budget: int, floor: int) -> int:
    """``chunk_size`` if given, else as many rows as fit ``budget`` elements at ``width`` (at least ``floor``)."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
        return int(chunk_size)
    return max(floor, budget // max(int(width), 1))


def block_bounds(
    n_items: int,
    chunk_size: int | None,
    starts: list | None = None,
    widths: list | None = None,
    budget: int = CPU_BLOCK_ELEMENTS,
    floor: int = 1,
) -> list[tuple[int, int]]:
    """Blocks [lo, hi) of items (positions, or chunk pairs).

    ``chunk_size`` given: that many items per block. Else greedy: as many items as keep every side's token rows
    x width within ``budget`` elements (at least ``floor`` items, at least one). ``starts[k][i]``: the token row
    where item i starts on side k (length n_items + 1); ``widths[k]``: that side's vocabulary width."""
    if chunk_size is not None or starts is None:
        step = block_size(chunk_size, max(widths or [1]), budget, floor)
        return [(lo, min(lo + step, n_items)) for lo in range(0, n_items, step)]
    caps = [max(budget // max(int(w), 1), 1) for w in widths]
    bounds, lo = [], 0
    while lo < n_items:
        hi = min(int(np.searchsorted(st, st[lo] + cap, side="right")) - 1 for st, cap in zip(starts, caps))
        hi = min(max(hi, lo + floor, lo + 1), n_items)
        bounds.append((lo, hi))
        lo = hi
    return bounds


# ---- CPU-fast row operations --------------------------------------------------------------------


def argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim (first maximum, as torch's). On CPU numpy's SIMD argmax: 8x faster at 128,256
    columns than torch's (0.9 vs 6.9 ms for 64 rows)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.argmax(x.detach().numpy(), axis=-1))
    return x.argmax(-1)


def rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise sum(x * y). On CPU, wide rows (>= 8,192 columns) take a loop of dot products (no [n, V]
    temporary; 3-7x faster than bmm or x * y at 151,936 columns); narrow rows one vectorised x * y
    (the loop's per-row call costs more than the arithmetic: 15x slower at 1,400 x 372)."""
    if x.device.type == "cpu" and x.shape[-1] >= 8192:
        return torch.stack([a.dot(b) for a, b in zip(x, y)]) if len(x) else x.new_zeros(0)
    if x.device.type == "cpu":
        return (x * y).sum(-1)
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)


class Workspace:
    """Block temporaries of one loss call, reused by every block.

    ``out(ws, name, like)`` gives ``out=`` for a temporary: a buffer kept here under (name, dtype, device) that
    torch resizes in place (its storage only grows), so on CPU it is page-faulted once per loss call instead of
    once per block. Lives for one call only: nothing is kept between calls."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}


def out(ws: Workspace | None, name: str, like: torch.Tensor) -> dict:
    """``{"out": buffer}`` for a block temporary shaped like nothing yet, of ``like``'s dtype and device; ``{}``
    (a fresh tensor) without a workspace."""
    if ws is None:
        return {}
    key = (name, like.dtype, like.device)
    buf = ws.buffers.get(key)
    if buf is None or not buf.untyped_storage().resizable():  # (numpy views pin a storage: `argmax`)
        buf = ws.buffers[key] = torch.empty(0, dtype=like.dtype, device=like.device)
    return {"out": buf.resize_(0)}  # (resize_ keeps the storage)


def gather_rows(
    logits: torch.Tensor,
    b: torch.Tensor,
    p: torch.Tensor,
    width: int,
    ws: Workspace | None = None,
    name: str = "rows",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logit rows (b, p) of ``logits`` [B, L, V'] without the padded columns beyond ``width``: one contiguous
    [n, width] copy (gathered from the sliced view, so a softmax needs no second copy; into the workspace buffer
    ``name`` if given), in ``dtype`` (default: at least float32; a float32 input is not copied twice)."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    flat = flat[:, :width] if width < flat.shape[1] else flat
    dtype = dtype or torch.promote_types(flat.dtype, torch.float32)
    if flat.dtype != dtype:
        return torch.index_select(flat, 0, b * logits.shape[1] + p).to(dtype)
    return torch.index_select(flat, 0, b * logits.shape[1] + p, **out(ws, name, flat))


# ---- eager per-block gradients ------------------------------------------------------------------


class EagerBlockGrad(torch.autograd.Function):
    """A loss computed block by block whose gradients w.r.t. the student logits (and the learned W entries,
    if any) were already accumulated during the forward pass; backward scales them by the upstream gradient."""

    @staticmethod
    def forward(ctx, student_logits, extra, total, grad, grad_extra):
        ctx.save_for_backward(grad, grad_extra)
        return total.clone()

    @staticmethod
    def backward(ctx, g):
        grad, grad_extra = ctx.saved_tensors
        one = g.numel() == 1 and float(g) == 1.0  # the common case: no extra copy
        scale = lambda x: x if one else x * g.to(x.dtype)
        return (
            scale(grad) if ctx.needs_input_grad[0] else None,
            scale(grad_extra) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
        )


BlockFn = Callable[[int, int, bool, "torch.Tensor | None"], tuple]


def run_blocks(
    student_logits: torch.Tensor,
    n_items: int,
    bounds: list[tuple[int, int]],
    block_fn: BlockFn,
    extra: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean over the ``n_items`` of ``block_fn(lo, hi, grad, extra_leaf)`` over the blocks ``bounds``.

    ``block_fn`` returns (loss_sum, leaves), leaves [(b, p, leaf)]: tensors holding the student logit rows (b, p)
    that the block's loss was computed from (requiring grad when ``grad``). Each block's sum is divided by
    ``n_items`` before it is differentiated, so the buffer holds the mean's gradient and a plain
    ``loss.backward()`` hands it on without a [B, L, V] rescaling copy.

    ``extra``: an optional second differentiable input shared by all blocks (learned W entries); each block sees
    it as a fresh leaf and its gradient is summed over the blocks. ``dtype``: the loss value's (the compute
    dtype; default the student logits'); the gradient is in the student logits' dtype. Returns a scalar."""
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
                for (b, p, _), g in zip(parts if needs_s else [], gs):  # (padded columns: no gradient)
                    if g is not None:
                        grad.view(-1, grad.shape[-1])[:, : g.shape[1]].index_add_(
                            0, b * grad.shape[1] + p, g.to(grad.dtype)
                        )
                if needs_x and gs[-1] is not None:
                    grad_x += gs[-1]
        total += loss_sum.detach().double().cpu()
    total = total.to(dtype or student_logits.dtype)
    if needs_s or needs_x:
        return EagerBlockGrad.apply(student_logits, extra, total, grad, grad_x)
    return total
