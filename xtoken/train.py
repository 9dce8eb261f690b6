"""Training: distil one or more teachers into a student with the Hugging Face `Trainer`.

Read top to bottom:

    XTokenConfig      TrainingArguments + the distillation knobs (temperature, weights, scaling)
    Teacher           a frozen teacher: model, tokenizer, loss name, projection W, weight
    TeacherCache      a teacher's log-probabilities over a fixed dataset, computed once (optional)
    DistillCollator   text rows -> student ids/labels + each teacher's ids and chunk alignments
    teacher_kd_loss   the ONE place that calls xtoken.losses (dispatch on Teacher.loss)
    XTokenTrainer     Trainer whose compute_loss is  ce_weight * CE + kd_weight * scale * KD
    LossCurveCallback writes loss_curve.png at the end of training

Everything else (optimizer, schedule, gradient accumulation, mixed precision, checkpoints and
resume, DDP/FSDP) is the Hugging Face Trainer's and Accelerate's own machinery, untouched.
Teachers are plain attributes of the trainer, never of the model: they are not in the optimizer
and not in checkpoints.

Learned W (``learn_projection=True``): each P-KL teacher's W becomes a
`xtoken.projection.LearnableProjection` (fixed pattern, softmax rows). Its parameters are a separate
optimizer group with their own learning rate (no weight decay, not clipped with the model), get
their gradient only from P-KL, are averaged over DDP ranks before each optimizer step, and are
saved next to every checkpoint as ``learned_W_<teacher>.safetensors`` (the W file format, kind
"learned"); resume restores them.

One step, per micro-batch:

    student logits  = student(input_ids)                                   (one forward, with grad)
    CE              = cross-entropy of the student on its own next tokens  (labels, pad = -100)
    for teacher m:  teacher log-probs = teacher(teacher ids) under no_grad, or rows of its cache
                    KD_m = teacher_kd_loss(m, ...)   (kl | gold | p_kl | h_kl | uld)
    KD              = sum_m alpha_m KD_m   (alpha: static weights or confidence-adaptive)
    loss            = ce_weight * CE + kd_weight * KD * stopgrad(CE / KD)  if dynamic_kd_scale
                      ce_weight * CE + kd_weight * KD                       otherwise
"""
from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

__all__ = ["XTokenConfig", "Teacher", "TeacherCache", "DistillCollator", "XTokenTrainer",
           "LossCurveCallback", "NonFiniteError", "teacher_kd_loss", "LOSSES", "WEIGHTINGS"]

logger = logging.getLogger(__name__)

LOSSES = ("kl", "gold", "p_kl", "h_kl", "uld")
WEIGHTINGS = ("static", "ce", "entropy", "max_prob")
NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteError(RuntimeError):
    """Training stopped: a teacher's logits or the training loss were not finite (see
    ``XTokenConfig.nonfinite_teacher``)."""


class _NonFiniteTeacher(Exception):
    """Internal: a teacher's logits are not finite at a used position (args: the message)."""


# ---- configuration ------------------------------------------------------------------------------

@dataclass
class XTokenConfig(TrainingArguments):
    """`transformers.TrainingArguments` plus the distillation settings.

    Defaults changed from TrainingArguments: ``report_to="none"``, ``remove_unused_columns=False``
    (the collator needs the ``text`` and ``idx`` columns), ``logging_steps=10``, progress bars on.
    """
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both sides in KD"})
    kd_weight: float = field(default=1.0, metadata={"help": "weight of the (aggregated) KD term"})
    ce_weight: float = field(default=1.0, metadata={"help": "weight of the student's own CE term"})
    dynamic_kd_scale: bool = field(default=True, metadata={
        "help": "rescale KD to CE's magnitude each step: KD * stopgrad(CE / KD) (the paper's default). "
                "Beware: when KD becomes tiny its gradient is multiplied by CE/KD (~100x in the miniature "
                "trial) and can swamp CE; False gives the static ce_weight * CE + kd_weight * KD."})
    teacher_weighting: str = field(default="static", metadata={
        "help": "multi-teacher weights: static (Teacher.weight) | ce | entropy | max_prob (confidence-adaptive)"})
    weighting_per: str = field(default="batch", metadata={"help": "adaptive weights per batch or per sample"})
    max_length: int = field(default=512, metadata={"help": "student tokens per sample (teachers see the same text)"})
    loss_chunk_size: int | None = field(default=None, metadata={
        "help": "block size of the loss computations: positions per block for CE and kl, chunk pairs per block "
                "for the cross-tokenizer losses. Smaller saves memory at large vocabularies, larger is faster at "
                "small ones. None: CE in one piece, the losses' own defaults (blocks sized by a fixed element budget: "
                "64 chunks at 151,936 columns, all of a mini batch at the miniature's ~1,000-id vocabularies)"})
    loss_curve: bool = field(default=True, metadata={"help": "save output_dir/loss_curve.png at the end of training"})
    learn_projection: bool = field(default=False, metadata={
        "help": "fine-tune each P-KL teacher's W with the student (fixed pattern, softmax rows; the paper's option)"})
    projection_learning_rate: float = field(default=1e-2, metadata={
        "help": "learning rate of the learned W's row parameters (same schedule as the model's)"})
    nonfinite_teacher: str = field(default="raise", metadata={
        "choices": list(NONFINITE_POLICIES),
        "help": "teacher logits (or cached log-probs) with NaN, +inf or an all -inf row at a position the loss "
                "reads (a real token under the attention mask): 'raise' stops training with an error naming the "
                "teacher, step, batch row and position; 'skip' drops that optimizer step (no update from any of its "
                "micro-batches; same decision on every DDP rank) and counts it as 'skipped_steps' in the logs. "
                "A non-finite loss of the student itself always stops training."})
    # changed defaults
    report_to: Any = field(default="none", metadata={"help": "integrations to report to (default none)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep text/idx columns for the collator"})
    logging_steps: float = field(default=10, metadata={"help": "log every N steps"})
    disable_tqdm: bool | None = field(default=False, metadata={"help": "progress bars on by default"})

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_weighting not in WEIGHTINGS:
            raise ValueError(f"teacher_weighting must be one of {WEIGHTINGS}, not {self.teacher_weighting!r}")
        if self.weighting_per not in ("batch", "sample"):
            raise ValueError(f"weighting_per must be 'batch' or 'sample', not {self.weighting_per!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, not {self.temperature!r}")
        for name in ("kd_weight", "ce_weight", "projection_learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, not {value!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, not {self.max_length!r}")
        if self.loss_chunk_size is not None and (isinstance(self.loss_chunk_size, bool) or
                                                 not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 1):
            raise ValueError(f"loss_chunk_size must be None or an integer >= 1, not {self.loss_chunk_size!r}")
        if self.nonfinite_teacher not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_teacher must be one of {NONFINITE_POLICIES}, not {self.nonfinite_teacher!r}")


