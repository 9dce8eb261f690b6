"""Cost of a two-teacher XTokenTrainer step against one teacher plus the second teacher's forward.

The target: a two-teacher step costs at most the single-teacher step plus the second
teacher's forward plus 15%:

    ratio = T2 / (T1 + F2)      (target <= 1.15)

    T1  one optimizer step (student forward, CE, teacher forward, KD loss, backward, AdamW step) with
        ONE teacher: Qwen3-tokenized, P-KL (cross-tokenizer)
    F2  the second teacher's forward alone (no_grad, the batch the trainer gives it)
    T2  the same step with BOTH teachers (static weights unless --weighting), on the same batches

Second teachers (both pairs are run): a same-tokenizer Llama teacher with KL, and a Phi-tokenized
teacher (o200k) with H-KL. Teacher forwards are live (no TeacherCache): the requirement is about them.

Mini scale, CPU, 1 thread: the setup of `bench_train_step.py` (student LlamaForCausalLM hidden 64 /
2 layers over the Llama vocabulary restricted to an arithmetic corpus; teachers hidden 128 / 4 layers
over their restricted vocabularies, the miniature's sizes), batch 16, ~64 student tokens per sample.
The trainer and step timing are `bench_train_step`'s own (``training_step`` + ``optimizer.step`` +
``zero_grad`` on pre-collated batches). All settings are timed round-robin, step by step, in one
process so drift from other load hits them alike; medians over steps and repeats.

Also printed, to say where any excess goes:
    L2        the second teacher's loss op alone (forward + backward on the student logits, teacher
              logits given), i.e. what `teacher_kd_loss` adds on top of F2
    glue      T2 - T1 - F2 - L2: aggregation (xtoken.multi_teacher), dynamic scaling, metrics, dispatch
    collate   the DistillCollator per batch (tokenize + chunk alignment) with one and with two teachers;
              not part of the step (dataloader_num_workers > 0 runs it beside the step), reported apart
              and as a with-collation ratio (T2 + C2) / (T1 + C1 + F2)
    peak      extra peak RSS of one step (VmHWM reset through /proc/self/clear_refs before it, minus VmRSS
              then), and of the second teacher's forward

Run:  python benchmarks/bench_multi_teacher_step.py [--repeats 5] [--weighting static] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import corpus_texts, make_trainer, step_once, sync, time_kd_op  # noqa: E402

from xtoken import load_tokenizer  # noqa: E402
from xtoken.projection import build_projection  # noqa: E402
from xtoken.train import DistillCollator, Teacher  # noqa: E402

TARGET = 1.15


# ---- memory -------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> int:
    """Free what can be freed, reset the peak RSS (Linux >= 4.0) and return the current RSS in kB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_extra_mb(fn) -> float:
    """Extra peak RSS (MB) while ``fn()`` runs, above the RSS just before it."""
    base = _reset_peak()
    fn()
    return (_status_kb("VmHWM") - base) / 1024


# ---- one step / one forward ---------------------------------------------------------------------


def forward_once(teacher: Teacher, batch) -> float:
    entry = batch["teachers"][teacher.name]
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        teacher.model(input_ids=entry["input_ids"], attention_mask=entry["attention_mask"])
    sync()
    return time.perf_counter() - t0


# ---- where a step's time goes (a separate, instrumented pass) ----------------------------------

SEGMENTS = {  # label -> (module path, attribute); wrapped with a timer during `segments` only
    "teacher_forward": ("xtoken.train", "XTokenTrainer._teacher_logits"),
    "kd_loss_ops": ("xtoken.train", "teacher_kd_loss"),
    "weights": ("xtoken.multi_teacher", "teacher_weights"),
    "teacher_stats": ("xtoken.multi_teacher", "teacher_stats"),
    "aggregate": ("xtoken.multi_teacher", "aggregate"),
    "dynamic_scale": ("xtoken.losses", "dynamic_kd_scale"),
    "compute_loss": ("xtoken.train", "XTokenTrainer.compute_loss"),
}


