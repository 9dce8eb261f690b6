"""Every size of the miniature in one dataclass, `MiniConfig`, with three presets.

    MiniConfig.preset("mini")    the default reproduction (budget: 30 minutes on 2 CPU cores)
    MiniConfig.preset("smoke")   CI: every code path once, tiny sizes (< 2 minutes)
    MiniConfig.preset("pilot")   the sizes of `mini`, fewer student runs, for sizing experiments

Field groups (all documented inline below):
  corpus    sizes of the synthetic corpus (`xtoken.mini.corpus`) and its seed
  models    hidden size / layers / heads of the student and of each teacher family
  training  steps, batch, lr, warm-up, max_length for teachers, the base student and the grid
  grid      seeds of the grid, n_test (test items per skill evaluated by lm-eval), workers

Measured here (pilot on the 2 CPU cores, 1 torch thread per process, `mini` sizes, corpus seed 0;
the machine was shared, load average 3-7, so wall times are 2-10x the uncontended ones):

  corpus         9,000 train (6,000 arithmetic + 3,000 knowledge) / 326 test (200 + 126); restricted
                 vocabularies: Llama 1,362 ids, Qwen3 372, Phi (o200k) 1,361; longest text 95 tokens
  teacher qwen3  hidden 128 / 4 layers (0.70M params), 1,500 steps x 32: exact match
                 arithmetic 0.725, knowledge 0.714 (683 s at load ~3; REFERENCE §5: ~150 ms/step
                 uncontended -> ~3 min for the 1,200 steps of `mini`)
  teacher llama  hidden 128 / 4 layers (0.83M), 1,200 steps x 32: arithmetic 0.375, knowledge 0.810
  teacher phi    hidden 128 / 4 layers (0.83M), 1,200 steps x 32: arithmetic 0.355, knowledge 0.913
                 (1,017 / 1,034 s, two workers at load ~5; the digit-splitting Qwen3 teacher is the
                 arithmetic one, the 3-digit-token teachers know the world better)
  base student   Llama hidden 64 / 2 layers, 800 CE steps x 16 at lr 3e-3:
                 arithmetic 0.100, knowledge 0.095, numeral mass 0.64 (67 s at load ~2)
  CE-only        base + 600 CE steps x 16 at lr 1e-3 (seed 0): arithmetic 0.210, knowledge 0.532
                 (234 s at load ~7; ~30 s at load ~2)
  same student   1,600 CE steps from scratch: arithmetic 0.335, knowledge 0.698 (so the task is
                 learnable by the Llama-tokenized student, and the teacher is still clearly ahead)
  first KD runs  seed 0, hyperparameters fixed before they ran (600 steps, lr 1e-3, CE + 1.0 x KD):
                 CE-only 0.210 / 0.532 (arithmetic / knowledge), numeral mass 0.63;
                 P-KL Qwen3 0.185 / 0.563, mass 0.65; GOLD Qwen3 0.025 / 0.278, mass 0.32
                 (Proposition 1's suppression; P-KL and GOLD ~440 s each at load ~7)
  lm-eval        one call, both tasks (326 generations, batch 64): 3-10 s (load 2) per model
  teacher cache  qwen3 over the 9,000 training rows: 212 s at load ~7

Projected `mini` total, uncontended, from REFERENCE §5 per-step times (`experiment.time_budget`):
corpus 0.5 min + teachers 2 rounds x ~3 min + base ~0.5 min + caches ~2 min + 84 runs x ~20 s / 2
workers ~14 min = ~23 min. `smoke` (`experiment.run_all`, 3 teachers, 8 single + 2 multi runs) took
905 s at load ~7 (corpus 149, teachers 188, base 68, caches 260, runs 239): almost all of it fixed
per-process costs (loading three 128k-200k tokenizers, lm-eval start-up), not training.
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
    intermediate: int = 0      # 0 -> 2 * hidden

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MiniConfig:
    name: str = "mini"
    # ---- corpus ------------------------------------------------------------------------------
    seed: int = 0                      # corpus seed (world, problems, splits)
    n_train_arith: int = 6000          # arithmetic word problems in the training split
    n_train_know: int = 3000           # knowledge documents (biographies + QA) in the training split
    n_test: int = 200                  # held-out test items per skill (lm-eval evaluates these)
    n_countries: int = 24              # invented countries of the knowledge world
    n_people: int = 60                 # invented people of the knowledge world
    know_qa_train_frac: float = 0.5    # share of facts whose QA form is in train (the rest -> test)
    # ---- models ------------------------------------------------------------------------------
    student: ModelSize = field(default_factory=lambda: ModelSize(64, 2, 4))
    teacher_llama: ModelSize = field(default_factory=lambda: ModelSize(128, 4, 4))   # "Llama-3.2-3B"
    teacher_qwen: ModelSize = field(default_factory=lambda: ModelSize(128, 4, 4))    # "Qwen3-4B"
    teacher_phi: ModelSize = field(default_factory=lambda: ModelSize(128, 4, 4))     # "Phi-4-mini"
    max_length: int = 160              # tokens per training sequence (longest tokenization fits)
    # ---- training ----------------------------------------------------------------------------
    teacher_steps: int = 1000          # 1,200 until session 4; cut with student_steps to fit the 30-minute budget
    teacher_batch: int = 32
    teacher_lr: float = 3e-3
    base_steps: int = 800              # the base student ("no distillation" row): short CE pre-training
    base_lr: float = 3e-3
    student_steps: int = 450           # every grid run (CE-only and KD alike); 600 until session 4 (44.7-minute run)
    student_batch: int = 16
    student_lr: float = 1e-3
    warmup_ratio: float = 0.05
    kd_weight: float = 1.0             # loss = CE + kd_weight * KD (static; fixed before any KD result)
    dynamic_kd_scale: bool = False     # the paper's KD*stopgrad(CE/KD); off: it swamped CE in REFERENCE §5
    projection_lr: float = 1e-2        # learned-W rows (setting pkl_learned_qwen3): Adam lr of the softmax parameters,
                                       # fixed before that row ran (the trainer's default; same schedule as the student)
    teacher_mix: dict = field(default_factory=dict)   # teacher name -> {"arithmetic": w, "knowledge": w}
    # ---- grid --------------------------------------------------------------------------------
    seeds: tuple = (0, 1, 2)
    workers: int = 2                   # worker processes, 1 torch thread each
    diag_every: int = 50               # steps between numeral-mass diagnostics
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
                name="smoke", n_train_arith=200, n_train_know=100, n_test=16, n_countries=6, n_people=10,
                student=ModelSize(32, 1, 2), teacher_llama=ModelSize(32, 1, 2), teacher_qwen=ModelSize(32, 1, 2),
                teacher_phi=ModelSize(32, 1, 2), teacher_steps=4, teacher_batch=8, base_steps=3,
                student_steps=4, student_batch=4, seeds=(0,), workers=1, diag_every=2,
                eval_batch_size=16, max_gen_toks=24)
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
