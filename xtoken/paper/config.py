"""The paper-scale settings: the paper's checkpoints, data and tasks (`PAPER`, `PAPER_TASKS`, `TASK_METRICS`),
`PaperConfig` with its presets, and the grid's settings by name."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

PAPER = {
    "student": "meta-llama/Llama-3.2-1B",
    "teachers": {"llama": "meta-llama/Llama-3.2-3B", "qwen3": "Qwen/Qwen3-4B", "phi": "microsoft/Phi-4-mini-instruct"},
    "dataset": "nvidia/Nemotron-Pretraining-Specialized-v1.1",
    "prompts": "openai/gsm8k",  # not the paper's: the on-policy experiment (notebook 06) continues its questions
}
# The paper averages five benchmarks without naming them; GSM8k is one. This list (GSM8k plus four standard
# lm-eval knowledge/reasoning tasks, with their customary numbers of shots) is a parameter, not a claim.
PAPER_TASKS = {"gsm8k": 5, "mmlu": 5, "arc_challenge": 25, "hellaswag": 10, "winogrande": 5}
# The number each task contributes to the tables: (lm-eval metric, filter).
TASK_METRICS = {
    "gsm8k": ("exact_match", "strict-match"),
    "mmlu": ("acc", "none"),
    "arc_challenge": ("acc_norm", "none"),
    "hellaswag": ("acc_norm", "none"),
    "winogrande": ("acc", "none"),
    "xtoken_standin_gsm8k": ("exact_match", "strict-match"),
    "xtoken_standin_arc": ("acc_norm", "none"),
}


@dataclass
class PaperConfig:
    """Everything a paper-scale run reads. ``PaperConfig.preset("paper")`` is the paper's setup;
    ``preset("standin")`` the same path at toy sizes for the random-weight stand-ins (`xtoken.standins`)."""

    student: str = field(default=PAPER["student"], metadata={"help": "student checkpoint: hub id or local folder"})
    teachers: dict = field(
        default_factory=lambda: dict(PAPER["teachers"]),
        metadata={"help": "teacher key (as used by the settings) -> hub id or local folder"},
    )
    projections: dict = field(
        default_factory=dict,
        metadata={
            "help": "teacher key -> a W file to use (checked against the tokenizers before any model loads); "
            "teachers not listed get W built once and cached in <work>/projections"
        },
    )
    dataset: str = field(
        default=PAPER["dataset"],
        metadata={
            "help": "training text: a hub dataset id, or a local .jsonl / .json / .parquet / .txt file or "
            "folder of them"
        },
    )
    subset: str | None = field(default=None, metadata={"help": "the dataset's configuration (subset) name"})
    split: str = field(default="train", metadata={"help": "the dataset split to stream"})
    text_column: str = field(default="text", metadata={"help": "the column holding the text"})
    prompt_dataset: str = field(
        default=PAPER["prompts"],
        metadata={
            "help": "rows of the settings whose data is 'arithmetic_prompts' (notebook 06's on-policy experiment): "
            "a hub dataset id or a local .jsonl / .json / .parquet file or folder; each row gives a prompt and its "
            "reference completion through prompt_format and completion_format"
        },
    )
    prompt_subset: str | None = field(default="main", metadata={"help": "prompt_dataset's configuration name"})
    prompt_split: str = field(default="train", metadata={"help": "prompt_dataset's split"})
    prompt_format: str = field(
        default="Question: {question}\nAnswer:",
        metadata={
            "help": "a row's prompt, str.format over its columns (lm-eval's GSM8k prompt): what an on-policy "
            "batch continues"
        },
    )
    completion_format: str = field(
        default=" {answer}",
        metadata={"help": "a row's reference completion; off-policy batches train on prompt + completion"},
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "on-policy: most tokens the student generates per prompt"}
    )
    generation_temperature: float = field(
        default=1.0, metadata={"help": "on-policy: sampling temperature of the student's generation (0: greedy)"}
    )
    stop_strings: list = field(
        default_factory=lambda: ["Question:", "\n\n"],
        metadata={
            "help": "on-policy: a generation ends at the first of these (kept and trained on); lm-eval's GSM8k "
            "stops at the same texts"
        },
    )
    steps: int = field(default=5000, metadata={"help": "optimizer steps per run"})
    global_batch: int = field(
        default=64,
        metadata={"help": "samples per optimizer step over all processes (micro_batch x accumulation x world size)"},
    )
    micro_batch: int = field(default=1, metadata={"help": "samples per process per forward"})
    max_length: int = field(default=2048, metadata={"help": "student tokens per packed training sample"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.001, metadata={"help": "AdamW weight decay"})
    betas: tuple = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    warmup_steps: int = field(default=250, metadata={"help": "linear warm-up steps, then cosine to 0"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both sides in KD"})
    projection_lr: float = field(
        default=1e-2,
        metadata={
            "help": "learning rate of a learned W's rows (settings with learn_projection; same schedule as the model's)"
        },
    )
    dynamic_kd_scale: bool = field(default=True, metadata={"help": "KD rescaled to CE's value each step (the paper's)"})
    bf16: bool = field(
        default=True,
        metadata={"help": "student: fp32 master weights with bf16 autocast (Trainer's bf16=True); teachers in bf16"},
    )
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute the student's activations"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept per run (a 1B checkpoint is ~15 GB)"})
    logging_steps: int = field(default=10, metadata={"help": "log losses every N steps"})
    tasks: dict = field(default_factory=lambda: dict(PAPER_TASKS), metadata={"help": "lm-eval task -> number of shots"})
    task_data_dir: str | None = field(
        default=None,
        metadata={"help": "folder of the local task files (xtoken_* tasks only; lm-eval's own tasks fetch their data)"},
    )
    eval_limit: int | None = field(default=None, metadata={"help": "documents per task (None: all)"})
    eval_batch_size: int = field(default=8, metadata={"help": "lm-eval batch size"})
    nproc_per_node: int = field(
        default=1,
        metadata={"help": "processes per run when run_grid launches it: 1 runs in this process, N > 1 under torchrun"},
    )
    fsdp: str = field(
        default="", metadata={"help": "Trainer's fsdp option for the student (e.g. 'full_shard auto_wrap'); '' = DDP"}
    )
    offline: bool = field(default=False, metadata={"help": "never touch the Hub (HF_HUB_OFFLINE=1)"})
    seeds: tuple = field(default=(0,), metadata={"help": "seeds of the grid (each setting runs once per seed)"})

    @classmethod
    def preset(cls, name: str = "paper", **overrides) -> "PaperConfig":
        """``paper``: the paper's setup. ``standin``: 2 steps, 128-token samples, global batch 2, the
        stand-ins' local corpus and tasks (paths under ``overrides["root"]``, see `xtoken.standins`)."""
        if name == "paper":
            cfg = cls()
        elif name == "standin":
            root = Path(overrides.pop("root", "standins"))
            cfg = cls(
                dataset=str(root / "corpus"),
                prompt_dataset=str(root / "tasks" / "standin_gsm8k_train.jsonl"),
                prompt_subset=None,
                max_new_tokens=8,
                steps=2,
                global_batch=2,
                micro_batch=1,
                max_length=128,
                warmup_steps=0,
                save_steps=1,
                logging_steps=1,
                tasks={"xtoken_standin_gsm8k": 5, "xtoken_standin_arc": 25},
                task_data_dir=str(root / "tasks"),
                eval_limit=4,
                eval_batch_size=4,
                offline=True,
            )
        else:
            raise ValueError(f"unknown preset {name!r}: 'paper' or 'standin'")
        for k, v in overrides.items():
            if k not in {f.name for f in fields(cls)}:
                raise TypeError(f"PaperConfig has no field {k!r}")
            setattr(cfg, k, v)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in (
            "steps",
            "global_batch",
            "micro_batch",
            "max_length",
            "save_total_limit",
            "nproc_per_node",
            "max_new_tokens",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PaperConfig.{name} must be >= 1, not {getattr(self, name)!r}")
        if not (self.temperature > 0 and self.lr >= 0 and self.generation_temperature >= 0):
            raise ValueError("PaperConfig: temperature must be > 0, generation_temperature >= 0 and lr >= 0")
        for name in ("prompt_format", "completion_format"):
            try:
                format_columns(getattr(self, name))
            except ValueError as err:
                template = getattr(self, name)
                raise ValueError(f"PaperConfig.{name} {template!r} is not a str.format template: {err}") from None
        if isinstance(self.stop_strings, str) or not all(isinstance(x, str) and x for x in self.stop_strings):
            raise ValueError(f"PaperConfig.stop_strings must be a list of non-empty strings, not {self.stop_strings!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PaperConfig":
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.9, 0.95)))
        d["seeds"] = tuple(d.get("seeds", (0,)))
        return cls(**d)

    def on_policy_args(self, setting) -> dict:
        """The `XTokenConfig` fields of ``setting``'s on-policy training (its ``lmbda`` and ``on_policy_ce``, this
        config's generation settings)."""
        return dict(
            lmbda=float(setting.lmbda),
            on_policy_ce=bool(setting.on_policy_ce),
            max_new_tokens=int(self.max_new_tokens),
            generation_temperature=float(self.generation_temperature),
            stop_strings=list(self.stop_strings),
        )

    def accumulation(self, world_size: int) -> int:
        """Gradient accumulation steps that make ``global_batch`` on ``world_size`` processes."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"global batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch} "
                f"x {world_size} processes"
            )
        return self.global_batch // per_step

    def training_args(self, output_dir, *, seed: int = 0, world_size: int | None = None, **overrides):
        """`XTokenConfig` for one run: the paper's optimizer and schedule, accumulation for ``global_batch``
        on the launch's world size (``WORLD_SIZE`` of torchrun / accelerate launch)."""
        import torch

        from ..hf import XTokenConfig

        world = world_size or launch_world_size()
        cpu = not torch.cuda.is_available()
        kw = dict(
            output_dir=str(output_dir),
            max_steps=self.steps,
            per_device_train_batch_size=self.micro_batch,
            gradient_accumulation_steps=self.accumulation(world),
            learning_rate=self.lr,
            weight_decay=self.weight_decay,
            adam_beta1=self.betas[0],
            adam_beta2=self.betas[1],
            warmup_steps=self.warmup_steps,
            lr_scheduler_type="cosine",
            bf16=self.bf16,
            use_cpu=cpu,
            temperature=self.temperature,
            dynamic_kd_scale=self.dynamic_kd_scale,
            max_length=self.max_length,
            projection_learning_rate=self.projection_lr,
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            logging_steps=self.logging_steps,
            activation_checkpointing=self.gradient_checkpointing,
            seed=seed,
            data_seed=seed,
            # streamed samples are read by every process and split there (each rank its own samples):
            # accelerate's default would read on rank 0 and dispatch batches, which cannot carry the
            # collator's alignments
            accelerator_config={"dispatch_batches": False, "split_batches": False},
            fsdp=self.fsdp,
            ddp_find_unused_parameters=False,
            loss_curve=False,
            disable_tqdm=False,
            ddp_backend="gloo" if cpu and launch_world_size() > 1 else None,
        )
        kw.update(overrides)
        return XTokenConfig(**kw)


