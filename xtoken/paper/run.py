"""One paper-scale run (`run_setting`): train with `xtoken.hf.XTokenTrainer`, save, evaluate on rank 0, and
record what ran (W digests, versions, wall time, tokens/s, peak memory, per-rank digests)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .config import TASK_METRICS, PaperConfig, settings_by_name
from .data import (
    load_causal_lm,
    load_paper_tokenizer,
    load_prompt_stream,
    load_text_stream,
    logit_width,
    packed_stream,
    projection_for,
)


def task_scores(df) -> dict:
    """{task: score} from `xtoken.evaluate.evaluate`'s tidy rows, by `TASK_METRICS` (else the first metric)."""
    out = {}
    for task in dict.fromkeys(df.task):
        rows = df[df.task == task]
        metric, filt = TASK_METRICS.get(task, (rows.metric.iloc[0], rows["filter"].iloc[0]))
        hit = rows[(rows.metric == metric) & (rows["filter"] == filt)]
        out[task] = float((hit if len(hit) else rows).value.iloc[0])
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("xtoken", "torch", "transformers", "accelerate", "datasets", "lm_eval", "tokenizers"):
        try:
            out[p] = version(p.replace("_", "-"))
        except PackageNotFoundError:
            out[p] = None
    return out


def _peak_memory_gb(device) -> float:
    import resource

    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _gather(value):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


def _counting_collator(student_tok, teachers, max_length):
    """A `DistillCollator` that also counts and hashes the rows this process trained on (the run record shows
    that every rank read its own samples). A subclass, not a wrapper: on-policy training needs the collator
    itself (its alignments and prompts)."""
    import hashlib

    from ..hf import DistillCollator
    from ..hf.collator import row_text

    class SeenRows(DistillCollator):
        def __call__(self, rows):
            for i, r in enumerate(rows):
                self.n += 1
                self.sha.update(row_text(r, f"row {i}").encode("utf-8", "surrogatepass") + b"\0")
            return super().__call__(rows)

        def digest(self) -> str:
            return self.sha.hexdigest()[:16]

    seen = SeenRows(student_tok, teachers, max_length)
    seen.n, seen.sha = 0, hashlib.sha1()
    return seen


def _tensor_sums(model):
    """Per-tensor float64 sums of the parameters (cheap on any device): which tensors changed, and a digest
    that must agree across DDP ranks."""
    import torch

    with torch.no_grad():
        return torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()


def _digest(sums) -> str:
    import hashlib

    return hashlib.sha1(sums.numpy().tobytes()).hexdigest()[:16]


