"""Training settings: `XTokenConfig`, the Hugging Face `TrainingArguments` plus the distillation knobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

LOSSES = ("kl", "gold", "p_kl", "h_kl", "uld")
WEIGHTINGS = ("static", "ce", "entropy", "max_prob")
NONFINITE_POLICIES = ("raise", "skip")


@dataclass
class XTokenConfig(TrainingArguments):
    """`transformers.TrainingArguments` plus the distillation settings.

    Defaults changed from TrainingArguments: ``report_to="none"``, ``remove_unused_columns=False``
    (the collator needs the ``text`` and ``idx`` columns), ``logging_steps=10``, progress bars on.
    """

    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both sides in KD"})
    kd_weight: float = field(default=1.0, metadata={"help": "weight of the (aggregated) KD term"})
    ce_weight: float = field(default=1.0, metadata={"help": "weight of the student's own CE term"})
    dynamic_kd_scale: bool = field(
        default=True,
        metadata={
            "help": "rescale KD to CE's magnitude each step: KD * stopgrad(CE / KD) (the paper's default). "
            "Beware: when KD becomes tiny its gradient is multiplied by CE/KD (~100x in the miniature "
            "trial) and can swamp CE; False gives the static ce_weight * CE + kd_weight * KD."
        },
    )
    teacher_weighting: str = field(
        default="static",
        metadata={
            "help": "multi-teacher weights: static (Teacher.weight) | ce | entropy | max_prob (confidence-adaptive)"
        },
    )
    weighting_per: str = field(default="batch", metadata={"help": "adaptive weights per batch or per sample"})
    max_length: int = field(default=512, metadata={"help": "student tokens per sample (teachers see the same text)"})
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "block size of the loss computations: positions per block for CE and kl, chunk pairs per block "
            "for the cross-tokenizer losses. Smaller saves memory at large vocabularies, larger is faster at "
            "small ones. None: CE in one piece, the losses' own defaults (blocks sized by a fixed element budget: "
            "64 chunks at 151,936 columns, all of a mini batch at the miniature's ~1,000-id vocabularies)"
        },
    )
    loss_curve: bool = field(default=True, metadata={"help": "save output_dir/loss_curve.png at the end of training"})
    learn_projection: bool = field(
        default=False,
        metadata={
            "help": "fine-tune each P-KL teacher's W with the student (fixed pattern, softmax rows; the paper's option)"
        },
    )
    projection_learning_rate: float = field(
        default=1e-2,
        metadata={"help": "learning rate of the learned W's row parameters (same schedule as the model's)"},
    )
    nonfinite_teacher: str = field(
        default="raise",
        metadata={
            "choices": list(NONFINITE_POLICIES),
            "help": "teacher logits (or cached log-probs) with NaN, +inf or an all -inf row at a position the loss "
            "reads (a real token under the attention mask): 'raise' stops training with an error naming the "
            "teacher, step, batch row and position; 'skip' drops that optimizer step (no update from any of its "
            "micro-batches; same decision on every DDP rank) and counts it as 'skipped_steps' in the logs. "
            "A non-finite loss of the student itself always stops training.",
        },
    )
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
        if self.loss_chunk_size is not None and (
            isinstance(self.loss_chunk_size, bool)
            or not isinstance(self.loss_chunk_size, int)
            or self.loss_chunk_size < 1
        ):
            raise ValueError(f"loss_chunk_size must be None or an integer >= 1, not {self.loss_chunk_size!r}")
        if self.nonfinite_teacher not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_teacher must be one of {NONFINITE_POLICIES}, not {self.nonfinite_teacher!r}")
