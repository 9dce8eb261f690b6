"""The paper scale: real checkpoints, a real pre-training stream, the paper's optimizer and schedule.

The same trainer (`xtoken.train.XTokenTrainer`), losses and grid of settings as the miniature; only the
inputs change (`PaperConfig`, every field with its help):

    student  meta-llama/Llama-3.2-1B          (gated: accept the licence on the model page, `hf auth login`)
    teachers meta-llama/Llama-3.2-3B (KL), Qwen/Qwen3-4B, microsoft/Phi-4-mini-instruct (GOLD / P-KL / H-KL)
    data     nvidia/Nemotron-Pretraining-Specialized-v1.1, packed into consecutive 2,048-token samples
    optim    AdamW lr 5e-5, weight decay 0.001, betas (0.9, 0.95), 250 warm-up steps then cosine to 0,
             global batch 64 on any number of GPUs, 5,000 steps, student in fp32 master weights with bf16
             autocast, teachers in bf16, temperature 1, dynamic KD/CE scaling on
    eval     lm-eval: PAPER_TASKS below, each with its own number of shots

Beyond the paper, settings with ``data="arithmetic_prompts"`` train on GSM8k's training questions
(``PaperConfig.prompt_dataset``, rendered as lm-eval's GSM8k prompt and answer) instead of the packed stream,
and settings with ``lmbda > 0`` train on-policy there (notebook 06): the student continues each question,
sampling at most ``max_new_tokens`` tokens up to the first of ``stop_strings``, and the teachers score its text.

One run per (setting, seed), each in its own folder ``<work>/runs/<setting>/seed<k>/``:

    trainer/checkpoint-*        the Trainer's checkpoints (``save_total_limit`` kept); a rerun resumes there
    model/                      the trained student and its tokenizer
    lm_eval_results.json        lm-eval's raw results
    result.json                 scores per task, the final losses, and the run record (setting, seed, W
                                digests, package versions, wall time, tokens/s, peak memory per rank)

A run whose ``result.json`` exists is read back, never retrained. `run_grid` runs a list of settings
in-process on one device, or each under ``torchrun --nproc_per_node N`` (``PaperConfig.nproc_per_node``);
``python -m xtoken.paper`` is that per-run entry point (see `main`). `xtoken.standins` builds random-weight
stand-ins of the three checkpoints, a local corpus and local tasks, so the whole path runs offline on a CPU.
"""

from .config import PAPER, PAPER_TASKS, TASK_METRICS, PaperConfig, launch_world_size, paper_config, settings_by_name
from .data import (
    HubUnavailable,
    fetch_hint,
    load_causal_lm,
    load_paper_tokenizer,
    load_prompt_stream,
    load_text_stream,
    logit_width,
    pack_texts,
    packed_stream,
    projection_for,
    stream_pretraining_text,
)
from .grid import ON_POLICY_STEPS, grid_config, main, on_policy_config, preflight, prepare, run_grid
from .run import run_setting, task_scores

__all__ = [
    "PAPER",
    "PAPER_TASKS",
    "TASK_METRICS",
    "PaperConfig",
    "HubUnavailable",
    "load_causal_lm",
    "load_paper_tokenizer",
    "load_text_stream",
    "load_prompt_stream",
    "pack_texts",
    "packed_stream",
    "stream_pretraining_text",
    "projection_for",
    "logit_width",
    "fetch_hint",
    "launch_world_size",
    "settings_by_name",
    "preflight",
    "run_setting",
    "run_grid",
    "task_scores",
    "paper_config",
    "grid_config",
    "on_policy_config",
    "ON_POLICY_STEPS",
    "prepare",
    "main",
]