def segments(trainers: dict, own: dict, warmup: int) -> dict:
    """Median ms per step of each SEGMENTS entry and of backward (+ the whole step), per setting.

    kd_loss_ops is every teacher's `teacher_kd_loss` forward (its gradient is computed there too: the
    losses differentiate block by block and hand the buffered gradient to backward)."""
    import importlib

    acc: dict[str, float] = {}
    undo = []

    def timed(label, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0

        return wrapper

    for label, (mod, attr) in SEGMENTS.items():
        owner = importlib.import_module(mod)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        undo.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, timed(label, owner.__dict__[name]))
    try:
        rec: dict[str, dict[str, list[float]]] = {n: {} for n in trainers}
        for i in range(len(next(iter(own.values())))):
            for name, tr in trainers.items():
                acc.clear()
                back = tr.accelerator.backward
                tr.accelerator.backward = timed("backward", back)
                try:
                    total = step_once(tr, own[name][i])
                finally:
                    del tr.accelerator.backward  # the instance attribute; the class's method again
                if i >= warmup:
                    for k in ["step", *SEGMENTS, "backward"]:
                        rec[name].setdefault(k, []).append(total if k == "step" else acc.get(k, 0.0))
    finally:
        for owner, name, fn in undo:
            setattr(owner, name, fn)
    return {n: {k: statistics.median(v) * 1e3 for k, v in r.items()} for n, r in rec.items()}


# ---- setup --------------------------------------------------------------------------------------


def setup(args):
    from datasets import Dataset  # noqa: F401  (the trainer imports it anyway; keep import cost out of timing)

    from xtoken.mini.config import ModelSize
    from xtoken.mini.models import build_model, keep_ids_for, restrict_tokenizer

    torch.set_num_threads(1)
    full = {k: load_tokenizer(k) for k in ("llama", "qwen3", "phi")}
    n_rows = args.batch * (args.steps + args.warmup)
    texts = corpus_texts(n_rows + 64, min_chars=args.chars)
    local = {k: restrict_tokenizer(tok, keep_ids_for(texts, tok)) for k, tok in full.items()}
    s_tok, s_l2f = local["llama"]
    W = {
        k: build_projection(full["llama"], full[k]).restrict(
            s_l2f, local[k][1], student_tok=s_tok, teacher_tok=local[k][0]
        )
        for k in ("qwen3", "phi")
    }
    print("vocabularies: " + ", ".join(f"{k} {len(v[1])}" for k, v in local.items()) + " ids")

    tsize = ModelSize(128, 4, 4)
    student = build_model("student", ModelSize(64, 2, 4), len(s_l2f), s_tok, seed=0)
    teachers = {
        "qwen": Teacher(
            "qwen",
            build_model("qwen3", tsize, len(local["qwen3"][1]), local["qwen3"][0], seed=1),
            local["qwen3"][0],
            "p_kl",
            projection=W["qwen3"],
        ),
        "llama": Teacher("llama", build_model("llama", tsize, len(s_l2f), s_tok, seed=2), s_tok, "kl"),
        "phi": Teacher(
            "phi",
            build_model("phi", tsize, len(local["phi"][1]), local["phi"][0], seed=3),
            local["phi"][0],
            "h_kl",
            projection=W["phi"],
        ),
    }
    rows = [{"text": t} for t in texts[:n_rows]]
    chunks = [rows[i : i + args.batch] for i in range(0, n_rows, args.batch)]
    # one collator with every teacher: each trainer reads only its own teachers' entries of the same batch
    col_all = DistillCollator(s_tok, list(teachers.values()), max_length=args.max_length)
    col_all(chunks[0])  # first call builds each tokenizer's byte table (once per process)
    batches = [col_all(c) for c in chunks]
    return s_tok, student, teachers, chunks, batches


def collate_ms(s_tok, teachers, chunks, max_length, repeats=3) -> float:
    col = DistillCollator(s_tok, teachers, max_length=max_length)
    col(chunks[0])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for c in chunks:
            col(c)
        times.append((time.perf_counter() - t0) / len(chunks))
    return statistics.median(times) * 1e3


