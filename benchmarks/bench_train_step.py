"""Throughput of an XTokenTrainer step: KD vs CE-only, live teacher vs TeacherCache.

Two modes:

  default (mini-scale, CPU, 1 thread)
      student LlamaForCausalLM hidden 64 / 2 layers over the Llama vocabulary restricted to the ids
      of an arithmetic corpus (~1,070 ids); teacher Qwen3ForCausalLM hidden 128 / 4 layers over the
      restricted Qwen3 vocabulary (~80 ids); batch 16, ~64 tokens per sequence; P-KL with one
      cross-tokenizer teacher. Prints tokens/s of CE, KD (live teacher) and KD (cached teacher),
      the ratios to CE, the teacher forward alone, and the KD overhead beyond the teacher forward:

          overhead = (t_KD_live - t_CE - t_teacher_forward) / t_CE      (target < 25%)
          cached   = (t_KD_cached - t_CE) / t_CE
          split    = the KD loss op alone (xtoken.losses, forward + backward on the logits)
                     + the trainer's glue (the rest of cached - CE)

      Collation (tokenization + chunk alignment) is timed apart: with dataloader_num_workers > 0
      it runs in worker processes, beside the step.

  The paper's shapes on a GPU are measured by benchmarks/gpu_check.py.

A step is ``trainer.training_step`` + ``optimizer.step`` + ``zero_grad`` on pre-collated batches,
median over the timed steps, everything measured in the same process so ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xtoken import load_tokenizer  # noqa: E402
from xtoken.projection import build_projection  # noqa: E402
from xtoken.train import DistillCollator, Teacher, TeacherCache, XTokenConfig, XTokenTrainer  # noqa: E402

# ---- shared helpers -----------------------------------------------------------------------------


def corpus_texts(n: int, seed: int = 0, min_chars: int = 0) -> list[str]:
    """Arithmetic word problems from the miniature's generator (joined up to ``min_chars`` each)."""
    from xtoken.mini.corpus import arithmetic_item

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = arithmetic_item(rng)["text"]
        while len(text) < min_chars:
            text += "\n\n" + arithmetic_item(rng)["text"]
        out.append(text)
    return out


def make_trainer(student, tok, teachers, out_dir, **kw) -> XTokenTrainer:
    args = XTokenConfig(
        output_dir=str(out_dir),
        max_steps=1,
        per_device_train_batch_size=1,
        learning_rate=1e-4,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        disable_tqdm=True,
        loss_curve=False,
        logging_steps=10**9,
        **kw,
    )
    trainer = XTokenTrainer(model=student, args=args, teachers=teachers, processing_class=tok)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_once(trainer, batch) -> float:
    """Seconds of one optimizer step (forward, losses, backward, AdamW) on ``batch``."""
    model, opt = trainer.model, trainer.optimizer
    sync()
    t0 = time.perf_counter()
    trainer.training_step(model, batch)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    trainer._metrics.clear()
    return time.perf_counter() - t0


def time_steps(trainer, batches, warmup: int = 2) -> float:
    """Median seconds of one optimizer step over ``batches`` (the first ``warmup`` not timed)."""
    times = [step_once(trainer, batch) for batch in batches]
    return statistics.median(times[warmup:])


def time_teacher_forward(teacher: Teacher, batches, device, warmup: int = 2) -> float:
    times = []
    for i, batch in enumerate(batches):
        entry = batch["teachers"][teacher.name]
        ids, mask = entry["input_ids"].to(device), entry["attention_mask"].to(device)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher.model(input_ids=ids, attention_mask=mask)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_kd_op(teacher: Teacher, batches, student_vocab: int, device, chunk_size=None, warmup: int = 2) -> float:
    """Median seconds of the KD loss alone (forward + backward to the student logits), teacher logits given."""
    from xtoken.train import teacher_kd_loss

    times = []
    for i, batch in enumerate(batches):
        entry = batch["teachers"][teacher.name]
        with torch.no_grad():
            t_logits = teacher.model(
                input_ids=entry["input_ids"].to(device), attention_mask=entry["attention_mask"].to(device)
            ).logits
        s_logits = torch.randn(*batch["input_ids"].shape, student_vocab, device=device, requires_grad=True)
        sync()
        t0 = time.perf_counter()
        loss, _ = teacher_kd_loss(
            teacher,
            s_logits,
            batch["attention_mask"],
            t_logits,
            entry["attention_mask"],
            entry["alignments"],
            1.0,
            chunk_size,
        )
        loss.backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- mini-scale ---------------------------------------------------------------------------------


