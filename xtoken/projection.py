"""The projection matrix W: student vocabulary -> teacher vocabulary (X-Token, Sec. 3.2).

W is |V_S| x |V_T|, sparse, built once before training, deterministic:

  pass 1 (exact)   W[s, t] = 1        if canonical(s) == canonical(t)   (raw bytes; specials by role)
  pass 2 (multi)   W[s, tau_i] = beta * gamma^i,  i = 0..n-1,            if the teacher re-tokenizes
                   s's bytes into tau_0..tau_{n-1} with n <= max_span     (default beta=0.9, gamma=0.1)
  top-k            keep each row's k largest entries, then normalize the row to sum 1.

so W^T p is a probability vector over V_T whenever p is one over V_S (what P-KL needs).
Expected rows: 2 tokens (0.909, 0.091); 3 (0.9009, 0.0901, 0.0090); 4 (0.9000, 0.0900, 0.0090, 0.0009).
A teacher id repeated in a re-tokenization ('999' -> '9','9','9' under Qwen) has its weights summed.

Rows that stay empty (all zero) are counted in ``meta["counts"]`` by reason:
  ``too_long``  the re-tokenization has more than ``max_span`` tokens (the paper: "if <= 4"; the
                official code truncates instead, which puts the row's mass on a prefix);
  ``special``   a special token whose role the teacher lacks (Llama's reserved tokens, say);
  ``no_tokens`` the teacher produced nothing (an empty or unused id).
An empty row projects no mass: P-KL reports it as ``mass_lost_empty_rows``; H-KL treats the
student token as uncommon.

Storage: ``indices`` [V_S, k] int64 with -1 padding, ``weights`` [V_S, k] float32, ``row_kind``
[V_S] uint8. `save` writes safetensors with the tokenizers' fingerprints, so `load` refuses a W
used with the wrong tokenizers.

Learned W (the paper: W "can optionally be fine-tuned together with the student model under the
P-KL loss"): `LearnableProjection` keeps the pattern (each row's teacher ids) and makes each
multi-token row's weights a softmax over free parameters. Its `to_projection()` is an ordinary
`Projection` (``meta["kind"] == "learned"``, ``meta["learned_from"]`` = the built W's `digest`), saved
and loaded in the same format, with the same tokenizer check.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .canonical import special_roles, token_bytes, vocab_kind
from .tokenizers import model_vocab_size, tokenizer_fingerprint

__all__ = ["Projection", "LearnableProjection", "build_projection", "ProjectionMismatch", "EMPTY", "EXACT",
           "SPECIAL", "MULTI"]

EMPTY, EXACT, SPECIAL, MULTI = 0, 1, 2, 3
KIND_NAMES = {EMPTY: "empty", EXACT: "exact", SPECIAL: "special", MULTI: "multi"}
FORMAT_VERSION = 1


class ProjectionMismatch(ValueError):
    """W was built for other tokenizers than the ones it is used with."""


@dataclass
class Projection:
    indices: torch.Tensor            # [V_S, k] int64, -1 = no entry
    weights: torch.Tensor            # [V_S, k] float32, rows sum to 1 or are all 0
    row_kind: torch.Tensor           # [V_S] uint8: EMPTY / EXACT / SPECIAL / MULTI
    teacher_vocab_size: int          # columns of W (the teacher model's logit width)
    meta: dict = field(default_factory=dict)
    student_tok: object = field(default=None, repr=False, compare=False)
    teacher_tok: object = field(default=None, repr=False, compare=False)

    # ---- shape and views -------------------------------------------------------------------
    @property
    def student_vocab_size(self) -> int:
        return self.indices.shape[0]

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]

    def top1(self) -> torch.Tensor:
        """argmax_t W[s, t] per student row (-1 for empty rows): H-KL's widened common set."""
        best = self.weights.argmax(dim=1, keepdim=True)
        t = self.indices.gather(1, best).squeeze(1)
        return torch.where(self.row_kind == EMPTY, torch.full_like(t, -1), t)

    def exact_pairs(self) -> torch.Tensor:
        """Teacher id of each student token's strict 1-to-1 match (-1 if none): GOLD's common set."""
        strict = (self.row_kind == EXACT) | (self.row_kind == SPECIAL)
        return torch.where(strict, self.indices[:, 0], torch.full_like(self.indices[:, 0], -1))

    def to_sparse(self, dtype=torch.float32) -> torch.Tensor:
        """W as a torch sparse CSR tensor [V_S, V_T]."""
        keep = self.indices >= 0
        rows = torch.arange(self.student_vocab_size).unsqueeze(1).expand_as(self.indices)[keep]
        coo = torch.sparse_coo_tensor(torch.stack([rows, self.indices[keep]]), self.weights[keep].to(dtype),
                                      (self.student_vocab_size, self.teacher_vocab_size),
                                      check_invariants=True).coalesce()
        with warnings.catch_warnings():   # "CSR support is in beta": the conversion itself is exact
            warnings.simplefilter("ignore", UserWarning)
            return coo.to_sparse_csr()

    def restrict(self, student_ids, teacher_ids) -> "Projection":
        """W restricted to a subset of student rows and teacher columns, re-indexed locally.

        Used when a model's output layer covers only some ids (the miniature): row r of the result is
        student id ``student_ids[r]``, column c is teacher id ``teacher_ids[c]``. Entries whose teacher id
        is outside ``teacher_ids`` are dropped and the row renormalized; rows left with nothing are EMPTY
        and counted in ``meta["restricted_lost_rows"]``.
        """
        s = torch.as_tensor(student_ids, dtype=torch.long)
        t = torch.as_tensor(teacher_ids, dtype=torch.long)
        col = torch.full((max(self.teacher_vocab_size, int(t.max()) + 1),), -1, dtype=torch.long)
        col[t] = torch.arange(len(t))
        idx = self.indices[s]
        local = torch.where(idx >= 0, col[idx.clamp(min=0)], torch.full_like(idx, -1))
        w = torch.where(local >= 0, self.weights[s], torch.zeros_like(self.weights[s]))
        total = w.sum(1, keepdim=True)
        kind = self.row_kind[s].clone()
        lost = (total.squeeze(1) == 0) & (kind != EMPTY)
        kind[total.squeeze(1) == 0] = EMPTY
        w = torch.where(total > 0, w / total.clamp(min=1e-30), w)
        meta = dict(self.meta, restricted_from=self.meta.get("student_fingerprint"),
                    restricted_lost_rows=int(lost.sum()))
        return Projection(local, w, kind, len(t), meta)

    # ---- explanation -----------------------------------------------------------------------
    def row(self, token, student_tok=None, teacher_tok=None) -> list[tuple[str, int, float]]:
        """One row in readable strings: [(teacher token, teacher id, weight), ...].

        ``token`` is a student id or a student token string ('201', 'ĠHundreds', ...).
        """
        stok = student_tok or self.student_tok
        ttok = teacher_tok or self.teacher_tok
        if isinstance(token, str):
            if stok is None:
                raise ValueError("pass student_tok to look a row up by string")
            sid = stok.convert_tokens_to_ids(token)
            if sid is None or sid == stok.unk_token_id:
                raise KeyError(f"{token!r} is not a student token")
        else:
            sid = int(token)
        out = []
        for t, w in zip(self.indices[sid].tolist(), self.weights[sid].tolist()):
            if t >= 0:
                out.append((ttok.convert_ids_to_tokens(t) if ttok is not None else str(t), t, round(w, 4)))
        return out

    @property
    def is_learned(self) -> bool:
        return self.meta.get("kind") == "learned"

    def digest(self) -> str:
        """sha256 of the pattern and weights (what a learned W records as ``learned_from``)."""
        import hashlib
        h = hashlib.sha256()
        for t in (self.indices.to(torch.int64), self.weights.to(torch.float32), self.row_kind.to(torch.uint8)):
            h.update(t.contiguous().numpy().tobytes())
        h.update(str(self.teacher_vocab_size).encode())
        return h.hexdigest()

    def summary(self) -> dict:
        n = {name: int((self.row_kind == k).sum()) for k, name in KIND_NAMES.items()}
        spans = (self.indices >= 0).sum(1)
        multi = self.row_kind == MULTI
        hist = {int(k): int((spans[multi] == k).sum()) for k in range(1, self.top_k + 1)}
        return {"rows": self.student_vocab_size, "columns": self.teacher_vocab_size, **n,
                "multi_rows_by_length": hist, "empty_by_reason": self.meta.get("counts", {})}

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path, extra: dict | None = None) -> Path:
        """Write safetensors (indices int32, weights, row_kind, + ``extra`` tensors) with the meta as JSON."""
        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"xtoken_projection": json.dumps(dict(self.meta, format_version=FORMAT_VERSION,
                                                     teacher_vocab_size=self.teacher_vocab_size), sort_keys=True)}
        tensors = {"indices": self.indices.to(torch.int32).contiguous(), "weights": self.weights.contiguous(),
                   "row_kind": self.row_kind.contiguous()}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path, student_tok=None, teacher_tok=None) -> "Projection":
        """Read a W file; with tokenizers given, refuse it unless they are the ones it was built for."""
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["xtoken_projection"])
            tensors = {k: f.get_tensor(k) for k in ("indices", "weights", "row_kind")}
        for side, tok in (("student", student_tok), ("teacher", teacher_tok)):
            if tok is not None and meta.get(f"{side}_fingerprint") != tokenizer_fingerprint(tok):
                raise ProjectionMismatch(
                    f"{path} was built for {side} tokenizer {meta.get(side)!r} "
                    f"(fingerprint {meta.get(f'{side}_fingerprint')}), not for {getattr(tok, 'name_or_path', tok)!r} "
                    f"(fingerprint {tokenizer_fingerprint(tok)}). Rebuild it: python -m xtoken build-w --student ... --teacher ...")
        tvs = meta.pop("teacher_vocab_size")
        return cls(tensors["indices"].long(), tensors["weights"], tensors["row_kind"], tvs, meta,
                   student_tok, teacher_tok)