def run_setting(cfg: PaperConfig, setting, seed: int, work_dir) -> dict:
    """One paper-scale run (on every process of a torchrun launch): train, save, evaluate on rank 0.

    Resumable: the Trainer's last checkpoint in ``trainer/`` is resumed; a finished run (``result.json``)
    is read back. Returns the result dict (the same on every rank)."""
    import torch

    from ..evaluate import evaluate, save_raw_results
    from ..hf import Teacher, XTokenTrainer

    (setting,) = settings_by_name([setting])
    out = Path(work_dir) / "runs" / setting.name / f"seed{seed}"
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    if cfg.offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    t_start = time.time()
    ce_weight, kd_weight, dynamic = setting.loss_weights(cfg)
    args = cfg.training_args(
        out / "trainer",
        seed=seed,
        teacher_weighting=setting.weighting,
        learn_projection=setting.learn_projection,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        dynamic_kd_scale=dynamic,
        **cfg.on_policy_args(setting),
    )
    # tokenizers and W first: a wrong W or a missing teacher is refused before any model loads
    s_tok = load_paper_tokenizer(cfg.student)
    specs = []
    for key, loss, weight in setting.teachers:
        if key not in cfg.teachers:
            raise KeyError(f"setting {setting.name!r} uses teacher {key!r}, which PaperConfig.teachers does not name")
        t_tok = load_paper_tokenizer(cfg.teachers[key])
        W = None
        if loss != "kl":
            with args.main_process_first(local=False, desc=f"W for {key}"):  # rank 0 builds, the others read
                W = projection_for(
                    s_tok,
                    t_tok,
                    logit_width(cfg.teachers[key]),
                    Path(work_dir) / "projections",
                    cfg.projections.get(key),
                )
        specs.append((key, loss, weight, t_tok, W))
    student = load_causal_lm(cfg.student, dtype="float32")  # fp32 master weights; bf16 autocast in training
    teacher_dtype = "bfloat16" if cfg.bf16 else "float32"
    teachers = [
        Teacher(
            key,
            load_causal_lm(cfg.teachers[key], dtype=teacher_dtype, device_map={"": args.device}),
            t_tok,
            loss=loss,
            projection=W,
            weight=float(weight),
        )
        for key, loss, weight, t_tok, W in specs
    ]
    if setting.data == "arithmetic_prompts":  # GSM8k's questions and answers, one row per sample (not packed)
        data = load_prompt_stream(
            cfg.prompt_dataset,
            subset=cfg.prompt_subset,
            split=cfg.prompt_split,
            prompt_format=cfg.prompt_format,
            completion_format=cfg.completion_format,
        )
    else:
        rows = load_text_stream(cfg.dataset, subset=cfg.subset, split=cfg.split, text_column=cfg.text_column)
        data = packed_stream(rows, s_tok, cfg.max_length, text_column=cfg.text_column)
    seen = _counting_collator(s_tok, teachers, cfg.max_length)
    trainer = XTokenTrainer(
        model=student, args=args, teachers=teachers, train_dataset=data, processing_class=s_tok, data_collator=seen
    )
    sums_before = _tensor_sums(student)
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    t0 = time.time()
    train_out = trainer.train(resume_from_checkpoint=last)
    train_wall = time.time() - t0
    trainer.save_model(str(out / "model"))
    peak = _gather(round(_peak_memory_gb(args.device), 3))
    sums_after = _tensor_sums(trainer.model)
    moved = float((sums_after != sums_before).float().mean()) if sums_after.shape == sums_before.shape else None
    world = args.world_size
    steps_here = train_out.global_step - (
        int(str(last).rsplit("-", 1)[-1]) if last else 0
    )  # resumed: steps of this process
    # packed samples are max_length tokens each; prompt rows are shorter and vary, so no token rate is given
    tokens = steps_here * cfg.global_batch * cfg.max_length if setting.data == "corpus" else None
    final = {
        k: v
        for r in trainer.state.log_history
        for k, v in r.items()
        if k in ("loss", "ce", "kd") or k.startswith(("kd_", "alpha_"))
    }
    record = {
        "setting": setting.to_dict(),
        "seed": seed,
        "world_size": world,
        "device": str(args.device),
        "accumulation": args.gradient_accumulation_steps,
        "global_batch": cfg.global_batch,
        "resumed_from": last,
        "w_digests": {k: W.digest() for k, _, _, _, W in specs if W is not None},
        "versions": _versions(),
        "train_wall_s": round(train_wall, 2),
        "tokens_per_s": round(tokens / max(train_wall, 1e-9), 1) if tokens is not None else None,
        "peak_memory_gb_per_rank": peak,
        "student_master_dtype": str(next(trainer.model.parameters()).dtype).replace("torch.", ""),
        "changed_tensor_share": moved,  # share of the student's weight tensors that training changed
        "params_digest_per_rank": _gather(_digest(sums_after)) if not cfg.fsdp else None,  # DDP: all equal
        # collated, not trained: accelerate reads one batch ahead to detect the end of the data
        "samples_collated_per_rank": _gather(seen.n),
        "texts_digest_per_rank": _gather(seen.digest()),
        "config": cfg.to_dict(),
    }
    trainer_log = list(trainer.state.log_history)
    del trainer, teachers, student
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result = None
    if args.process_index == 0:
        s_tok.save_pretrained(str(out / "model"))
        t1 = time.time()
        df, raw = evaluate(
            out / "model",
            cfg.tasks,
            data_dir=cfg.task_data_dir,
            limit=cfg.eval_limit,
            batch_size=cfg.eval_batch_size,
            device=str(args.device),
            offline=cfg.offline,
            dtype="bfloat16" if cfg.bf16 and str(args.device).startswith("cuda") else "float32",
            return_raw=True,
        )
        save_raw_results(raw, out / "lm_eval_results.json")
        result = {
            "setting": setting.name,
            "label": setting.label or setting.name,
            "seed": seed,
            **task_scores(df),
            "final": final,
            "log_history": trainer_log,  # every logged window (on-policy runs: generated tokens per row)
            "train_wall_s": record["train_wall_s"],
            "eval_wall_s": round(time.time() - t1, 2),
            "wall_s": round(time.time() - t_start, 2),
            "record": record,
        }
        tmp = out / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, out / "result.json")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return result if result is not None else json.loads((out / "result.json").read_text())
