"""Every size of the miniature in one dataclass, `MiniConfig`, with three presets.

    MiniConfig.preset("mini")    the default reproduction (budget: 30 minutes on 2 CPU cores)
    MiniConfig.preset("smoke")   CI: every code path once, tiny sizes (< 2 minutes)
    MiniConfig.preset("pilot")   the sizes of `mini`, fewer student runs, for sizing experiments

Field groups (all documented inline below):
  corpus    sizes of the synthetic corpus (`xtoken.mini.corpus`) and its seed
  models    hidden size / layers / heads of the student and of each teacher family
  training  steps, batch, lr, warm-up, max_length for teachers, the base student and the grid
  grid      seeds of the grid, the test sizes (items per skill evaluated by lm-eval), workers

Why the sizes are what they are (all on 2 CPU cores, 2 worker processes of 1 torch thread): the models
and steps are the largest that keep `make reproduce` (45 + 39 grid runs, 3 teachers, a base student)
under 30 minutes (24.6 measured from a fresh clone) while the teachers beat the students on the skill they are
strong at (`results/`, design v2 in docs/miniature.md: Qwen3 85% arithmetic / 75% knowledge, Llama "3B" 60% /
83%, Phi 49% / 18%; base student 37% / 23%, CE-only 47% / 34%).
Length-grouped batches (Trainer's ``group_by_length``) are not used: they make batches skill-homogeneous,
and the Qwen3 teacher then falls from 67% to 0.5% exact match. The test sizes are set by statistical
power, not time (`xtoken.stats`): at 3 seeds the minimum detectable effect of a seed-paired difference in
arithmetic exact match is ~3 points with 200 items, ~1.3 with 1,200 and ~0.85 with 3,000; most of the
variance of a paired difference at n = 200 comes from the test items, not from the seeds.
`smoke` runs every code path in ~3 minutes, almost all of it fixed per-process costs (tokenizer
loading, lm-eval start-up), not training.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class ModelSize:
    """Size of one tiny model of a real family (`LlamaForCausalLM`, `Qwen3ForCausalLM`, `Phi3ForCausalLM`)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 0  # 0 -> 2 * hidden

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MiniConfig:
    name: str = "mini"
    # ---- corpus ------------------------------------------------------------------------------
    seed: int = 0  # corpus seed (world, problems, splits)
    n_train_arith: int = 6000  # arithmetic word problems in the training split
    n_train_know: int = 3000  # knowledge documents (biographies + QA) in the training split
    n_test_arith: int = 1200  # arithmetic test items. Never changes training: the first 200 are the
    # items drawn first from the corpus stream (always held out of training),
    # the rest come from their own stream. 1,200 puts the 3-seed minimum
    # detectable effect at ~1.3 points (~3 at 200) within the time budget
    n_test_know: int = 200  # knowledge test items, capped at the held-out facts (126 at these world
    # sizes: 252 facts, half of them asked in training). Never changes training
    n_countries: int = 24  # invented countries of the knowledge world
    n_people: int = 60  # invented people of the knowledge world (24 * 3 + 60 * 3 = 252 facts, 126 held out)
    know_qa_train_frac: float = 0.5  # share of facts whose QA form is in train (the rest -> test)
    # ---- models ------------------------------------------------------------------------------
    student: ModelSize = field(default_factory=lambda: ModelSize(64, 2, 4))
    teacher_llama: ModelSize = field(default_factory=lambda: ModelSize(128, 4, 4))  # "Llama-3.2-3B"
    teacher_qwen: ModelSize = field(default_factory=lambda: ModelSize(128, 4, 4))  # "Qwen3-4B"
    teacher_phi: ModelSize = field(default_factory=lambda: ModelSize(128, 4, 4))  # "Phi-4-mini"
    max_length: int = 160  # tokens per training sequence (longest tokenization fits)
    # ---- training ----------------------------------------------------------------------------
    teacher_steps: int = 1000  # the most that fits the 30-minute budget with student_steps (~4 min/teacher)
    teacher_batch: int = 32
    teacher_lr: float = 3e-3
    base_steps: int = 800  # the base student ("no distillation" row): short CE pre-training
    base_lr: float = 3e-3
    student_steps: int = 450  # every grid run (CE-only and KD alike); 600 would take ~45 minutes in all
    student_batch: int = 16
    student_lr: float = 1e-3
    warmup_ratio: float = 0.05
    kd_weight: float = 1.0  # loss = CE + kd_weight * KD (static; fixed before any KD result)
    dynamic_kd_scale: bool = False  # the grid's default weighting; the paper's KD*stopgrad(CE/KD) is its own
    # rows (`kd_scaling_settings`: dynamic against three static weightings)
    projection_lr: float = 1e-2  # learned-W rows (setting pkl_learned_qwen3): Adam lr of the softmax parameters,
    # fixed before that row ran (the trainer's default; same schedule as the student)
    # teacher name -> {skill: share of that skill's training rows the teacher reads}: the paper's teachers have
    # distinct strengths (Phi-4-mini math, Llama-3.2-3B knowledge, Qwen3-4B both), fixed here before any run
    teacher_mix: dict = field(
        default_factory=lambda: {
            "phi": {"arithmetic": 1.0, "knowledge": 0.2},
            "llama": {"arithmetic": 0.2, "knowledge": 1.0},
        }
    )
    # ---- grid --------------------------------------------------------------------------------
    seeds: tuple = (0, 1, 2)
    workers: int = 2  # worker processes, 1 torch thread each
    diag_every: int = 50  # steps between numeral-mass diagnostics
    eval_batch_size: int = 64
    max_gen_toks: int = 48
    pilot_measurements: dict = field(default_factory=dict)

    # ---- presets -----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str = "mini", **overrides) -> "MiniConfig":
        if name == "mini":
            cfg = cls()
        elif name == "pilot":
            cfg = cls(name="pilot", seeds=(0,))
        elif name == "smoke":
            cfg = cls(
                name="smoke",
                n_train_arith=200,
                n_train_know=100,
                n_test_arith=16,
                n_test_know=16,
                n_countries=6,
                n_people=10,
                student=ModelSize(32, 1, 2),
                teacher_llama=ModelSize(32, 1, 2),
                teacher_qwen=ModelSize(32, 1, 2),
                teacher_phi=ModelSize(32, 1, 2),
                teacher_steps=4,
                teacher_batch=8,
                base_steps=3,
                student_steps=4,
                student_batch=4,
                seeds=(0,),
                workers=1,
                diag_every=2,
                eval_batch_size=16,
                max_gen_toks=24,
            )
        else:
            raise ValueError(f"unknown preset {name!r}: mini, pilot or smoke")
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"MiniConfig has no field {k!r}")
            setattr(cfg, k, v)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "MiniConfig":
        d = dict(d)
        for k in ("student", "teacher_llama", "teacher_qwen", "teacher_phi"):
            if isinstance(d.get(k), dict):
                d[k] = ModelSize(**d[k])
        if "seeds" in d:
            d["seeds"] = tuple(d["seeds"])
        return cls(**d)

    def teacher_size(self, family: str) -> ModelSize:
        return {"llama": self.teacher_llama, "qwen3": self.teacher_qwen, "phi": self.teacher_phi}[family]
