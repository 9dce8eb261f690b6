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
used with the wrong tokenizers (`Projection.check_tokenizers`, which the trainer and the losses call
too), and with ``meta["digest"]`` (`Projection.digest`), so `load` refuses a file whose content changed.
`load` validates every file (index range, finite non-negative weights, rows summing to 1 or empty,
row kinds, metadata) and raises `ProjectionFileError` naming the file and the defect.

Columns. W has ``teacher_vocab_size`` columns, the teacher *model's* logit width (Qwen3: 151,936), and
records the teacher tokenizer's size in ``meta["teacher_tokens"]`` (151,669; its id range, i.e. the largest
id + 1 where a vocabulary has holes: Phi-4's 200,010 tokens reach id 200,028): the losses give the columns
from there on (the model's padding) zero probability. `with_teacher_width` re-sizes the columns for a
model of another width. A file written before ``teacher_tokens`` was recorded (the committed
results/W_*.safetensors) still loads: with the teacher tokenizer given, `load` derives it from the
tokenizer; without, it stays unknown (``None``) and no column is treated as padding.

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

__all__ = [
    "Projection",
    "build_projection",
    "ProjectionMismatch",
    "ProjectionFileError",
    "EMPTY",
    "EXACT",
    "SPECIAL",
    "MULTI",
]

EMPTY, EXACT, SPECIAL, MULTI = 0, 1, 2, 3
KIND_NAMES = {EMPTY: "empty", EXACT: "exact", SPECIAL: "special", MULTI: "multi"}
FORMAT_VERSION = 1


class ProjectionMismatch(ValueError):
    """W was built for other tokenizers than the ones it is used with."""


class ProjectionFileError(ValueError):
    """A W file is not a valid projection (not safetensors, foreign, damaged or edited): one defect named."""


ROW_SUM_TOLERANCE = 1e-4  # |sum_t W[s, t] - 1| allowed on a non-empty row of a loaded file (float rounding)


def _token_count(tok) -> int:
    """Ids a tokenizer can produce: ``len(tok)``, or its largest id + 1 if that is larger (vocabularies with holes)."""
    return max(len(token_bytes(tok)), len(tok))


def _tok_name(tok) -> str:
    return getattr(tok, "name_or_path", None) or type(tok).__name__


@dataclass
class Projection:
    indices: torch.Tensor  # [V_S, k] int64, -1 = no entry
    weights: torch.Tensor  # [V_S, k] float32, rows sum to 1 or are all 0
    row_kind: torch.Tensor  # [V_S] uint8: EMPTY / EXACT / SPECIAL / MULTI
    teacher_vocab_size: int  # columns of W (the teacher model's logit width)
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
        coo = torch.sparse_coo_tensor(
            torch.stack([rows, self.indices[keep]]),
            self.weights[keep].to(dtype),
            (self.student_vocab_size, self.teacher_vocab_size),
            check_invariants=True,
        ).coalesce()
        with warnings.catch_warnings():  # "CSR support is in beta": the conversion itself is exact
            warnings.simplefilter("ignore", UserWarning)
            return coo.to_sparse_csr()

    @property
    def teacher_tokens(self) -> int | None:
        """The teacher tokenizer's size: columns from here on are the model's padding (zero probability in the
        losses). None when unknown (a W file written before it was recorded, loaded without the teacher tokenizer)."""
        n = self.meta.get("teacher_tokens")
        return None if n is None else int(n)

    def with_teacher_width(self, n: int) -> "Projection":
        """The same W with ``n`` columns (a teacher model whose logits are ``n`` wide). ``n`` must cover the
        teacher tokenizer (``teacher_tokens``; if unknown, every column W reaches)."""
        n = int(n)
        floor = self.teacher_tokens if self.teacher_tokens is not None else int(self.indices.max()) + 1
        if n < max(floor, 1):
            what = (
                f"the teacher tokenizer's {floor} tokens"
                if self.teacher_tokens is not None
                else f"W's largest teacher id + 1 = {floor}"
            )
            raise ValueError(f"with_teacher_width({n}): the columns must cover {what}")
        return Projection(
            self.indices, self.weights, self.row_kind, n, dict(self.meta), self.student_tok, self.teacher_tok
        )

    def _recorded_fingerprint(self, side: str) -> str | None:
        """The fingerprint W records for ``side``'s tokenizer, or None when W cannot tell: a W restricted without
        the local tokenizers, or one restricted before restricted W recorded them (its fingerprints are then the
        full tokenizers', whose ids the restricted rows and columns no longer use)."""
        if "restricted_from" in self.meta and "restricted_from_teacher" not in self.meta:
            return None
        return self.meta.get(f"{side}_fingerprint")

    def check_tokenizers(self, student_tok=None, teacher_tok=None, *, source=None) -> "Projection":
        """Raise `ProjectionMismatch` unless the tokenizers given are the ones W was built (or restricted) for,
        compared by `xtoken.tokenizers.tokenizer_fingerprint`. A side given as None is not checked; a side whose
        fingerprint W does not record (see `_recorded_fingerprint`) cannot be. Returns W."""
        where = source or f"W ({self.meta.get('student', '?')} -> {self.meta.get('teacher', '?')})"
        for side, tok in (("student", student_tok), ("teacher", teacher_tok)):
            expected = None if tok is None else self._recorded_fingerprint(side)
            if expected is None:
                continue
            actual = tokenizer_fingerprint(tok)
            if actual != expected:
                fix = (
                    "Restrict the full W again with these tokenizers: W.restrict(..., student_tok=..., teacher_tok=...)"
                    if "restricted_from" in self.meta
                    else "Rebuild it: python -m xtoken build-w --student ... --teacher ..."
                )
                raise ProjectionMismatch(
                    f"{where} was built for {side} tokenizer {self.meta.get(side)!r} (fingerprint {expected}), "
                    f"not for {_tok_name(tok)!r} (fingerprint {actual}). {fix}"
                )
        return self

    def _student_id(self, sid) -> int:
        sid = int(sid)
        if not 0 <= sid < self.student_vocab_size:
            raise IndexError(
                f"student id {sid} is out of range: W has rows 0..{self.student_vocab_size - 1} "
                "(negative ids do not count from the end)"
            )
        return sid

    def restrict(self, student_ids, teacher_ids, student_tok=None, teacher_tok=None) -> "Projection":
        """W restricted to a subset of student rows and teacher columns, re-indexed locally.

        Used when a model's output layer covers only some ids (the miniature): row r of the result is
        student id ``student_ids[r]``, column c is teacher id ``teacher_ids[c]``. Entries whose teacher id
        is outside ``teacher_ids`` are dropped and the row renormalized; rows left with nothing are EMPTY
        and counted in ``meta["restricted_lost_rows"]``.

        ``student_tok`` / ``teacher_tok``: the local tokenizers whose ids 0..n-1 are these ids
        (`xtoken.mini.models.restrict_tokenizer`). Their fingerprints become the result's, so
        `check_tokenizers` (the trainer, the losses) can verify the pair; when W holds its full tokenizers,
        each local one must spell its ids as the full one spells ``student_ids`` / ``teacher_ids``. Without
        them the result's fingerprints are unknown (None) and no tokenizer check applies to it. The full
        tokenizers' fingerprints stay in ``meta["restricted_from"]`` / ``meta["restricted_from_teacher"]``.
        ``meta["teacher_tokens"]`` counts the kept columns that are teacher tokens (padded teacher ids may
        only come last).
        """
        s = torch.as_tensor(student_ids, dtype=torch.long).reshape(-1)
        t = torch.as_tensor(teacher_ids, dtype=torch.long).reshape(-1)
        if len(t) == 0:
            raise ValueError("restrict: teacher_ids is empty")
        for name, ids, n in (("student_ids", s, self.student_vocab_size), ("teacher_ids", t, self.teacher_vocab_size)):
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= n):
                bad = ids[(ids < 0) | (ids >= n)][0]
                raise IndexError(f"restrict: {name} holds {int(bad)}, outside W's range 0..{n - 1}")
        if len(torch.unique(t)) != len(t):
            raise ValueError("restrict: teacher_ids has duplicates (each column must map to one teacher id)")
        teacher_tokens = None
        if self.teacher_tokens is not None:
            real = t < self.teacher_tokens
            teacher_tokens = int(real.sum())
            if not bool(real[:teacher_tokens].all()):
                raise ValueError(
                    f"restrict: teacher_ids holds padded ids (>= the teacher tokenizer's "
                    f"{self.teacher_tokens} tokens) before real ones; put them last"
                )
        for side, tok, full, ids in (
            ("student", student_tok, self.student_tok, s),
            ("teacher", teacher_tok, self.teacher_tok, t),
        ):
            if tok is not None and full is not None:
                n = len(ids) if side == "student" else (teacher_tokens if teacher_tokens is not None else len(ids))
                local = tok.convert_ids_to_tokens(list(range(n)))
                if local != full.convert_ids_to_tokens(ids[:n].tolist()):
                    raise ProjectionMismatch(
                        f"restrict: the {side} tokenizer {_tok_name(tok)!r} does not spell ids "
                        f"0..{n - 1} as {_tok_name(full)!r} spells the {side} ids given"
                    )
        col = torch.full((self.teacher_vocab_size,), -1, dtype=torch.long)
        col[t] = torch.arange(len(t))
        idx = self.indices[s]
        local = torch.where(idx >= 0, col[idx.clamp(min=0)], torch.full_like(idx, -1))
        w = torch.where(local >= 0, self.weights[s], torch.zeros_like(self.weights[s]))
        total = w.sum(1, keepdim=True)
        kind = self.row_kind[s].clone()
        lost = (total.squeeze(1) == 0) & (kind != EMPTY)
        kind[total.squeeze(1) == 0] = EMPTY
        w = torch.where(total > 0, w / total.clamp(min=1e-30), w)
        full_s, full_t = self._recorded_fingerprint("student"), self._recorded_fingerprint("teacher")
        meta = dict(
            self.meta,
            restricted_from=full_s,
            restricted_from_teacher=full_t,
            restricted_lost_rows=int(lost.sum()),
            student_fingerprint=None if student_tok is None else tokenizer_fingerprint(student_tok),
            teacher_fingerprint=None if teacher_tok is None else tokenizer_fingerprint(teacher_tok),
        )
        meta.pop("digest", None)
        if teacher_tokens is not None:
            meta["teacher_tokens"] = teacher_tokens
        if student_tok is not None:
            meta["student"] = _tok_name(student_tok)
        if teacher_tok is not None:
            meta["teacher"] = _tok_name(teacher_tok)
        return Projection(local, w, kind, len(t), meta, student_tok, teacher_tok)

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
            sid = self._student_id(token)
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
        return {
            "rows": self.student_vocab_size,
            "columns": self.teacher_vocab_size,
            **n,
            "multi_rows_by_length": hist,
            "empty_by_reason": self.meta.get("counts", {}),
        }

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path, extra: dict | None = None) -> Path:
        """Write safetensors (indices int32, weights, row_kind, + ``extra`` tensors) with the meta as JSON,
        ``meta["digest"]`` being this W's `digest` (checked by `load`)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "xtoken_projection": json.dumps(
                dict(
                    self.meta,
                    format_version=FORMAT_VERSION,
                    digest=self.digest(),
                    teacher_vocab_size=self.teacher_vocab_size,
                ),
                sort_keys=True,
            )
        }
        tensors = {
            "indices": self.indices.to(torch.int32).contiguous(),
            "weights": self.weights.contiguous(),
            "row_kind": self.row_kind.contiguous(),
        }
        tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path, student_tok=None, teacher_tok=None) -> "Projection":
        """Read a W file; with tokenizers given, refuse it unless they are the ones it was built for
        (`ProjectionMismatch`). Every file is validated first (`ProjectionFileError`, one defect named):
        safetensors with this package's metadata, consistent shapes, teacher ids in range, finite non-negative
        weights, each row summing to 1 (or empty, with its kind EMPTY), and the content digest when the file
        records one (files written before digests were recorded load without that check)."""
        meta, tensors = _read_file(path)
        _validate(path, meta, tensors)
        tvs = meta.pop("teacher_vocab_size")
        meta.pop("digest", None)
        w = cls(tensors["indices"].long(), tensors["weights"], tensors["row_kind"], tvs, meta, student_tok, teacher_tok)
        w.check_tokenizers(student_tok, teacher_tok, source=str(path))
        if w.teacher_tokens is None and teacher_tok is not None:  # a file from before teacher_tokens
            w.meta["teacher_tokens"] = min(_token_count(teacher_tok), tvs)
        return w


def _read_file(path) -> tuple[dict, dict]:
    """(meta, the three W tensors) of a W file, or `ProjectionFileError`."""
    from safetensors import safe_open

    err = lambda what: ProjectionFileError(f"{path}: {what}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("xtoken_projection")
            names = set(f.keys())
            if raw is None:
                raise err("no X-Token projection metadata: not a W file written by Projection.save")
            missing = sorted({"indices", "weights", "row_kind"} - names)
            if missing:
                raise err(f"tensor(s) {missing} missing")
            tensors = {k: f.get_tensor(k) for k in ("indices", "weights", "row_kind")}
    except ProjectionFileError:
        raise
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' own errors: not a valid file
        raise err(f"not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise err(f"projection metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise err("projection metadata is not a JSON object")
    return meta, tensors


def _validate(path, meta: dict, tensors: dict) -> None:
    """Raise `ProjectionFileError` at the first defect of a W file's content (see `Projection.load`)."""
    err = lambda what: ProjectionFileError(f"{path}: {what}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise err(f"format_version {version!r} missing or invalid")
    if version > FORMAT_VERSION:
        raise err(f"format_version {version} is newer than this package reads ({FORMAT_VERSION}): update xtoken")
    tvs = meta.get("teacher_vocab_size")
    if not isinstance(tvs, int) or isinstance(tvs, bool) or tvs < 1:
        raise err(f"teacher_vocab_size {tvs!r} missing or invalid")
    idx, w, kind = tensors["indices"], tensors["weights"], tensors["row_kind"]
    if idx.dim() != 2 or tuple(w.shape) != tuple(idx.shape) or tuple(kind.shape) != (idx.shape[0],):
        raise err(
            f"inconsistent shapes: indices {tuple(idx.shape)}, weights {tuple(w.shape)}, "
            f"row_kind {tuple(kind.shape)} (need [V_S, k], [V_S, k], [V_S])"
        )
    if idx.dtype not in (torch.int32, torch.int64) or not w.dtype.is_floating_point or kind.dtype != torch.uint8:
        raise err(f"unexpected dtypes: indices {idx.dtype}, weights {w.dtype}, row_kind {kind.dtype}")
    tt = meta.get("teacher_tokens")
    if tt is not None and (not isinstance(tt, int) or isinstance(tt, bool) or not 1 <= tt <= tvs):
        raise err(f"teacher_tokens {tt!r} invalid (need 1..teacher_vocab_size = {tvs})")
    hi = tvs if tt is None else tt
    bad = (idx < -1) | (idx >= hi)
    if bool(bad.any()):
        r, c = (int(x) for x in bad.nonzero()[0])
        raise err(f"teacher index {int(idx[r, c])} at row {r} is outside -1 (no entry) and 0..{hi - 1}")
    if not bool(torch.isfinite(w).all()):
        r, c = (int(x) for x in (~torch.isfinite(w)).nonzero()[0])
        raise err(f"weight {float(w[r, c])} at row {r} is not finite")
    if bool((w < 0).any()):
        r, c = (int(x) for x in (w < 0).nonzero()[0])
        raise err(f"weight {float(w[r, c])} at row {r} is negative")
    if bool(((idx < 0) & (w != 0)).any()):
        r = int(((idx < 0) & (w != 0)).nonzero()[0, 0])
        raise err(f"row {r} has a non-zero weight on an empty entry (index -1)")
    if bool((kind > MULTI).any()):
        r = int((kind > MULTI).nonzero()[0, 0])
        raise err(f"row {r} has an unknown row kind {int(kind[r])}")
    sums = w.double().sum(1)
    empty = sums == 0
    off = ~empty & ((sums - 1).abs() > ROW_SUM_TOLERANCE)
    if bool(off.any()):
        r = int(off.nonzero()[0, 0])
        raise err(f"row {r} sums to {float(sums[r]):.6g}, not 1 (or 0 for an empty row)")
    if not torch.equal(empty, kind == EMPTY):
        r = int((empty != (kind == EMPTY)).nonzero()[0, 0])
        raise err(
            f"row {r} is {'empty' if bool(empty[r]) else 'not empty'} but its row kind is {KIND_NAMES[int(kind[r])]}"
        )
    digest = meta.get("digest")
    if digest is not None:
        actual = Projection(idx.long(), w, kind, tvs).digest()
        if actual != digest:
            raise err(f"content digest {actual} differs from the recorded {digest}: the file was altered or damaged")


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


def build_projection(
    student_tok,
    teacher_tok,
    *,
    max_span: int = 4,
    beta: float = 0.9,
    gamma: float = 0.1,
    top_k: int = 4,
    progress: bool = False,
    teacher_vocab_size: int | None = None,
) -> Projection:
    """Build W for any pair of HF tokenizers (byte-level BPE or SentencePiece with byte fallback).

    ``teacher_vocab_size``: W's columns, the teacher model's logit width (default
    `xtoken.tokenizers.model_vocab_size`: the paper models' padded widths, else the tokenizer's size); it
    must cover the teacher tokenizer. The tokenizer's size (id range) is recorded as ``meta["teacher_tokens"]``.
    Deterministic: the same tokenizers and arguments give a bit-identical `save` file.
    """
    if not (0 < gamma < 1 and beta > 0 and top_k >= 1 and max_span >= 1):
        raise ValueError(
            f"need beta > 0, 0 < gamma < 1, top_k >= 1, max_span >= 1; got {beta=}, {gamma=}, {top_k=}, {max_span=}"
        )
    s_bytes = token_bytes(student_tok)
    t_bytes = token_bytes(teacher_tok)
    n_s = max(len(s_bytes), len(student_tok))
    n_tokens = _token_count(teacher_tok)
    n_t = model_vocab_size(teacher_tok) if teacher_vocab_size is None else int(teacher_vocab_size)
    if n_t < n_tokens:
        raise ValueError(
            f"teacher_vocab_size={n_t} is smaller than the teacher tokenizer ({n_tokens} ids): "
            "W's columns are the teacher model's logits, which cover every token"
        )

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
        "student": getattr(student_tok, "name_or_path", ""),
        "teacher": getattr(teacher_tok, "name_or_path", ""),
        "student_fingerprint": tokenizer_fingerprint(student_tok),
        "teacher_fingerprint": tokenizer_fingerprint(teacher_tok),
        "max_span": max_span,
        "beta": beta,
        "gamma": gamma,
        "top_k": top_k,
        "kind": "built",
        "counts": counts,
        "teacher_tokens": n_tokens,
    }
    tensors = (torch.from_numpy(indices), torch.from_numpy(weights), torch.from_numpy(kind))
    return Projection(*tensors, n_t, meta, student_tok, teacher_tok)