def format_columns(template: str) -> list[str]:
    """The row columns a str.format ``template`` reads (``"Question: {question}"`` -> ``["question"]``); raises
    ValueError for a malformed template or a positional field."""
    import string

    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    if any(n == "" or n.isdigit() for n in names):
        raise ValueError("fields must be column names ({question}), not positional ({} or {0})")
    return [n.split(".")[0].split("[")[0] for n in names]


def launch_world_size() -> int:
    """Processes of this launch: ``WORLD_SIZE`` as torchrun and accelerate launch set it (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def paper_config(output_dir: str, n_gpus: int | None = None, **overrides):
    """`XTokenConfig` of the paper's setup (`PaperConfig().training_args`), kept for scripts."""
    return PaperConfig().training_args(output_dir, world_size=n_gpus, **overrides)


def settings_by_name(names) -> list:
    """The grid's `Setting` objects (the miniature's catalogue) by name; an unknown name is refused."""
    from ..mini.settings import (
        SINGLE_TEACHER_SETTINGS,
        Setting,
        multi_teacher_settings,
        on_policy_followup_settings,
        on_policy_settings,
    )

    every = SINGLE_TEACHER_SETTINGS + multi_teacher_settings() + on_policy_settings() + on_policy_followup_settings()
    catalogue = {s.name: s for s in every}
    out = []
    for n in names:
        if isinstance(n, Setting):
            out.append(n)
        elif n not in catalogue:
            raise KeyError(f"unknown setting {n!r}; known: {', '.join(catalogue)}")
        else:
            out.append(catalogue[n])
    return out