# ---- learned W ---------------------------------------------------------------------------------

class LearnableProjection(torch.nn.Module):
    """W with trainable row weights, for P-KL (issue 8; the paper's optional fine-tuning of W).

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
            raise ValueError("start a LearnableProjection from a built W (Projection.load the built file; "
                             "to continue a learned one, use load_state)")
        self.base = projection
        n_entries = (projection.indices >= 0).sum(1)
        trainable = (projection.row_kind == MULTI) & (n_entries >= 2)
        self.register_buffer("w0", projection.weights.clone(), persistent=False)
        self.register_buffer("rows", trainable.nonzero().squeeze(1), persistent=False)
        w0 = self.w0[self.rows]
        self.register_buffer("mask", (w0 > 0), persistent=False)
        self.register_buffer("log_w0", torch.where(self.mask, w0.clamp_min(1e-30).log(), torch.zeros_like(w0)),
                             persistent=False)
        self.theta = torch.nn.Parameter(torch.zeros_like(w0))
        self.base_digest = projection.digest()                             # what a saved learned W records

    @property
    def n_trainable_rows(self) -> int:
        return int(self.rows.numel())

    def row_weights(self) -> torch.Tensor:
        """[n_trainable_rows, k]: S * softmax(log W0 + theta), computed so that theta = 0 gives W0 exactly."""
        w0 = self.w0.index_select(0, self.rows)
        t = self.theta.masked_fill(~self.mask, float("-inf"))
        e = torch.exp(t - t.amax(1, keepdim=True))                         # softmax's shift (0 at theta = 0)
        num = w0 * e                                                       # = exp(log W0 + theta - max)
        return num * (w0.sum(1, keepdim=True) / num.sum(1, keepdim=True))

    def weights(self) -> torch.Tensor:
        """[V_S, k], like ``Projection.weights``; differentiable w.r.t. theta."""
        return self.w0.index_put((self.rows,), self.row_weights())

    forward = weights     # so torch.func.functional_call(lp, {"theta": t}) evaluates W at other parameters

    def row_changes(self) -> torch.Tensor:
        """[n_trainable_rows]: L1 distance of each trainable row to its built weights."""
        with torch.no_grad():
            return (self.row_weights() - self.w0.index_select(0, self.rows)).abs().sum(1)

    def to_projection(self) -> Projection:
        """The current W as a plain Projection (kind "learned"), for saving or for GOLD/H-KL/inspection."""
        meta = dict(self.base.meta, kind="learned", learned_from=self.base_digest,
                    learned_from_kind=self.base.meta.get("kind", "built"), trainable_rows=self.n_trainable_rows)
        return Projection(self.base.indices.clone(), self.weights().detach().cpu().clone(), self.base.row_kind.clone(),
                          self.base.teacher_vocab_size, meta, self.base.student_tok, self.base.teacher_tok)

    def save(self, path) -> Path:
        """The learned W in `Projection` format, plus ``theta`` (so training can resume exactly)."""
        return self.to_projection().save(path, extra={"theta": self.theta, "theta_rows": self.rows})

    def load_state(self, path) -> "LearnableProjection":
        """Restore theta from a file written by `save` (refused unless it was learned from this W)."""
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["xtoken_projection"])
            if meta.get("learned_from") != self.base_digest:
                raise ProjectionMismatch(f"{path} was learned from another W (digest {meta.get('learned_from')}), "
                                         f"not this one ({self.base_digest})")
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
            out.append({"row": s, "teacher_ids": self.base.indices[s][k.cpu()].tolist(),
                        "before": w0[i][k].tolist(), "after": w[i][k].tolist(), "l1_change": float(dist[i])})
        return out


# ---- construction ------------------------------------------------------------------------------

def _retokenize(teacher_tok, pieces: list[bytes]) -> list[list[int]]:
    """Teacher ids of each byte string, as the teacher tokenizes that text on its own.

    Valid UTF-8 goes through the teacher's whole pipeline (normalizer, pre-tokenizer, BPE).
    A partial UTF-8 sequence has no text, so it goes straight to the teacher's BPE model on bytes
    (byte-level vocabularies) or to its <0xHH> byte-fallback tokens (SentencePiece).
    """
    kind = vocab_kind(teacher_tok)
    backend = teacher_tok.backend_tokenizer
    out: list[list[int]] = [[] for _ in pieces]
    texts, where = [], []
    raw = []
    for i, b in enumerate(pieces):
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            raw.append(i)
            continue
        if kind == "sentencepiece":
            out[i] = [t.id for t in backend.model.tokenize(text.replace(" ", "\u2581"))]
        else:
            texts.append(text)
            where.append(i)
    for i, enc in zip(where, backend.encode_batch(texts, add_special_tokens=False)):
        out[i] = enc.ids
    if raw:
        from .tokenizers import _bytes_to_unicode
        b2u = _bytes_to_unicode()
        vocab = teacher_tok.get_vocab()
        for i in raw:
            if kind == "byte_level":
                out[i] = [t.id for t in backend.model.tokenize("".join(b2u[x] for x in pieces[i]))]
            else:
                ids = [vocab.get(f"<0x{x:02X}>") for x in pieces[i]]
                out[i] = ids if all(v is not None for v in ids) else []
    return out


def build_projection(student_tok, teacher_tok, *, max_span: int = 4, beta: float = 0.9,
                     gamma: float = 0.1, top_k: int = 4, progress: bool = False) -> Projection:
    """Build W for any pair of HF tokenizers (byte-level BPE or SentencePiece with byte fallback).

    Deterministic: the same tokenizers and arguments give a bit-identical `save` file.
    """
    if not (0 < gamma < 1 and beta > 0 and top_k >= 1 and max_span >= 1):
        raise ValueError(f"need beta > 0, 0 < gamma < 1, top_k >= 1, max_span >= 1; got {beta=}, {gamma=}, {top_k=}, {max_span=}")
    s_bytes = token_bytes(student_tok)
    t_bytes = token_bytes(teacher_tok)
    n_s = max(len(s_bytes), len(student_tok))
    n_t = model_vocab_size(teacher_tok)

    # pass 1: exact byte matches; teacher ids in ascending order so ties resolve deterministically
    t_index: dict[bytes, int] = {}
    for t, b in enumerate(t_bytes):
        if b is not None and b not in t_index:
            t_index[b] = t
    indices = np.full((n_s, top_k), -1, dtype=np.int64)
    weights = np.zeros((n_s, top_k), dtype=np.float32)
    kind = np.zeros(n_s, dtype=np.uint8)
    counts = {"too_long": 0, "special": 0, "no_tokens": 0}

    t_roles: dict[str, int] = {}
    for t, role in special_roles(teacher_tok).items():
        t_roles.setdefault(role, t)
    for s, role in special_roles(student_tok).items():
        if role in t_roles:
            indices[s, 0], weights[s, 0], kind[s] = t_roles[role], 1.0, SPECIAL
        else:
            counts["special"] += 1

    pending = []
    for s, b in enumerate(s_bytes):
        if b is None:
            continue
        t = t_index.get(b)
        if t is not None:
            indices[s, 0], weights[s, 0], kind[s] = t, 1.0, EXACT
        else:
            pending.append(s)

    # pass 2: re-tokenize the rest with the teacher; decayed weights beta * gamma^i (eq. of pass 2)
    decay = beta * gamma ** np.arange(max_span, dtype=np.float64)
    retok = _retokenize(teacher_tok, [s_bytes[s] for s in pending])
    for s, ids in zip(pending, retok):
        n = len(ids)
        if n == 0:
            counts["no_tokens"] += 1
            continue
        if n > max_span:
            counts["too_long"] += 1
            continue
        row: dict[int, float] = {}
        for t, w in zip(ids, decay[:n]):
            row[t] = row.get(t, 0.0) + float(w)
        # top-k by weight; ties keep the order of appearance (deterministic)
        top = sorted(row.items(), key=lambda kv: -kv[1])[:top_k]
        total = sum(w for _, w in top)
        for j, (t, w) in enumerate(top):
            indices[s, j], weights[s, j] = t, w / total
        kind[s] = MULTI
    counts["no_tokens"] += sum(1 for s in range(n_s) if s >= len(s_bytes))

    meta = {
        "student": getattr(student_tok, "name_or_path", ""), "teacher": getattr(teacher_tok, "name_or_path", ""),
        "student_fingerprint": tokenizer_fingerprint(student_tok),
        "teacher_fingerprint": tokenizer_fingerprint(teacher_tok),
        "max_span": max_span, "beta": beta, "gamma": gamma, "top_k": top_k, "kind": "built", "counts": counts,
    }
    return Projection(torch.from_numpy(indices), torch.from_numpy(weights), torch.from_numpy(kind), n_t, meta,
                      student_tok, teacher_tok)
