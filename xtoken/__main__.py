"""Command line: `python -m xtoken {build-w, audit, reproduce}`.

    python -m xtoken build-w --student meta-llama/Llama-3.2-1B --teacher Qwen/Qwen3-4B -o W.safetensors
    python -m xtoken audit   --student meta-llama/Llama-3.2-1B --teacher Qwen/Qwen3-4B microsoft/Phi-4-mini-instruct
    python -m xtoken reproduce --scale mini --out runs/mini
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _build_w(args) -> int:
    from .projection import build_projection
    from .tokenizers import load_tokenizer

    s_tok, t_tok = load_tokenizer(args.student), load_tokenizer(args.teacher)
    t0 = time.perf_counter()
    W = build_projection(s_tok, t_tok, max_span=args.max_span, beta=args.beta, gamma=args.gamma, top_k=args.top_k)
    seconds = time.perf_counter() - t0
    path = W.save(args.output)
    summary = dict(W.summary(), student=args.student, teacher=args.teacher, file=str(path),
                   build_seconds=round(seconds, 2),
                   command=" ".join(["python -m xtoken build-w"] + sys.argv[2:]))
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def _audit(args) -> int:
    import pandas as pd

    from .audit import coverage_audit
    from .tokenizers import load_tokenizer

    s_tok = load_tokenizer(args.student)
    tables = []
    for teacher in args.teacher:
        audit = coverage_audit(s_tok, load_tokenizer(teacher))
        choice, reason = audit.recommend()
        print(f"\n{args.student} -> {teacher}\n{audit.table.to_string(index=False)}\nrecommend: {choice}: {reason}")
        tables.append(audit.table.assign(teacher=teacher, recommend=choice))
    if args.csv:
        pd.concat(tables).to_csv(args.csv, index=False)
    return 0


def _reproduce(args) -> int:
    from .pipeline import reproduce
    return reproduce(scale=args.scale, out=args.out, start=args.start, results=args.results, work=args.work)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xtoken", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build-w", help="build the projection matrix W for a student/teacher tokenizer pair",
                       description="Build W (two passes, top-k, row normalization) and save it as safetensors. "
                                   "Names: the paper's models (rebuilt offline), any Hub id, or a local tokenizer dir.")
    b.add_argument("--student", required=True, help="student tokenizer (e.g. meta-llama/Llama-3.2-1B)")
    b.add_argument("--teacher", required=True, help="teacher tokenizer (e.g. Qwen/Qwen3-4B)")
    b.add_argument("-o", "--output", required=True, help="where to write W (.safetensors)")
    b.add_argument("--summary", help="also write the summary JSON here")
    b.add_argument("--max-span", type=int, default=4, help="skip re-tokenizations longer than this (default 4)")
    b.add_argument("--beta", type=float, default=0.9, help="weight of the first sub-token (default 0.9)")
    b.add_argument("--gamma", type=float, default=0.1, help="decay per sub-token (default 0.1)")
    b.add_argument("--top-k", type=int, default=4, help="entries kept per row (default 4)")
    b.set_defaults(func=_build_w)

    a = sub.add_parser("audit", help="coverage audit (Table 8) and the P-KL / H-KL recommendation",
                       description="Count per category of student token how many fall in GOLD's strict common set "
                                   "and in H-KL's W-widened set, and recommend P-KL or H-KL.")
    a.add_argument("--student", required=True)
    a.add_argument("--teacher", required=True, nargs="+")
    a.add_argument("--csv", help="write the tables to this CSV")
    a.set_defaults(func=_audit)

    r = sub.add_parser("reproduce", help="run notebooks 01-05 with papermill",
                       description="Execute the reproduction notebooks in order with papermill, writing executed "
                                   "copies and results. Stops at the first failing cell and names it.")
    r.add_argument("--scale", choices=["smoke", "mini", "paper"], default="mini")
    r.add_argument("--out", default=None, help="folder for executed notebooks (default: notebooks/ in place for mini, runs/<scale>/notebooks otherwise)")
    r.add_argument("--results", default=None, help="folder for results (default: results/ for mini, runs/<scale>/results otherwise)")
    r.add_argument("--work", default=None, help="folder for models, caches and per-run JSON (default runs/<scale>)")
    r.add_argument("--start", default=None, help="resume from this notebook (e.g. 03 or 03_distillation)")
    r.set_defaults(func=_reproduce)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
