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
    # on-policy distillation (xtoken.hf.onpolicy)
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "probability that a training batch is on-policy (GKD's convention: 0 = off-policy only, 1 = "
            "always on-policy): the student continues the batch's prompts, the teachers score its text live and KD "
            "and CE run on the generated tokens only. Drawn per micro-batch from the seed and the step, the same "
            "on every DDP rank"
        },
    )
    max_new_tokens: int = field(
        default=128,
        metadata={"help": "on-policy: most tokens the student generates per prompt (also capped by max_length)"},
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={
            "help": "on-policy: sampling temperature of the student's generation (0: greedy). Not the KD "
            "temperature, which is `temperature`"
        },
    )
    top_p: float = field(default=1.0, metadata={"help": "on-policy: nucleus sampling mass in (0, 1] (1: off)"})
    top_k: int = field(default=0, metadata={"help": "on-policy: sample among the top k ids only (0: off)"})
    on_policy_ce: bool = field(
        default=False,
        metadata={
            "help": "on-policy batches: also train CE on the student's own sample (off: KD alone, GKD's on-policy "
            "loss). Sampled from the student at temperature 1, that term's expected gradient is zero and its noise "
            "is not: on the miniature, CE on the student's own samples alone turned every answer into a run of "
            "dots within 450 steps (docs/miniature.md). Off-policy batches always train CE (ce_weight)"
        },
    )
    stop_strings: list[str] = field(
        default_factory=list,
        metadata={
            "help": "on-policy: texts that end a generation (a row stops once its generated text contains one; the "
            "text is cut just after it and the stop text kept, so the student is taught where to stop). Set them "
            "to the evaluation's own stop sequences (lm-eval's `until`), else the student writes past the answer "
            "to max_new_tokens and is distilled on what it invents there"
        },
    )
    use_vllm: bool = field(
        default=False,
        metadata={"help": "on-policy: generate with vLLM (needs the vllm package; not implemented yet: HF generate)"},
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
        self._check_generation()

    def _check_generation(self) -> None:
        """The on-policy settings: lmbda a probability, sampling settings in range, vllm importable if asked."""
        if isinstance(self.lmbda, bool) or not (isinstance(self.lmbda, (int, float)) and 0.0 <= self.lmbda <= 1.0):
            raise ValueError(f"lmbda must be a probability in [0, 1], not {self.lmbda!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, not {self.max_new_tokens!r}")
        if not (math.isfinite(self.generation_temperature) and self.generation_temperature >= 0):
            raise ValueError(
                f"generation_temperature must be finite and >= 0 (0: greedy), not {self.generation_temperature!r}"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], not {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), not {self.top_k!r}")
        if isinstance(self.stop_strings, str) or not all(isinstance(x, str) and x for x in self.stop_strings):
            raise ValueError(f"stop_strings must be a list of non-empty strings, not {self.stop_strings!r}")
        self.stop_strings = list(self.stop_strings)
        if self.use_vllm:
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ValueError(
                    "use_vllm=True needs the vllm package, which is not installed; use_vllm=False "
                    "generates with the student's own HF generate"
                )
