"""Loss cost: forward + backward time and peak memory, each loss in a fresh subprocess, one core.

    python benchmarks/bench_losses.py [--n 1024] [--chunk-size 64]

Blocks: each loss's own default sizing (on CPU every block tensor within 2^23 elements: kl 65 positions per
block, the cross-tokenizer losses 32-55 chunks, capped by the teacher's token rows); --chunk-size forces one
block size on all of them.

--no-page-faults runs every subprocess with glibc told never to mmap a buffer nor give freed heap back
(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=1 TiB): after the warm-up no temporary is page-faulted, so the
times are the arithmetic alone. The default is the allocator a user gets.

Random logits with the real vocabulary widths: student 128,256 (Llama-3.2), teacher 151,936
(Qwen3's padded logits; 151,669 real tokens). N student positions of real Llama/Qwen token
sequences of prose with numbers, aligned by xtoken.align; W is the real Llama -> Qwen projection.

  kl          xtoken.losses.kl_loss, same tokenizer: student logits vs another [N, 128,256] tensor (the reference)
  p_kl        P-KL, W-consistent teacher merge
  gold        GOLD (strict common set + exact sorted-L1 ULD)
  gold_top64  GOLD with the ULD sorted L1 restricted to the top 64 + remainder mass (approximation)
  h_kl        H-KL (top-1 common set + exact sorted-L1 ULD)
  trl_gold    TRL 1.16.0 ULDLoss, hybrid (matched KL with beta=0 + unmatched sorted L1), its byte-offset groups
  trl_uld     TRL 1.16.0 ULDLoss, plain ULD

Peak memory: ru_maxrss after the loss's first forward+backward minus ru_maxrss once the inputs exist
(the subprocess is fresh, so the delta is the loss's own peak extra memory). Time: the best of that
run and --repeats more, default two (TRL: that run only, its per-group Python loops take minutes). Ratios are
against kl measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

W_PATH = "/tmp/xtoken_bench_w_llama_qwen.safetensors"
NAMES = ["kl", "p_kl", "gold", "gold_top64", "h_kl", "trl_gold", "trl_uld"]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def texts(n_tokens: int, llama, qwen):
    sys.path.insert(0, os.path.dirname(__file__))
    from bench_align import numeric, prose

    rng = random.Random(0)
    text = " ".join(prose(rng, 60) + " " + numeric(rng, 6) for _ in range(n_tokens // 60 + 2))
    s_ids = llama(text)["input_ids"][:n_tokens]  # with Llama's BOS
    text = llama.decode(s_ids[1:])
    t_ids = qwen(text)["input_ids"]
    return s_ids, t_ids


def run_one(name: str, n: int, chunk_size: int, repeats: int = 2) -> dict:
    import torch

    torch.set_num_threads(1)
    from xtoken import load_tokenizer
    from xtoken.align import align
    from xtoken.losses import gold_loss, h_kl_loss, kl_loss, p_kl_loss
    from xtoken.projection import Projection

    llama, qwen = load_tokenizer("llama"), load_tokenizer("qwen3")
    s_ids, t_ids = texts(n, llama, qwen)
    a = align(s_ids, t_ids, llama, qwen)
    W = Projection.load(W_PATH) if name not in ("kl", "trl_uld", "trl_gold") else None
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, len(s_ids), 128256, generator=g).requires_grad_(True)
    if name == "kl":
        teacher = torch.randn(1, len(s_ids), 128256, generator=g)
    else:
        teacher = torch.randn(1, len(t_ids), 151936, generator=g)
    kw = dict(chunk_size=chunk_size, teacher_vocab_size=len(qwen))
    if name.startswith("trl"):
        from trl.experimental.gold.gold_config import GOLDConfig
        from trl.experimental.gold.gold_trainer import ULDLoss
        from trl.experimental.utils import piece_byte_len

        cfg = GOLDConfig(
            output_dir="/tmp/xtoken_bench_trl",
            use_cpu=True,
            bf16=False,
            report_to="none",
            use_uld_loss=True,
            use_extended_uld=True,
            uld_use_hybrid_loss=name == "trl_gold",
            uld_hybrid_matched_weight=1.0,
            uld_hybrid_unmatched_weight=1.0,
            beta=0.0,
            uld_skip_student_eos=False,
            uld_skip_teacher_eos=False,
        )
        trl = ULDLoss(cfg, student_tokenizer=llama, teacher_tokenizer=qwen)

        def offsets(tok, ids):
            out, cum = [], 0
            for piece in tok.convert_ids_to_tokens(ids):
                nb = 0 if piece in tok.all_special_tokens else piece_byte_len(piece)
                out.append((cum, cum + nb))
                cum += nb
            return torch.tensor([out])

        s_lab, t_lab = torch.tensor([[-100] + s_ids[1:]]), torch.tensor([t_ids])
        s_off, t_off = offsets(llama, s_ids), offsets(qwen, t_ids)
        fn = lambda: trl(
            student,
            teacher,
            s_lab,
            t_lab,
            torch.tensor([s_ids]),
            torch.tensor([t_ids]),
            student_byte_offsets=s_off,
            teacher_byte_offsets=t_off,
        )
    else:
        fn = {
            "kl": lambda: kl_loss(student, teacher, chunk_size=chunk_size)[0],
            "p_kl": lambda: p_kl_loss(student, teacher, [a], W, **kw)[0],
            "gold": lambda: gold_loss(student, teacher, [a], W, **kw)[0],
            "gold_top64": lambda: gold_loss(student, teacher, [a], W, uld_top_k=64, **kw)[0],
            "h_kl": lambda: h_kl_loss(student, teacher, [a], W, **kw)[0],
        }[name]
    base = rss_mb()
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    first = time.perf_counter() - t0
    peak = rss_mb() - base
    times = [first]
    for _ in range(0 if name.startswith("trl") else repeats):  # TRL's Python loops take minutes: one run
        student.grad = None
        t0 = time.perf_counter()
        fn().backward()
        times.append(time.perf_counter() - t0)
    return {
        "name": name,
        "n_student": len(s_ids),
        "n_teacher": len(t_ids),
        "chunks": len(a),
        "time_s": min(times),
        "first_s": first,
        "peak_mb": peak,
        "loss": float(loss),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--one")
    ap.add_argument("--only", nargs="*", default=NAMES)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls after the first (the best is kept)")
    ap.add_argument("--no-page-faults", action="store_true", help="glibc: no mmap, no trimming (see above)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.n, args.chunk_size, args.repeats)))
        return
    if not os.path.exists(W_PATH):
        from xtoken import load_tokenizer
        from xtoken.projection import build_projection

        build_projection(load_tokenizer("llama"), load_tokenizer("qwen3")).save(W_PATH)
    rows = {}
    for name in args.only:
        cmd = [sys.executable, __file__, "--one", name, "--n", str(args.n), "--repeats", str(args.repeats)]
        cmd += [] if args.chunk_size is None else ["--chunk-size", str(args.chunk_size)]
        env = dict(os.environ)
        if args.no_page_faults:
            env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if not line:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        rows[name] = json.loads(line[-1])
    ref = rows.get("kl")
    r0 = next(iter(rows.values()))
    print(
        f"N student positions {r0['n_student']}, teacher {r0['n_teacher']}; "
        f"chunk_size {args.chunk_size or 'default'}; one thread; "
        f"allocator {'glibc, no mmap / no trim' if args.no_page_faults else 'default'}"
    )
    print(f"{'loss':11} {'fwd+bwd s':>9} {'x kl':>6} | {'peak MB':>8} {'x kl':>6} | {'value':>10}")
    for name, r in rows.items():
        tr = r["time_s"] / ref["time_s"] if ref else float("nan")
        mr = r["peak_mb"] / ref["peak_mb"] if ref else float("nan")
        print(f"{name:11} {r['time_s']:9.2f} {tr:6.2f} | {r['peak_mb']:8.0f} {mr:6.2f} | {r['loss']:10.4f}")


if __name__ == "__main__":
    main()