# ---- teachers -----------------------------------------------------------------------------------

@dataclass
class Teacher:
    """A frozen teacher.

    ``projection``: W in the two models' own id spaces (rows = student logits, columns = teacher
    logits), required for every loss except ``kl``; ``kl`` needs a teacher that shares the student's
    tokenizer. ``cache``: optional `TeacherCache`; when set, the teacher model is never run in training.
    """
    name: str
    model: Any
    tokenizer: Any
    loss: str = "kl"
    projection: Any = None
    weight: float = 1.0
    cache: "TeacherCache | None" = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"Teacher {self.name!r}: loss must be one of {LOSSES}, not {self.loss!r}")
        if self.loss != "kl" and self.projection is None:
            raise ValueError(f"Teacher {self.name!r}: loss {self.loss!r} needs a projection W")
        if self.projection is not None and hasattr(self.projection, "check_tokenizers"):
            self.projection.check_tokenizers(None, self.tokenizer, source=f"W of teacher {self.name!r}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"Teacher {self.name!r}: weight must be finite and >= 0, not {self.weight!r}")


# ---- data ---------------------------------------------------------------------------------------

def _encode(tok, texts: list[str], max_length: int, offsets: bool = False):
    """Tokenize without padding (lists of ids), truncated to max_length tokens.

    Corpus text is text: a special-token string in it (``<|endoftext|>``, ``<|im_end|>``) is spelled with
    ordinary tokens (``split_special_tokens=True``), never turned into the control token; the specials
    the tokenizer adds by itself (Llama's BOS) stay."""
    return tok(texts, truncation=True, max_length=max_length, add_special_tokens=True, split_special_tokens=True,
               return_offsets_mapping=offsets, return_attention_mask=False)


_SURROGATE = re.compile("[\ud800-\udfff]")
_NORMAL_FORM = re.compile(r'"type"\s*:\s*"(NFKC|NFKD|NFC|NFD)"')


def normal_forms(tok) -> set[str]:
    """The Unicode normal forms (NFC, NFKC, NFD, NFKD) the tokenizer's own normalizer applies to text."""
    norm = getattr(getattr(tok, "backend_tokenizer", None), "normalizer", None)
    if norm is None:
        return set()
    try:
        spec = norm.__getstate__()
    except Exception:   # a normalizer that cannot describe itself: assume none
        return set()
    return set(_NORMAL_FORM.findall(spec.decode() if isinstance(spec, bytes) else str(spec)))


def _pick_form(forms: set[str]) -> str | None:
    """One form that satisfies every normalizer in ``forms``: a compatibility form (NFKC/NFKD) covers its
    canonical one (NFKC text is NFC text). Composed and decomposed forms together cannot both hold: the
    composed one is used and a warning says so."""
    composed, decomposed = forms & {"NFKC", "NFC"}, forms & {"NFKD", "NFD"}
    if composed and decomposed:
        logger.warning("the tokenizers normalize text to %s: no one form suits all; using %s",
                       sorted(forms), "NFKC" if "NFKC" in composed else "NFC")
    for form in ("NFKC", "NFC", "NFKD", "NFD"):
        if form in forms:
            return form
    return None


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to [B, L] with an attention mask."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


class DistillCollator:
    """Dataset rows with a ``text`` column (and optionally ``idx``) -> a training batch.

    The student tokenizes each text, truncated to ``max_length`` tokens; the text is then cut at the
    end of the student's last token, so every teacher sees exactly the same text (a teacher's own
    tokenization is truncated to ``teacher_max_length``, default 2 x max_length). Chunk alignments
    (`xtoken.align.align_batch`) are computed here, so with ``dataloader_num_workers > 0`` they
    overlap the training step. Cached teacher log-probabilities (``Teacher.cache``) are looked up here
    by ``idx`` too. ``memo``: an `xtoken.align.AlignmentMemo` that keeps every row's tokenizations and
    alignments for the next time the same text comes by (epochs, or many runs over one corpus in one
    process); batches are identical with or without it.

    Text is prepared before any tokenizer sees it, the same way for the student and every teacher
    (`prepare_texts`), so chunk pairs pair the same characters:

    - undecodable text: a lone UTF-16 surrogate (``"abc\\ud800def"``, from a broken JSON escape or a
      bad decode) has no UTF-8 form and crashes a tokenizer. Surrogate pairs split into two code
      units are joined into their character; a lone surrogate becomes U+FFFD (the replacement
      character). Each repaired row is logged (a warning naming the row: its ``idx``, else its place
      in the batch) and counted in ``repaired_rows``.
    - Unicode normal form (``normalize="auto"``): when a tokenizer's own normalizer rewrites text
      (Qwen3: NFC), the text is brought to that form first for every side; otherwise a decomposed
      (NFD) text reaches the student as written and the teacher composed, and their bytes disagree at
      every accent (160 of 282 student tokens unpaired in a German NFD sample). The form used is
      ``normal_form`` (None: no tokenizer normalizes, the text is left as written); pass
      ``normalize=None`` to switch this off or a form ("NFC", ...) to force one. Text already in the
      form (all ASCII text, the miniature's corpus) is untouched.
    - special-token strings in the text stay text (see `_encode`).

    Empty texts are kept: they give rows without targets (zero loss, no NaN).

    Batch layout::

        input_ids, attention_mask, labels   [B, L] student (labels: ids, padding -> -100)
        idx                                 [B] dataset row indices (when rows have ``idx``)
        teachers: {name: {input_ids, attention_mask [B, L_m], alignments: list[Alignment] | None,
                          logprobs [B, L_m, V_m] float16 (only with a cache)}}
    """

    def __init__(self, student_tokenizer, teachers: list[Teacher], max_length: int = 512,
                 teacher_max_length: int | None = None, memo=None, normalize: str | None = "auto"):
        self.student_tokenizer = student_tokenizer
        self.memo = memo
        self.teachers = list(teachers)
        self.max_length = max_length
        self.teacher_max_length = teacher_max_length or 2 * max_length
        if normalize == "auto":
            forms = normal_forms(student_tokenizer)
            for t in self.teachers:
                forms |= normal_forms(t.tokenizer)
            normalize = _pick_form(forms)
        if normalize not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"normalize must be 'auto', None, 'NFC', 'NFKC', 'NFD' or 'NFKD', not {normalize!r}")
        self.normal_form = normalize
        self.repaired_rows = 0
        for t in self.teachers:   # 'kl' compares positions 1:1, so it reuses the student's ids
            if t.loss == "kl" and t.tokenizer is not student_tokenizer:
                from .tokenizers import tokenizer_fingerprint
                if tokenizer_fingerprint(t.tokenizer) != tokenizer_fingerprint(student_tokenizer):
                    raise ValueError(f"teacher {t.name!r} uses loss 'kl' but its tokenizer is not the student's; "
                                     "use a cross-tokenizer loss (p_kl, h_kl, gold, uld) with a projection")
            if t.loss != "kl" and hasattr(t.projection, "check_tokenizers"):
                t.projection.check_tokenizers(student_tokenizer, t.tokenizer, source=f"W of teacher {t.name!r}")

    def prepare_texts(self, texts: list[str], names: list | None = None) -> list[str]:
        """The texts every side tokenizes: surrogates repaired, brought to ``normal_form`` (see the class
        docstring). ``names``: how warnings name each row (default: its place in ``texts``)."""
        out = list(texts)
        for i, text in enumerate(out):
            if not isinstance(text, str):
                raise TypeError(f"row {names[i] if names else i}: text must be a str, not {type(text).__name__}")
            if text.isascii():                       # the common case: nothing to repair or normalize
                continue
            if _SURROGATE.search(text):
                n = len(_SURROGATE.findall(text))
                text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
                self.repaired_rows += 1
                logger.warning("row %s: %d UTF-16 surrogate code unit(s) in the text; pairs joined, lone ones "
                               "replaced by U+FFFD (%d row(s) repaired so far)",
                               names[i] if names else i, n, self.repaired_rows)
            if self.normal_form and not unicodedata.is_normalized(self.normal_form, text):
                text = unicodedata.normalize(self.normal_form, text)
            out[i] = text
        return out

    def tokenize(self, texts: list[str], names: list | None = None) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
        """Student ids and each teacher's ids of the same (prepared, student-truncated) texts, unpadded."""
        texts = self.prepare_texts(texts, names)
        pairs = self._memoized(("student", self.student_tokenizer, self.max_length), texts, self._student_ids)
        student, cut = [p[0] for p in pairs], [p[1] for p in pairs]
        teachers = {}
        for t in self.teachers:
            if t.loss == "kl" or t.tokenizer is self.student_tokenizer:
                teachers[t.name] = student
            else:
                teachers[t.name] = self._memoized(("teacher", t.tokenizer, self.teacher_max_length), cut,
                                                  lambda xs, tok=t.tokenizer: _encode(tok, xs, self.teacher_max_length)["input_ids"])
        return student, teachers

    def _student_ids(self, texts: list[str]) -> list[tuple[list[int], str]]:
        """(ids, text cut at the end of the last kept token) per text."""
        enc = _encode(self.student_tokenizer, texts, self.max_length, offsets=True)
        return [(ids, text[:max((e for _, e in offs), default=0)])
                for ids, text, offs in zip(enc["input_ids"], texts, enc["offset_mapping"])]

    def _memoized(self, what: tuple, texts: list[str], encode) -> list:
        """encode(texts), reading rows seen before from ``self.memo`` (the misses are encoded in one call).
        Keys hold the tokenizer's id; values keep the tokenizer alive, so an id is never reused meanwhile."""
        if self.memo is None:
            return encode(texts)
        kind, tok, length = what
        keys = [("tokens", kind, id(tok), length, x) for x in texts]
        out = [self.memo.get(k) for k in keys]
        miss = [i for i, v in enumerate(out) if v is None]
        if miss:
            for i, v in zip(miss, encode([texts[i] for i in miss])):
                out[i] = (v, tok)
                self.memo.put(keys[i], out[i])
        return [v[0] for v in out]

    def __call__(self, rows: list[dict]) -> dict:
        from .align import align_batch

        texts = [r["text"] for r in rows]
        names = [f"idx {r['idx']}" if "idx" in r else f"{i} of the batch" for i, r in enumerate(rows)]
        student, per_teacher = self.tokenize(texts, names)
        ids, mask = _pad(student, _pad_id(self.student_tokenizer))
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        if rows and "idx" in rows[0]:
            batch["idx"] = torch.tensor([int(r["idx"]) for r in rows], dtype=torch.long)
        batch["teachers"] = {}
        for t in self.teachers:
            t_ids, t_mask = _pad(per_teacher[t.name], _pad_id(t.tokenizer))
            entry = {"input_ids": t_ids, "attention_mask": t_mask, "alignments": None}
            if t.loss != "kl":
                entry["alignments"] = align_batch(ids, t_ids, self.student_tokenizer, t.tokenizer,
                                                  student_mask=mask, teacher_mask=t_mask, memo=self.memo)
            if t.cache is not None:
                if "idx" not in batch:
                    raise KeyError(f"teacher {t.name!r} has a cache: dataset rows need an 'idx' column")
                entry["logprobs"] = t.cache.rows(batch["idx"], t_ids.shape[1], per_teacher[t.name])
            batch["teachers"][t.name] = entry
        return batch


