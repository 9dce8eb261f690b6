"""`TeacherCache`: a teacher's log-probabilities over a fixed dataset, computed once and read back by index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .collator import DistillCollator, pad, pad_id
from .teacher import Teacher


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
    def build(
        cls,
        teacher: Teacher,
        dataset,
        collator: DistillCollator,
        *,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        path: str | Path | None = None,
        progress: bool = False,
    ) -> "TeacherCache":
        """Run ``teacher.model`` once over ``dataset`` (rows in order; row i must have idx == i)."""
        model = teacher.model.to(device).eval()
        texts = list(dataset["text"])
        if "idx" in dataset.column_names and list(dataset["idx"]) != list(range(len(texts))):
            raise ValueError("TeacherCache.build needs dataset['idx'] == 0..N-1 (add it with add_column)")
        rows = []
        for start in range(0, len(texts), batch_size):
            _, per_teacher = collator.tokenize(
                texts[start : start + batch_size],
                [f"idx {i}" for i in range(start, min(start + batch_size, len(texts)))],
            )
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
                chunk = rows[start : start + batch_size]
                ids, mask = pad(chunk, pad_id(teacher.tokenizer))
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                logp = torch.log_softmax(logits.float(), dim=-1).to(torch.float16).cpu()
                if data is None:
                    vocab = logp.shape[-1]
                    if path is not None:
                        data = np.lib.format.open_memmap(
                            str(path), mode="w+", dtype=np.float16, shape=(int(offsets[-1]), vocab)
                        )
                    else:
                        data = torch.empty((int(offsets[-1]), vocab), dtype=torch.float16)
                for j, r in enumerate(chunk):
                    a, b = offsets[start + j], offsets[start + j + 1]
                    if isinstance(data, np.ndarray):
                        data[a:b] = logp[j, : len(r)].numpy()
                    else:
                        data[a:b] = logp[j, : len(r)]
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
        return cls(
            np.load(str(path), mmap_mode="r"), np.load(str(path) + ".offsets.npy"), np.load(str(path) + ".ids.npy")
        )

    def rows(self, idx: torch.Tensor, width: int, teacher_ids: list[list[int]] | None = None) -> torch.Tensor:
        """Rows ``idx`` right-padded to [B, width, V] float16 (padding = 0, masked by the caller).

        ``teacher_ids``: the collator's unpadded teacher ids of the batch, checked against the cache."""
        out = torch.zeros((len(idx), width, self.vocab_size), dtype=torch.float16)
        for j, i in enumerate(idx.tolist()):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            if teacher_ids is not None and not np.array_equal(self.ids[a:b], teacher_ids[j]):
                raise ValueError(
                    f"cache row {i} holds other teacher tokens than the collator made ({b - a} cached, "
                    f"{len(teacher_ids[j])} now): the cache was built for another dataset, tokenizer "
                    "or max_length"
                )
            block = self.data[a:b]
            out[j, : b - a] = torch.from_numpy(np.array(block)) if isinstance(block, np.ndarray) else block
        return out