def bench_mini(args) -> dict:
    from xtoken.mini.config import ModelSize
    from xtoken.mini.models import build_model, keep_ids_for, restrict_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    full_s, full_t = load_tokenizer("llama"), load_tokenizer("qwen3")
    texts = corpus_texts(args.batch * (args.steps + 2) + 64, min_chars=args.chars)
    s_tok, s_l2f = restrict_tokenizer(full_s, keep_ids_for(texts, full_s))
    t_tok, t_l2f = restrict_tokenizer(full_t, keep_ids_for(texts, full_t))
    W = build_projection(full_s, full_t).restrict(s_l2f, t_l2f, student_tok=s_tok, teacher_tok=t_tok)
    print(f"vocabularies: student {len(s_l2f)} ids, teacher {len(t_l2f)} ids; W {W.summary()['exact']} exact rows")

    student = build_model("student", ModelSize(64, 2, 4), len(s_l2f), s_tok, seed=0)
    t_model = build_model("qwen3", ModelSize(128, 4, 4), len(t_l2f), t_tok, seed=1)
    teacher = Teacher("qwen", t_model, t_tok, args.loss, projection=W)

    from datasets import Dataset

    n_rows = args.batch * (args.steps + 2)
    ds = Dataset.from_dict({"text": texts[:n_rows], "idx": list(range(n_rows))})
    col = DistillCollator(s_tok, [teacher], max_length=args.max_length)
    rows = [ds[i] for i in range(n_rows)]
    col(rows[: args.batch])  # first call builds each tokenizer's byte table (once per process)
    t0 = time.perf_counter()
    batches = [col(rows[i : i + args.batch]) for i in range(0, n_rows, args.batch)]
    collate_s = (time.perf_counter() - t0) / len(batches)
    seq = float(statistics.mean(float(b["attention_mask"].sum()) / args.batch for b in batches))
    tseq = float(statistics.mean(float(b["teachers"]["qwen"]["attention_mask"].sum()) / args.batch for b in batches))
    tokens = args.batch * seq
    print(
        f"batch {args.batch}, student tokens/seq {seq:.1f}, teacher tokens/seq {tseq:.1f}; "
        f"collation (tokenize + align) {collate_s * 1e3:.1f} ms/batch"
    )

    t0 = time.perf_counter()
    cache = TeacherCache.build(teacher, ds, col, batch_size=64)
    build_s = time.perf_counter() - t0
    cached = Teacher("qwen", t_model, t_tok, args.loss, projection=W, cache=cache)
    cached_batches = [
        DistillCollator(s_tok, [cached], max_length=args.max_length)(rows[i : i + args.batch])
        for i in range(0, n_rows, args.batch)
    ]

    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(dynamic_kd_scale=True, max_length=args.max_length, loss_chunk_size=args.loss_chunk_size)
        results = {}
        for _rep in range(args.repeats):  # interleave the three so drift from other load hits all alike
            for name, teachers, bs in (
                ("ce", [], batches),
                ("kd_live", [teacher], batches),
                ("kd_cached", [cached], cached_batches),
            ):
                import copy

                tr = make_trainer(copy.deepcopy(student), s_tok, teachers, tmp, **kw)
                results.setdefault(name, []).append(time_steps(tr, bs))
            results.setdefault("teacher_forward", []).append(time_teacher_forward(teacher, batches, "cpu"))
            results.setdefault("kd_loss_op", []).append(
                time_kd_op(teacher, batches, len(s_l2f), "cpu", args.loss_chunk_size)
            )
    t = {k: min(v) for k, v in results.items()}
    out = {
        "mode": "mini",
        "loss": args.loss,
        "batch": args.batch,
        "loss_chunk_size": args.loss_chunk_size,
        "student_tokens_per_seq": seq,
        "teacher_tokens_per_seq": tseq,
        "student_vocab": len(s_l2f),
        "teacher_vocab": len(t_l2f),
        "step_ms": {k: v * 1e3 for k, v in t.items()},
        "tokens_per_s": {k: tokens / t[k] for k in ("ce", "kd_live", "kd_cached")},
        "kd_live_over_ce_throughput": t["ce"] / t["kd_live"],
        "kd_cached_over_ce_throughput": t["ce"] / t["kd_cached"],
        "overhead_beyond_teacher_forward": (t["kd_live"] - t["ce"] - t["teacher_forward"]) / t["ce"],
        "cached_overhead": (t["kd_cached"] - t["ce"]) / t["ce"],
        "kd_loss_op_over_ce": t["kd_loss_op"] / t["ce"],
        "trainer_glue_over_ce": (t["kd_cached"] - t["ce"] - t["kd_loss_op"]) / t["ce"],
        "collate_ms_per_batch": collate_s * 1e3,
        "cache_build_s": build_s,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    print("\n== mini-scale step (CPU, 1 thread; medians, best of repeats) ==")
    for k in ("ce", "kd_live", "kd_cached"):
        print(
            f"  {k:10s} {t[k] * 1e3:8.1f} ms/step  {out['tokens_per_s'][k]:9.0f} tokens/s  "
            f"throughput vs CE {t['ce'] / t[k]:.2f}x"
        )
    print(f"  teacher forward alone {t['teacher_forward'] * 1e3:.1f} ms")
    print(
        f"  KD overhead beyond the teacher forward: {out['overhead_beyond_teacher_forward'] * 100:+.1f}% of a CE step"
        f" (target < 25%)"
    )
    print(f"  KD with cached teacher: {out['cached_overhead'] * 100:+.1f}% over a CE step")
    print(
        f"    of which the {args.loss} loss op alone (fwd + bwd on the logits): {t['kd_loss_op'] * 1e3:.1f} ms "
        f"= {out['kd_loss_op_over_ce'] * 100:.0f}% of a CE step; trainer glue (cache rows, dispatch, "
        f"weights, scaling, metrics): {out['trainer_glue_over_ce'] * 100:+.1f}%"
    )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", default="p_kl", choices=["p_kl", "h_kl", "gold", "uld"], help="mini mode KD loss")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(
        "--loss-chunk-size",
        type=int,
        default=None,
        help="XTokenConfig.loss_chunk_size (chunks per loss block; default: the losses' own)",
    )
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--chars", type=int, default=200, help="mini mode: characters per sample (joined items)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="write the mini-mode result here")
    args = p.parse_args(argv)
    out = bench_mini(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