# ---- teacher cache ------------------------------------------------------------------------------

class TeacherCache:
    """One teacher's log-probabilities (float16) over every row of a fixed dataset.

    Built once per (teacher, dataset, max_length) with `TeacherCache.build`, which tokenizes with the
    very collator used in training, so cached rows line up with the live teacher's positions. Storage
    is ragged: ``data`` [total tokens, V] (a torch tensor, or a memory-mapped ``.npy`` when ``path`` is
    given) and ``offsets`` [N + 1]; row i is ``data[offsets[i]:offsets[i+1]]``. The teacher token ids
    of every row are kept too (``ids`` [total tokens]), and `rows` refuses a batch whose teacher ids
    differ (another dataset, tokenizer or max_length). Passing log-probs to a loss in place of
    logits is exact: log_softmax(log p / T) = log_softmax(z / T) for any T.
    """

    def __init__(self, data, offsets: np.ndarray, ids: np.ndarray, meta: dict | None = None):
        self.data = data
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.meta = meta or {}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def vocab_size(self) -> int:
        return int(self.data.shape[1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def build(cls, teacher: Teacher, dataset, collator: DistillCollator, *, batch_size: int = 32,
              device: str | torch.device = "cpu", path: str | Path | None = None,
              progress: bool = False) -> "TeacherCache":
        """Run ``teacher.model`` once over ``dataset`` (rows in order; row i must have idx == i)."""
        model = teacher.model.to(device).eval()
        texts = list(dataset["text"])
        if "idx" in dataset.column_names and list(dataset["idx"]) != list(range(len(texts))):
            raise ValueError("TeacherCache.build needs dataset['idx'] == 0..N-1 (add it with add_column)")
        rows = []
        for start in range(0, len(texts), batch_size):
            _, per_teacher = collator.tokenize(texts[start:start + batch_size],
                                               [f"idx {i}" for i in range(start, min(start + batch_size, len(texts)))])
            rows.extend(per_teacher[teacher.name])
        lens = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        flat_ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
        vocab = None
        data = None
        iterator = range(0, len(rows), batch_size)
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(iterator, desc=f"caching {teacher.name}")
        with torch.no_grad():
            for start in iterator:
                chunk = rows[start:start + batch_size]
                ids, mask = _pad(chunk, _pad_id(teacher.tokenizer))
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                logp = torch.log_softmax(logits.float(), dim=-1).to(torch.float16).cpu()
                if data is None:
                    vocab = logp.shape[-1]
                    if path is not None:
                        data = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float16,
                                                         shape=(int(offsets[-1]), vocab))
                    else:
                        data = torch.empty((int(offsets[-1]), vocab), dtype=torch.float16)
                for j, r in enumerate(chunk):
                    a, b = offsets[start + j], offsets[start + j + 1]
                    if isinstance(data, np.ndarray):
                        data[a:b] = logp[j, :len(r)].numpy()
                    else:
                        data[a:b] = logp[j, :len(r)]
        if path is not None:
            data.flush()
            np.save(str(path) + ".offsets.npy", offsets)
            np.save(str(path) + ".ids.npy", flat_ids)
            data = np.load(str(path), mmap_mode="r")
        meta = {"teacher": teacher.name, "rows": len(rows), "max_length": collator.max_length}
        return cls(data, offsets, flat_ids, meta)

    @classmethod
    def load(cls, path) -> "TeacherCache":
        """Reopen a cache built with ``path=`` (memory-mapped, read-only)."""
        return cls(np.load(str(path), mmap_mode="r"), np.load(str(path) + ".offsets.npy"),
                   np.load(str(path) + ".ids.npy"))

    def rows(self, idx: torch.Tensor, width: int, teacher_ids: list[list[int]] | None = None) -> torch.Tensor:
        """Rows ``idx`` right-padded to [B, width, V] float16 (padding = 0, masked by the caller).

        ``teacher_ids``: the collator's unpadded teacher ids of the batch, checked against the cache."""
        out = torch.zeros((len(idx), width, self.vocab_size), dtype=torch.float16)
        for j, i in enumerate(idx.tolist()):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            if teacher_ids is not None and not np.array_equal(self.ids[a:b], teacher_ids[j]):
                raise ValueError(f"cache row {i} holds other teacher tokens than the collator made ({b - a} cached, "
                                 f"{len(teacher_ids[j])} now): the cache was built for another dataset, tokenizer "
                                 "or max_length")
            block = self.data[a:b]
            out[j, :b - a] = torch.from_numpy(np.array(block)) if isinstance(block, np.ndarray) else block
        return out


# ---- losses: the one dispatch -------------------------------------------------------------------

def teacher_kd_loss(teacher: Teacher, student_logits: torch.Tensor, student_mask: torch.Tensor,
                    teacher_logits: torch.Tensor, teacher_mask: torch.Tensor, alignments,
                    temperature: float = 1.0, chunk_size: int | None = None,
                    projection_weights: torch.Tensor | None = None, metrics: bool = True) -> tuple[torch.Tensor, dict]:
    """KD loss of one teacher on one batch; the only place that knows `xtoken.losses`' signatures.

    ``student_logits`` [B, L, V_S] with grad; ``teacher_logits`` [B, L_m, V_m] (logits, or cached
    log-probs: the same after log_softmax), no grad; ``alignments`` from the collator (None for kl);
    ``projection_weights``: a learned W's current weights (P-KL only); ``metrics=False``: the loss's
    diagnostic metrics are skipped (only loss and counts).
    Returns (scalar loss, metrics dict of floats).
    """
    from . import losses

    # like HF's own causal-LM loss: the loss math runs in float32 whatever the models' dtype (bf16 / fp16
    # logits lose the small probabilities KD compares; teacher and student may also differ in dtype)
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    kw = {"temperature": temperature, "metrics": metrics}
    if chunk_size:
        kw["chunk_size"] = chunk_size
    if teacher.loss == "kl":
        if teacher_logits.shape[1] != student_logits.shape[1]:
            raise ValueError(f"teacher {teacher.name!r} uses loss 'kl' but its sequence length differs from the "
                             "student's: 'kl' needs the student's tokenizer")
        mask = (student_mask.bool() & teacher_mask.bool()).to(student_logits.device)
        return losses.kl_loss(student_logits, teacher_logits, mask, **kw)
    if alignments is None:
        raise ValueError(f"teacher {teacher.name!r}: loss {teacher.loss!r} needs chunk alignments from the collator")
    if teacher.loss == "uld":
        return losses.uld_loss(student_logits, teacher_logits, alignments, **kw)
    if projection_weights is not None:
        if teacher.loss != "p_kl":
            raise ValueError(f"teacher {teacher.name!r}: a learned W is a P-KL option, not {teacher.loss!r}")
        kw["weights"] = projection_weights
    fn = {"p_kl": losses.p_kl_loss, "h_kl": losses.h_kl_loss, "gold": losses.gold_loss}[teacher.loss]
    return fn(student_logits, teacher_logits, alignments, teacher.projection, **kw)


# ---- the trainer --------------------------------------------------------------------------------

class XTokenTrainer(Trainer):
    """`transformers.Trainer` for X-Token distillation.

    Use like Trainer, plus ``teachers``::

        trainer = XTokenTrainer(model=student, args=XTokenConfig(...), teachers=[Teacher(...)],
                                train_dataset=ds, processing_class=student_tokenizer)
        trainer.train()

    ``data_collator`` defaults to ``DistillCollator(processing_class, teachers, args.max_length)``.
    With no teachers it trains on CE alone (the continued-pre-training baseline).

    With fixed data and frozen teachers, run each teacher once and reuse its outputs::

        ds = ds.add_column("idx", list(range(len(ds))))          # rows addressed by index
        col = DistillCollator(student_tok, [teacher], max_length)
        teacher.cache = TeacherCache.build(teacher, ds, col, path="cache/qwen.npy")   # or .load(path)
        XTokenTrainer(..., teachers=[teacher], train_dataset=ds.select(subset)).train()

    Logged at each logging step (means since the last one, over ranks): ``ce``, ``kd``, ``kd_scale``
    (dynamic scaling; from the micro-batches with KD > 0 only), ``kd_<teacher>``, ``alpha_<teacher>``
    (adaptive weights), ``<teacher>/unpaired_share`` (share of the student's tokens in no chunk pair with
    that teacher: text the two sides spell differently); and every metric the loss returns as
    ``<teacher>/<name>`` (common mass, top-1 agreement, mass lost on empty W rows, ...), computed on the
    micro-batches of the logged step only (they cost a pass over the logits).

    Bad input (training only): teacher logits that are NaN, +inf or all -inf at a position the loss
    reads raise `NonFiniteError` naming teacher, step, batch row and position, or with
    ``nonfinite_teacher="skip"`` drop that optimizer step (``skipped_steps`` in the logs); a non-finite
    training loss always raises. Under DDP every rank takes the same decision.
    """

    def __init__(self, model=None, args: XTokenConfig | None = None, teachers: list[Teacher] | None = None,
                 data_collator=None, processing_class=None, callbacks=None, **kwargs):
        if args is None:
            args = XTokenConfig(output_dir="xtoken_out")
        if args.remove_unused_columns:
            raise ValueError("XTokenTrainer needs remove_unused_columns=False: the collator reads the raw 'text' "
                             "(and 'idx') columns, which the student's forward signature does not name")
        self.teachers = list(teachers or [])
        if len({t.name for t in self.teachers}) != len(self.teachers):
            raise ValueError("teacher names must be unique")
        if self.teachers and args.teacher_weighting == "static" and not sum(t.weight for t in self.teachers) > 0:
            raise ValueError("static teacher weighting needs a teacher with weight > 0 (Teacher.weight: "
                             f"{[t.weight for t in self.teachers]})")
        if data_collator is None:
            if processing_class is None:
                raise ValueError("pass processing_class (the student tokenizer) or a data_collator")
            data_collator = DistillCollator(processing_class, self.teachers, args.max_length)
        callbacks = list(callbacks or [])
        if getattr(args, "loss_curve", False):
            callbacks.append(LossCurveCallback())
        callbacks.append(_DropSkippedStep(self))
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class,
                         callbacks=callbacks, **kwargs)
        # our compute_loss returns per-micro-batch means; Trainer then divides by the accumulation steps
        self.model_accepts_loss_kwargs = False
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        for t in self.teachers:
            if t.cache is None:
                if t.model is None:
                    raise ValueError(f"teacher {t.name!r} has neither a model nor a cache")
                t.model.to(self.args.device)
                if dtype is not None:
                    t.model.to(dtype)
                t.model.eval()
                t.model.requires_grad_(False)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        # non-finite input (nonfinite_teacher="skip"): the optimizer step being dropped, how many were, and the
        # micro-batch losses and metrics of the current step (held back until it is known not to be dropped)
        self.skipped_steps = 0
        self._skip_at = -1
        self._skipped_since_log = 0
        self._last_log_step = 0
        self._step_loss_at, self._step_loss = -1, None
        self._pending_at, self._pending = -1, []
        self.learned_projections: dict[str, torch.nn.Module] = {}
        if args.learn_projection:
            from .projection import LearnableProjection
            self.learned_projections = {t.name: LearnableProjection(t.projection).to(self.args.device)
                                        for t in self.teachers if t.loss == "p_kl"}
            if not self.learned_projections:
                raise ValueError("learn_projection=True needs at least one teacher with loss 'p_kl'")

    # -- learned W: optimizer group, DDP averaging, checkpoints --
    def create_optimizer(self, model=None):
        """Trainer's optimizer plus one parameter group for the learned W's (own lr, no weight decay)."""
        opt = super().create_optimizer(model)
        params = [p for lp in self.learned_projections.values() for p in lp.parameters()]
        if params and not any(p is params[0] for g in opt.param_groups for p in g["params"]):
            opt.add_param_group({"params": params, "lr": self.args.projection_learning_rate, "weight_decay": 0.0})
            opt.register_step_pre_hook(lambda *_: self._sync_projection_grads(params))
            # Trainer zeroes the model's gradients only (model.zero_grad()): clear W's after each step
            opt.register_step_post_hook(lambda *_: [setattr(p, "grad", None) for p in params])
        return opt

    def _sync_projection_grads(self, params):
        if self._skip_at == self.state.global_step + 1:   # a dropped step: W's gradients are gone too
            return
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad /= self.args.world_size

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The student as Trainer saves it, plus each learned W as ``learned_W_<teacher>.safetensors``."""
        super().save_model(output_dir, _internal_call)
        if self.learned_projections and self.args.should_save:
            out = Path(output_dir or self.args.output_dir)
            for name, lp in self.learned_projections.items():
                lp.save(out / f"learned_W_{name}.safetensors")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, lp in self.learned_projections.items():
            f = Path(resume_from_checkpoint) / f"learned_W_{name}.safetensors"
            if f.exists():
                lp.load_state(f)

    # -- one step --
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step; the loss it reports for a dropped step (nonfinite_teacher="skip") is taken back, so
        the logged ``loss`` and ``train_loss`` average the steps that trained."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        step = self.state.global_step + 1
        if self._skip_at != step:
            if self._step_loss_at != step:
                self._step_loss_at, self._step_loss = step, loss
            else:                                          # gradient accumulation: the step's running sum
                self._step_loss = self._step_loss + loss
            return loss
        back = -self._step_loss if self._step_loss_at == step else torch.zeros_like(loss)
        self._step_loss_at, self._step_loss = step, torch.zeros_like(loss)
        return back

    def _check_teacher(self, teacher: Teacher, t_logits: torch.Tensor, entry: dict, inputs: dict) -> None:
        """Raise `_NonFiniteTeacher` when the teacher's logits hold NaN or +inf, or a whole row of -inf, at a
        position the loss reads (a real token under the teacher's attention mask). A few -inf entries (a
        masked vocabulary) are fine. Cost: one float32 sum over the logits and one scalar read; the exact
        test runs on the rows whose sum is not finite only."""
        used = entry["attention_mask"].to(t_logits.device).bool()
        suspect = ~torch.isfinite(t_logits.sum(-1, dtype=torch.float32)) & used
        if not bool(suspect.any()):
            return
        bad = []
        for b, p in suspect.nonzero().tolist():
            row = t_logits[b, p]
            kind = ("NaN" if bool(torch.isnan(row).any()) else "+inf" if bool(torch.isposinf(row).any())
                    else "-inf everywhere" if bool(torch.isneginf(row).all()) else None)
            if kind is not None:
                bad.append((b, p, kind))
        if not bad:
            return
        b, p, kind = bad[0]
        idx = f" (dataset idx {int(inputs['idx'][b])})" if "idx" in inputs else ""
        source = "cached log-probs" if "logprobs" in entry else "logits"
        raise _NonFiniteTeacher(
            f"teacher {teacher.name!r}: non-finite {source} ({kind}) at step {self.state.global_step + 1}, "
            f"batch row {b}{idx}, position {p} (teacher token id {int(entry['input_ids'][b, p])}); "
            f"{len(bad)} of {int(used.sum())} used positions affected. Set nonfinite_teacher='skip' to skip "
            "such steps instead of stopping")

    def _teacher_logits(self, teacher: Teacher, entry: dict) -> torch.Tensor:
        """The teacher's logits (live, no grad, eval mode) or its cached log-probs, as float32."""
        if "logprobs" in entry:
            return entry["logprobs"].float()
        teacher.model.eval()
        with torch.no_grad():
            return teacher.model(input_ids=entry["input_ids"], attention_mask=entry["attention_mask"]).logits

    def _will_log(self) -> bool:
        """Whether the step being computed ends on a logging step (the loss metrics are needed only then)."""
        if not self.model.training or self.args.logging_strategy != "steps":
            return True                                  # evaluation, or epoch-wise logging: always
        step = self.state.global_step + 1
        every = int(getattr(self.state, "logging_steps", None) or self.args.logging_steps)   # Trainer resolves ratios
        return (step == 1 and self.args.logging_first_step) or step % max(1, every) == 0

    def _projection_weights(self, teacher: Teacher) -> torch.Tensor | None:
        lp = self.learned_projections.get(teacher.name)
        return None if lp is None else lp.weights()

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, in float32, over ``loss_chunk_size`` positions at a time."""
        if logits.shape[1] < 2:   # no row has a next token (every text empty): zero, still on the graph
            return logits.float().sum() * 0.0
        logits, labels = logits[:, :-1], labels[:, 1:]
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1)
        n = (flat_labels != -100).sum().clamp(min=1)
        step = self.args.loss_chunk_size or flat_labels.numel()
        total = flat_logits.new_zeros((), dtype=torch.float32)
        for a in range(0, flat_labels.numel(), step):
            total = total + F.cross_entropy(flat_logits[a:a + step].float(), flat_labels[a:a + step],
                                            ignore_index=-100, reduction="sum")
        return total / n

    def _kd_per_sample(self, teacher: Teacher, logits, mask, t_logits, entry) -> tuple[torch.Tensor, dict]:
        """[B] KD losses, one per sample (for per-sample teacher weights): the dispatch on each row."""
        alignments = entry.get("alignments")
        rows, metrics = [], defaultdict(list)
        weights, want_metrics = self._projection_weights(teacher), self._will_log()   # once per batch, not per row
        for b in range(logits.shape[0]):
            loss_b, m_b = teacher_kd_loss(teacher, logits[b:b + 1], mask[b:b + 1], t_logits[b:b + 1],
                                          entry["attention_mask"][b:b + 1],
                                          None if alignments is None else alignments[b:b + 1],
                                          self.args.temperature, self.args.loss_chunk_size, weights, want_metrics)
            rows.append(loss_b)
            for k, v in m_b.items():
                metrics[k].append(float(v))
        return torch.stack(rows), {k: float(np.mean(v)) for k, v in metrics.items()}

    def kd_loss(self, inputs: dict, logits: torch.Tensor, metrics: dict, check: bool = False) -> torch.Tensor:
        """sum_m alpha_m KD_m over the teachers (xtoken.multi_teacher), filling ``metrics``.

        alpha: ``teacher_weighting="static"`` -> the Teacher.weight values normalized to sum 1; else
        confidence-adaptive from each teacher's statistics on its own tokens (CE, entropy, max prob),
        per batch, or per sample (``weighting_per="sample"``: each KD_m is then computed per sample).
        ``check``: test each teacher's logits for non-finite values at used positions (`_check_teacher`).
        Also reports ``<teacher>/unpaired_share``: the share of the student's tokens in no chunk pair.
        """
        from .multi_teacher import aggregate, teacher_stats, teacher_weights

        scheme, per = self.args.teacher_weighting, self.args.weighting_per
        per_sample = scheme != "static" and per == "sample"
        kd_terms, stats = [], []
        for t in self.teachers:
            entry = inputs["teachers"][t.name]
            t_logits = self._teacher_logits(t, entry)
            if check:
                self._check_teacher(t, t_logits, entry, inputs)
            if per_sample:
                kd_m, m_metrics = self._kd_per_sample(t, logits, inputs["attention_mask"], t_logits, entry)
            else:
                kd_m, m_metrics = teacher_kd_loss(t, logits, inputs["attention_mask"], t_logits,
                                                  entry["attention_mask"], entry.get("alignments"),
                                                  self.args.temperature, self.args.loss_chunk_size,
                                                  self._projection_weights(t), self._will_log())
            kd_terms.append(kd_m)
            if scheme != "static":
                t_labels = entry["input_ids"].masked_fill(entry["attention_mask"] == 0, -100)
                stats.append(teacher_stats(t_logits, t_labels, entry["attention_mask"]))
            metrics[f"kd_{t.name}"] = kd_m.detach().mean()
            if entry.get("alignments"):   # student tokens in no chunk pair: text the two sides spell differently
                valid = sum(a.student_valid[1] - a.student_valid[0] for a in entry["alignments"])
                if valid:
                    unpaired = sum(len(a.student_unpaired) for a in entry["alignments"])
                    metrics[f"{t.name}/unpaired_share"] = unpaired / valid
            metrics.update({f"{t.name}/{k}": v for k, v in m_metrics.items()})
        if scheme == "static":
            alpha = teacher_weights("static", alphas=[t.weight for t in self.teachers])
        else:
            alpha = teacher_weights(scheme, stats, per=per)
            for t, a in zip(self.teachers, alpha):
                metrics[f"alpha_{t.name}"] = a.mean()
        return aggregate(kd_terms, alpha.to(logits.device))

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """ce_weight * CE + kd_weight * KD, KD rescaled to CE's value when dynamic_kd_scale; metrics logged.

        In training, nothing non-finite is trained on: each teacher's logits are checked at the positions
        the loss reads, and a non-finite loss stops training (`_stop_or_skip`)."""
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits = outputs.logits
        ce = self._ce(logits, inputs["labels"])
        metrics = {"ce": ce.detach()}
        loss = self.args.ce_weight * ce
        bad_teacher = None
        if self.teachers:
            try:
                kd = self.kd_loss(inputs, logits, metrics, check=model.training)
            except _NonFiniteTeacher as e:
                bad_teacher = e.args[0]
            else:
                metrics["kd"] = kd.detach()
                if self.args.dynamic_kd_scale:
                    from .losses import dynamic_kd_scale
                    metrics["kd_scale"] = ce.detach() / kd.detach().clamp(min=1e-12)
                    kd = dynamic_kd_scale(ce, kd)
                loss = loss + self.args.kd_weight * kd
        if model.training:   # evaluation losses are not mixed into the training logs
            if self._stop_or_skip(ce, loss, bad_teacher):
                loss = ce * 0.0   # zero gradients (every rank still runs its backward); the step is dropped
            else:
                self._record(metrics)
        return (loss, outputs) if return_outputs else loss

    def _stop_or_skip(self, ce: torch.Tensor, loss: torch.Tensor, bad_teacher: str | None) -> bool:
        """After a training micro-batch: raise `NonFiniteError` for a non-finite loss (always) or for
        non-finite teacher logits (``nonfinite_teacher="raise"``); True when the optimizer step is to be
        dropped (``"skip"``). Under DDP both flags are all-reduced first: every rank takes the same
        decision, so none is left waiting in a collective for one that stopped."""
        step = self.state.global_step + 1
        teacher_here, loss_here = bad_teacher is not None, not bool(torch.isfinite(loss.detach()))
        teacher_any, loss_any = teacher_here, loss_here
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flags = torch.tensor([float(teacher_here), float(loss_here)], device=loss.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            teacher_any, loss_any = (bool(x) for x in flags.tolist())
        if loss_any:
            where = f"(ce {float(ce.detach())}, loss {float(loss.detach())})" if loss_here else "on another rank"
            raise NonFiniteError(f"non-finite training loss at step {step} {where}: the student's logits or a loss "
                                 "term are inf/NaN; stopping instead of training on (check the learning rate, "
                                 "the data of this step, the precision)")
        if not teacher_any:
            return False
        if self.args.nonfinite_teacher == "raise":
            raise NonFiniteError(bad_teacher if teacher_here else
                                 f"non-finite teacher logits at step {step} on another rank (its error names the "
                                 "teacher and position); stopping on this rank too")
        if self._skip_at != step:
            self._skip_at = step
            self.skipped_steps += 1
            self._skipped_since_log += 1
        logger.warning("%s: step %d skipped (%d step(s) skipped so far)",
                       bad_teacher or "non-finite teacher logits on another rank", step, self.skipped_steps)
        return True

    def _record(self, metrics: dict) -> None:
        """Hold a training micro-batch's metrics until its optimizer step is known not to be dropped.
        ``kd_scale`` (CE / KD) only where KD > 0: a batch with nothing to distil would log CE / 1e-12."""
        values = {k: float(v) for k, v in metrics.items()}
        if "kd_scale" in values and not values["kd"] > 0:
            del values["kd_scale"]
        if self.args.nonfinite_teacher != "skip":   # no step is ever dropped: straight into the log window
            for k, v in values.items():
                self._metrics[k].append(v)
            return
        step = self.state.global_step + 1
        if self._pending_at != step:
            self._flush_metrics()
            self._pending_at = step
        self._pending.append(values)

    def _flush_metrics(self) -> None:
        if self._pending_at != self._skip_at:
            for values in self._pending:
                for k, v in values.items():
                    self._metrics[k].append(v)
        self._pending = []

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each distillation metric since the last log (over DDP ranks too, as Trainer
        does for the loss), then log as Trainer does. With ``nonfinite_teacher="skip"``: ``skipped_steps``
        (so far), and ``loss`` / ``train_loss`` averaged over the steps that trained (NaN when none did)."""
        if "loss" in logs:
            self._flush_metrics()
            if self.args.nonfinite_teacher == "skip":
                n, k = self.state.global_step - self._last_log_step, self._skipped_since_log
                if k:
                    logs["loss"] = logs["loss"] * n / (n - k) if n > k else float("nan")
                logs["skipped_steps"] = self.skipped_steps
                self._skipped_since_log = 0
            self._last_log_step = self.state.global_step
            self._log_metrics(logs)
        if "train_loss" in logs and self.skipped_steps:
            g, k = self.state.global_step, self.skipped_steps
            logs["train_loss"] = logs["train_loss"] * g / (g - k) if g > k else float("nan")
        super().log(logs, start_time)

    def _log_metrics(self, logs: dict) -> None:
        """The means of the metrics since the last log into ``logs``. Under DDP, a metric is pooled over the
        ranks that have it (a key can be missing on a rank: kd_scale of a step without KD, say)."""
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            local = sorted(k for k, v in self._metrics.items() if v)
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, local)
            keys = sorted(set().union(*gathered))
            if keys:
                sums = torch.tensor([[float(np.sum(self._metrics.get(k, []))), float(len(self._metrics.get(k, [])))]
                                     for k in keys], dtype=torch.float64, device=self.args.device)
                torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
                logs.update({k: s / c for k, (s, c) in zip(keys, sums.tolist()) if c > 0})
        elif self._metrics:
            keys = sorted(k for k, v in self._metrics.items() if v)
            values = torch.tensor([float(np.mean(self._metrics[k])) for k in keys], device=self.args.device)
            logs.update(dict(zip(keys, values.tolist())))
        self._metrics.clear()


# ---- callbacks ----------------------------------------------------------------------------------

class _DropSkippedStep(TrainerCallback):
    """Part of XTokenTrainer (``nonfinite_teacher="skip"``): right before the optimizer step of a step with
    non-finite teacher logits, every gradient is dropped (set to None), so the optimizer leaves each
    parameter and its moments as they were; the learning-rate schedule still advances."""

    def __init__(self, trainer: "XTokenTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._last_log_step = state.global_step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        if self.trainer._skip_at != state.global_step + 1:
            return
        params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
        params += list(model.parameters()) if model is not None else []
        for p in params:
            p.grad = None


class LossCurveCallback(TrainerCallback):
    """At the end of training, plot loss (and ce / kd when logged) against step to output_dir/loss_curve.png."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        rows = [r for r in state.log_history if "loss" in r]
        if not rows:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in ("loss", "ce", "kd"):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(Path(args.output_dir).name)
        fig.tight_layout()
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(args.output_dir) / "loss_curve.png", dpi=100)
        plt.close(fig)
