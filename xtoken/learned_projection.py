"""W with trainable row weights (`LearnableProjection`): the paper's optional fine-tuning of W with P-KL."""

from __future__ import annotations

from pathlib import Path

import torch

from .projection import MULTI, Projection, ProjectionFileError, ProjectionMismatch, _read_file

__all__ = ["LearnableProjection"]


class LearnableProjection(torch.nn.Module):
    """W with trainable row weights, for P-KL (the paper's optional fine-tuning of W).

    The pattern is fixed: each row keeps the teacher ids of the built W. A row with two or more
    entries (a multi-token row) is re-parametrized as a softmax over free parameters,

        W[s, k] = S_s * softmax_k(log W0[s, k] + theta[s, k])     (over the row's non-zero entries k)

    with W0 the built weights, S_s = sum_k W0[s, k] (1 up to float rounding) and theta initialised at 0,
    so every row stays non-negative with the built row sum after any optimizer step, and W^T p stays a
    probability vector. Exact, special and empty rows have no parameters and never change.

    At theta = 0 the weights are W0 bit for bit (exp(0) = 1 and the row sum cancels exactly), so training
    with a learning rate of 0 equals training with the fixed W. ``weights()`` is differentiable; pass it
    as ``p_kl_loss(..., weights=...)``: P-KL is the only loss that reads W's values.
    """

    def __init__(self, projection: Projection):
        super().__init__()
        if projection.is_learned:
            raise ValueError(
                "start a LearnableProjection from a built W (Projection.load the built file; "
                "to continue a learned one, use load_state)"
            )
        self.base = projection
        n_entries = (projection.indices >= 0).sum(1)
        trainable = (projection.row_kind == MULTI) & (n_entries >= 2)
        self.register_buffer("w0", projection.weights.clone(), persistent=False)
        self.register_buffer("rows", trainable.nonzero().squeeze(1), persistent=False)
        w0 = self.w0[self.rows]
        self.register_buffer("mask", (w0 > 0), persistent=False)
        self.register_buffer(
            "log_w0", torch.where(self.mask, w0.clamp_min(1e-30).log(), torch.zeros_like(w0)), persistent=False
        )
        self.theta = torch.nn.Parameter(torch.zeros_like(w0))
        self.base_digest = projection.digest()  # what a saved learned W records

    @property
    def n_trainable_rows(self) -> int:
        return int(self.rows.numel())

    def row_weights(self) -> torch.Tensor:
        """[n_trainable_rows, k]: S * softmax(log W0 + theta), computed so that theta = 0 gives W0 exactly."""
        w0 = self.w0.index_select(0, self.rows)
        t = self.theta.masked_fill(~self.mask, float("-inf"))
        e = torch.exp(t - t.amax(1, keepdim=True))  # softmax's shift (0 at theta = 0)
        num = w0 * e  # = exp(log W0 + theta - max)
        return num * (w0.sum(1, keepdim=True) / num.sum(1, keepdim=True))

    def weights(self) -> torch.Tensor:
        """[V_S, k], like ``Projection.weights``; differentiable w.r.t. theta."""
        return self.w0.index_put((self.rows,), self.row_weights())

    forward = weights  # so torch.func.functional_call(lp, {"theta": t}) evaluates W at other parameters

    def row_changes(self) -> torch.Tensor:
        """[n_trainable_rows]: L1 distance of each trainable row to its built weights."""
        with torch.no_grad():
            return (self.row_weights() - self.w0.index_select(0, self.rows)).abs().sum(1)

    def to_projection(self) -> Projection:
        """The current W as a plain Projection (kind "learned"), for saving or for GOLD/H-KL/inspection."""
        meta = dict(
            self.base.meta,
            kind="learned",
            learned_from=self.base_digest,
            learned_from_kind=self.base.meta.get("kind", "built"),
            trainable_rows=self.n_trainable_rows,
        )
        return Projection(
            self.base.indices.clone(),
            self.weights().detach().cpu().clone(),
            self.base.row_kind.clone(),
            self.base.teacher_vocab_size,
            meta,
            self.base.student_tok,
            self.base.teacher_tok,
        )

    def save(self, path) -> Path:
        """The learned W in `Projection` format, plus ``theta`` (so training can resume exactly)."""
        return self.to_projection().save(path, extra={"theta": self.theta, "theta_rows": self.rows})

    def load_state(self, path) -> "LearnableProjection":
        """Restore theta from a file written by `save` (refused unless it was learned from this W)."""
        from safetensors import safe_open

        meta, _ = _read_file(path)
        with safe_open(str(path), framework="pt") as f:
            if "theta" not in f.keys() or "theta_rows" not in f.keys():
                raise ProjectionFileError(f"{path}: no theta: not a learned W written by LearnableProjection.save")
            if meta.get("learned_from") != self.base_digest:
                raise ProjectionMismatch(
                    f"{path} was learned from another W (digest {meta.get('learned_from')}), "
                    f"not this one ({self.base_digest})"
                )
            theta, rows = f.get_tensor("theta"), f.get_tensor("theta_rows")
        if not torch.equal(rows, self.rows.cpu()):
            raise ProjectionMismatch(f"{path}: trainable rows differ from this W's")
        with torch.no_grad():
            self.theta.copy_(theta)
        return self

    def moved_rows(self, n: int = 10) -> list[dict]:
        """The ``n`` rows whose weights moved most (L1 distance to W0), largest first."""
        dist = self.row_changes()
        order = torch.argsort(dist, descending=True, stable=True)[:n]
        with torch.no_grad():
            w, w0 = self.row_weights(), self.w0.index_select(0, self.rows)
        out = []
        for i in order.tolist():
            s = int(self.rows[i])
            k = self.mask[i]
            out.append(
                {
                    "row": s,
                    "teacher_ids": self.base.indices[s][k.cpu()].tolist(),
                    "before": w0[i][k].tolist(),
                    "after": w[i][k].tolist(),
                    "l1_change": float(dist[i]),
                }
            )
        return out