# ---- the benchmark ------------------------------------------------------------------------------

PAIRS = {"llama": "qwen+llama", "phi": "qwen+phi"}  # second teacher -> the two-teacher setting


def bench(args) -> dict:
    torch.manual_seed(0)
    s_tok, student, teachers, chunks, batches = setup(args)
    seq = statistics.mean(float(b["attention_mask"].sum()) / args.batch for b in batches)
    tseq = {
        n: statistics.mean(float(b["teachers"][n]["attention_mask"].sum()) / args.batch for b in batches)
        for n in teachers
    }
    print(
        f"batch {args.batch}, tokens/sample: student {seq:.1f}, " + ", ".join(f"{n} {v:.1f}" for n, v in tseq.items())
    )
    settings = {
        "ce": [],
        "qwen": ["qwen"],
        "llama": ["llama"],
        "phi": ["phi"],
        "qwen+llama": ["qwen", "llama"],
        "qwen+phi": ["qwen", "phi"],
    }

    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(
            dynamic_kd_scale=args.dynamic_kd_scale,
            max_length=args.max_length,
            loss_chunk_size=args.loss_chunk_size,
            teacher_weighting=args.weighting,
        )
        trainers = {
            name: make_trainer(copy.deepcopy(student), s_tok, [teachers[n] for n in names], tmp, **kw)
            for name, names in settings.items()
        }
        fwd = {f"fwd_{n}": teachers[n] for n in teachers}
        # each setting's batches hold only its own teachers' entries (same tensors, nothing re-collated)
        own = {
            name: [{**b, "teachers": {n: b["teachers"][n] for n in names}} for b in batches]
            for name, names in settings.items()
        }
        # round-robin, step by step: every setting sees batch i before any sees batch i + 1
        per_rep = []
        for rep in range(args.repeats):
            times: dict[str, list[float]] = {k: [] for k in [*settings, *fwd]}
            for i, batch in enumerate(batches):
                for name, tr in trainers.items():
                    t = step_once(tr, own[name][i])
                    if i >= args.warmup:
                        times[name].append(t)
                for name, teacher in fwd.items():
                    t = forward_once(teacher, batch)
                    if i >= args.warmup:
                        times[name].append(t)
            per_rep.append({k: statistics.median(v) for k, v in times.items()})
            print(
                f"  repeat {rep + 1}/{args.repeats}: "
                + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in per_rep[-1].items())
                + " ms"
            )
        # the second teachers' loss ops alone (fwd + bwd on student-shaped random logits), after the rest
        vocab = student.config.vocab_size
        kd_op = {
            n: statistics.median(
                time_kd_op(teachers[n], batches, vocab, "cpu", args.loss_chunk_size, warmup=args.warmup)
                for _ in range(args.repeats)
            )
            for n in ("qwen", *PAIRS)
        }

        seg = segments({k: trainers[k] for k in ("qwen", *PAIRS.values())}, own, args.warmup)

        # peak memory: one step of each setting (second step of the trainer: optimizer state exists)
        peak = {}
        for name, tr in trainers.items():
            peak[name] = statistics.median(peak_extra_mb(lambda: step_once(tr, own[name][-1])) for _ in range(3))
        for name, teacher in fwd.items():
            peak[name] = statistics.median(peak_extra_mb(lambda: forward_once(teacher, batches[-1])) for _ in range(3))

    collate = {"qwen": collate_ms(s_tok, [teachers["qwen"]], chunks, args.max_length)}
    for second, pair in PAIRS.items():
        collate[pair] = collate_ms(s_tok, [teachers["qwen"], teachers[second]], chunks, args.max_length)

    med = {k: statistics.median(r[k] for r in per_rep) for k in per_rep[0]}
    out = {
        "mode": "mini-cpu",
        "batch": args.batch,
        "student_tokens_per_seq": seq,
        "teacher_tokens_per_seq": tseq,
        "weighting": args.weighting,
        "dynamic_kd_scale": args.dynamic_kd_scale,
        "loss_chunk_size": args.loss_chunk_size,
        "repeats": args.repeats,
        "steps": args.steps,
        "step_ms": {k: v * 1e3 for k, v in med.items()},
        "kd_loss_op_ms": {k: v * 1e3 for k, v in kd_op.items()},
        "collate_ms": collate,
        "peak_extra_mb": peak,
        "segments_ms": seg,
        "pairs": {},
        "target": TARGET,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
    T1 = med["qwen"]
    for second, pair in PAIRS.items():
        F2, T2, L2 = med[f"fwd_{second}"], med[pair], kd_op[second]
        ratios = [r[pair] / (r["qwen"] + r[f"fwd_{second}"]) for r in per_rep]
        out["pairs"][pair] = {
            "second": second,
            "second_loss": teachers[second].loss,
            "T1_ms": T1 * 1e3,
            "F2_ms": F2 * 1e3,
            "T2_ms": T2 * 1e3,
            "ratio": T2 / (T1 + F2),
            "ratio_per_repeat": ratios,
            "meets_target": T2 / (T1 + F2) <= TARGET,
            "excess_ms": (T2 - T1 - F2) * 1e3,
            "second_loss_op_ms": L2 * 1e3,
            "glue_ms": (T2 - T1 - F2 - L2) * 1e3,
            "ratio_with_collation": (T2 + collate[pair] / 1e3) / (T1 + collate["qwen"] / 1e3 + F2),
            "additivity": T2 / (T1 + med[second] - med["ce"]),
        }

    print(
        f"\n== two-teacher step vs one teacher + the second forward (CPU, 1 thread, live teachers, "
        f"weighting {args.weighting}, dynamic_kd_scale {args.dynamic_kd_scale}; medians) =="
    )
    print(f"  {'setting':12s} {'ms/step':>9s} {'peak MB':>8s}")
    for k in [*settings, *fwd]:
        print(f"  {k:12s} {med[k] * 1e3:9.1f} {peak[k]:8.1f}")
    print(
        "  loss op alone (fwd + bwd): "
        + ", ".join(f"{n} ({teachers[n].loss}) {v * 1e3:.1f} ms" for n, v in kd_op.items())
    )
    print("  collation per batch: " + ", ".join(f"{k} {v:.1f} ms" for k, v in collate.items()))
    print(
        f"\n  {'pair':11s} {'T1':>7s} {'F2':>7s} {'T2':>7s} {'T2/(T1+F2)':>11s} {'per repeat':>17s} "
        f"{'excess':>7s} {'= L2':>6s} {'+ glue':>7s} {'w/ collate':>10s}"
    )
    for pair, r in out["pairs"].items():
        print(
            f"  {pair:11s} {r['T1_ms']:7.1f} {r['F2_ms']:7.1f} {r['T2_ms']:7.1f} {r['ratio']:11.3f} "
            f"{min(r['ratio_per_repeat']):8.3f}-{max(r['ratio_per_repeat']):.3f} {r['excess_ms']:7.1f} "
            f"{r['second_loss_op_ms']:6.1f} {r['glue_ms']:7.1f} {r['ratio_with_collation']:10.3f}  "
            f"{'meets' if r['meets_target'] else 'MISSES'} <= {TARGET}"
        )
    print("  (ms; excess = T2 - T1 - F2; L2 = the second teacher's loss op alone; glue = the rest)")
    print(
        "\n  instrumented pass (ms per step, medians; "
        "kd_loss_ops = every teacher's teacher_kd_loss, gradient included):"
    )
    cols = ["step", *SEGMENTS, "backward"]
    print(f"  {'setting':11s}" + "".join(f"{c:>16s}" for c in cols))
    for name, r in seg.items():
        print(f"  {name:11s}" + "".join(f"{r[c]:16.2f}" for c in cols))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--chars", type=int, default=200, help="characters per sample (joined arithmetic items)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per repeat (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--weighting", default="static", choices=["static", "ce", "entropy", "max_prob"])
    p.add_argument("--no-dynamic-kd-scale", dest="dynamic_kd_scale", action="store_false")
    p.add_argument("--loss-chunk-size", type=int, default=None)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    out = bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
