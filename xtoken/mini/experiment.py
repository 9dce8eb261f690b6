"""The miniature experiment: every function the notebooks call (no logic lives in notebooks).

    cfg = MiniConfig.preset("mini")
    paths = build_corpus(cfg, out)                    # corpus (Arrow), lm-eval JSONL, restricted vocabularies
    teachers = train_teachers(cfg, out)               # llama ("3B"), qwen3, phi: DataFrame of accuracies
    base = train_base_student(cfg, out)               # the "no distillation" row
    build_teacher_caches(cfg, out)                    # teacher log-probs over the training split, once
    df = run_grid(cfg, SINGLE_TEACHER_SETTINGS, cfg.seeds, out)   # one row per (setting, seed)
    results_table(df)                                 # mean and std over seeds
    df2 = run_grid(cfg, multi_teacher_settings(), cfg.seeds, out) # multi-teacher: just more settings

`prepare(cfg, out, runs=...)` does the first four (each skipped when already done) and early grid runs in one pool.

Every training run goes through `xtoken.train.XTokenTrainer` (teachers and the base student with no
teachers = CE only). Every grid run starts from the same base checkpoint, with identical data,
steps and seeds; runs are spread over ``cfg.workers`` processes with one torch thread each.
Each run writes ``runs/<setting>/seed<k>/result.json`` (config, final losses, eval scores per
skill, diagnostics, wall time).

Diagnostics (the mechanism, Proposition 1):
  numeral_mass   the student's probability mass on multi-digit numeral tokens at positions whose
                 next token is a numeral, on a fixed probe batch, logged every ``cfg.diag_every`` steps
  digit_split    the fraction of multi-digit numbers the student generates digit by digit

This module gathers the names of the modules that do each job:

  settings     Setting, SINGLE_TEACHER_SETTINGS, single_teacher_settings, multi_teacher_settings,
               kd_scaling_settings, KD_SCALINGS, on_policy_settings, on_policy_comparisons,
               on_policy_followup_settings, on_policy_followup_comparisons, DATA, TEACHERS
  pool         the process pool (in order, or as a DAG of jobs), one log file per job
  training     train_model, evaluate_model, load_vocabs: what every job does
  prepare      build_corpus, train_teachers, train_base_student, build_teacher_caches, w_groups, prepare
  runs         run_one, run_grid, results_table
  diagnostics  numeral_mass, digit_split_fraction, NumeralMassCallback, learned_w_summary
"""

from .diagnostics import NumeralMassCallback, digit_split_fraction, learned_w_summary, numeral_mass
from .prepare import build_corpus, build_teacher_caches, prepare, train_base_student, train_teachers, w_groups
from .runs import results_table, run_grid, run_one
from .settings import (
    DATA,
    KD_SCALINGS,
    SINGLE_TEACHER_SETTINGS,
    TEACHER_LABEL,
    TEACHERS,
    Setting,
    kd_scaling_settings,
    multi_teacher_settings,
    on_policy_comparisons,
    on_policy_followup_comparisons,
    on_policy_followup_settings,
    on_policy_settings,
    single_teacher_settings,
)
from .training import evaluate_model, load_vocabs, train_model

__all__ = [
    "build_corpus",
    "load_vocabs",
    "train_model",
    "train_teachers",
    "train_base_student",
    "evaluate_model",
    "build_teacher_caches",
    "Setting",
    "SINGLE_TEACHER_SETTINGS",
    "multi_teacher_settings",
    "kd_scaling_settings",
    "KD_SCALINGS",
    "on_policy_settings",
    "on_policy_comparisons",
    "on_policy_followup_settings",
    "on_policy_followup_comparisons",
    "DATA",
    "single_teacher_settings",
    "run_grid",
    "results_table",
    "learned_w_summary",
    "numeral_mass",
    "digit_split_fraction",
    "NumeralMassCallback",
    "TEACHERS",
    "TEACHER_LABEL",
    "run_one",
    "prepare",
    "w_groups",
]
