"""The paper scale: real checkpoints, a real pre-training stream, the paper's optimizer and schedule.

The same trainer (`xtoken.train.XTokenTrainer`) and losses as the miniature; only the inputs change:

    student  meta-llama/Llama-3.2-1B          (gated: `huggingface-cli login` first)
    teachers meta-llama/Llama-3.2-3B (KL), Qwen/Qwen3-4B (P-KL), microsoft/Phi-4-mini-instruct (H-KL)
    data     nvidia/Nemotron-Pretraining-Specialized-v1.1, rows joined to ~16k characters per sample
    optim    AdamW lr 5e-5, weight decay 0.001, betas (0.9, 0.95), 250 warm-up steps then cosine to 0,
             global batch 64 (micro-batch 1 x accumulation x GPUs), sequence 2048, 5,000 steps, bf16,
             temperature 1, dynamic KD/CE scaling on                                 (REFERENCE.md §3)
    eval     lm-eval: PAPER_TASKS below

Nothing here can run without the Hub; every loader fails with a message that says what to do.
"""
from __future__ import annotations

import os

__all__ = ["PAPER", "PAPER_TASKS", "paper_config", "load_causal_lm", "stream_pretraining_text", "HubUnavailable"]

PAPER = {
    "student": "meta-llama/Llama-3.2-1B",
    "teachers": {"llama": ("meta-llama/Llama-3.2-3B", "kl"), "qwen3": ("Qwen/Qwen3-4B", "p_kl"),
                 "phi": ("microsoft/Phi-4-mini-instruct", "h_kl")},
    "dataset": "nvidia/Nemotron-Pretraining-Specialized-v1.1",
    "chars_per_sample": 16_000,
    "global_batch": 64, "micro_batch": 1, "max_length": 2048, "steps": 5000,
    "lr": 5e-5, "weight_decay": 0.001, "betas": (0.9, 0.95), "warmup_steps": 250,
    "temperature": 1.0, "dynamic_kd_scale": True,
}
# The paper averages five benchmarks without naming them in the available text; GSM8k is one. This
# list (GSM8k plus four standard lm-eval knowledge/reasoning tasks) is a parameter, not a claim.
PAPER_TASKS = {"gsm8k": 5, "mmlu": 5, "arc_challenge": 25, "hellaswag": 10, "winogrande": 5}


class HubUnavailable(RuntimeError):
    """A paper-scale model or dataset could not be loaded (no Hub, no cache, or no access)."""


def _hint(what: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    return (f"Could not load {what!r} ({type(err).__name__}: {str(err)[:200]}).\n"
            f"  {'Offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1). ' if offline else ''}"
            f"The paper scale needs the Hugging Face Hub or a local cache holding it:\n"
            f"  - `huggingface-cli login` (Llama weights are gated: accept the licence on the model page), then\n"
            f"  - `huggingface-cli download {what}` on a machine with network, or run there directly.\n"
            f"  The default `scale='mini'` runs offline.")


def load_causal_lm(name: str, *, dtype="bfloat16", device_map=None):
    """AutoModelForCausalLM by hub id (or local dir), bf16, eval-ready; clear error when unreachable."""
    import torch
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), device_map=device_map)
    except Exception as err:  # hub errors come in many types; the message is what matters
        raise HubUnavailable(_hint(name, err)) from None


def stream_pretraining_text(name: str = PAPER["dataset"], subset: str | None = None, split: str = "train",
                            text_column: str = "text", chars_per_sample: int = PAPER["chars_per_sample"]):
    """An iterable `datasets` stream whose rows are the corpus' texts joined to ~chars_per_sample."""
    from datasets import IterableDataset, load_dataset
    try:
        rows = load_dataset(name, subset, split=split, streaming=True)
    except Exception as err:
        raise HubUnavailable(_hint(name, err)) from None

    def joined():
        buf, n = [], 0
        for row in rows:
            buf.append(row[text_column])
            n += len(row[text_column])
            if n >= chars_per_sample:
                yield {"text": "\n\n".join(buf)}
                buf, n = [], 0
    return IterableDataset.from_generator(joined)


def paper_config(output_dir: str, n_gpus: int = 1, **overrides):
    """`XTokenConfig` with the paper's optimizer, schedule and batch (accumulation fills global batch 64)."""
    from .train import XTokenConfig
    p = PAPER
    accumulation = max(1, p["global_batch"] // (p["micro_batch"] * max(1, n_gpus)))
    kw = dict(output_dir=output_dir, max_steps=p["steps"], per_device_train_batch_size=p["micro_batch"],
              gradient_accumulation_steps=accumulation, learning_rate=p["lr"], weight_decay=p["weight_decay"],
              adam_beta1=p["betas"][0], adam_beta2=p["betas"][1], warmup_steps=p["warmup_steps"],
              lr_scheduler_type="cosine", bf16=True, temperature=p["temperature"],
              dynamic_kd_scale=p["dynamic_kd_scale"], max_length=p["max_length"], save_steps=500,
              logging_steps=10, activation_checkpointing=True)
    kw.update(overrides)
    return XTokenConfig(**kw)


def run_distillation(setting: dict, output_dir: str, *, n_gpus: int = 1, tasks=PAPER_TASKS, dataset=PAPER["dataset"],
                     subset: str | None = None, **config_overrides):
    """One paper-scale run: ``setting = {"teachers": [(key, loss, weight), ...], "weighting": "static"}``
    (keys of ``PAPER["teachers"]``; an empty list is continued pre-training). Trains the Llama-3.2-1B
    student with `XTokenTrainer`, saves it, and scores it with lm-eval; returns the tidy DataFrame."""
    from .evaluate import evaluate
    from .projection import build_projection
    from .tokenizers import load_tokenizer
    from .train import Teacher, XTokenTrainer

    s_tok = load_tokenizer(PAPER["student"])
    if s_tok.pad_token is None:
        s_tok.pad_token = "<|finetune_right_pad_id|>"
    student = load_causal_lm(PAPER["student"])
    teachers = []
    for key, loss, weight in setting.get("teachers", []):
        name = PAPER["teachers"][key][0]
        t_tok = load_tokenizer(name)
        W = None if loss == "kl" else build_projection(s_tok, t_tok)
        teachers.append(Teacher(key, load_causal_lm(name), t_tok, loss=loss, projection=W, weight=float(weight)))
    args = paper_config(output_dir, n_gpus=n_gpus, teacher_weighting=setting.get("weighting", "static"),
                        **config_overrides)
    trainer = XTokenTrainer(model=student, args=args, teachers=teachers,
                            train_dataset=stream_pretraining_text(dataset, subset), processing_class=s_tok)
    trainer.train()
    trainer.save_model(output_dir)
    s_tok.save_pretrained(output_dir)
    return evaluate(output_dir, list(tasks), device="cuda", batch_size=8, offline=False)
