"""Command line: `python -m xtoken {build-w, audit, reproduce}`.

    python -m xtoken build-w --student meta-llama/Llama-3.2-1B --teacher Qwen/Qwen3-4B -o W.safetensors
    python -m xtoken audit   --student meta-llama/Llama-3.2-1B --teacher Qwen/Qwen3-4B microsoft/Phi-4-mini-instruct
    python -m xtoken reproduce --scale mini --out runs/mini

Errors print one line, `error: ...`, and exit with status 2; `--traceback` (or XTOKEN_TRACEBACK=1) shows
the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path


def _output_file(path: str | None, flag: str) -> Path | None:
    """Make the folder an output file goes into, before any work, so the work is never lost at the end."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file name inside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _check_build_args(args) -> None:
    # the rules build_projection enforces, checked before the tokenizers load (seconds to minutes)
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (entries kept per row), got {args.top_k}")
    if args.max_span < 1:
        raise ValueError(f"--max-span must be >= 1 (sub-tokens per re-tokenization), got {args.max_span}")
    if not args.beta > 0:
        raise ValueError(f"--beta must be > 0 (weight of the first sub-token), got {args.beta}")
    if not 0 < args.gamma < 1:
        raise ValueError(f"--gamma must be in (0, 1) (decay per sub-token), got {args.gamma}")


def _build_w(args) -> int:
    from .projection import build_projection
    from .tokenizers import load_tokenizer

    _check_build_args(args)
    _output_file(args.output, "-o/--output")
    summary_file = _output_file(args.summary, "--summary")
    s_tok, t_tok = load_tokenizer(args.student), load_tokenizer(args.teacher)
    t0 = time.perf_counter()
    W = build_projection(s_tok, t_tok, max_span=args.max_span, beta=args.beta, gamma=args.gamma, top_k=args.top_k)
    seconds = time.perf_counter() - t0
    path = W.save(args.output)
    summary = dict(
        W.summary(),
        student=args.student,
        teacher=args.teacher,
        file=str(path),
        build_seconds=round(seconds, 2),
        command=" ".join(["python -m xtoken build-w"] + sys.argv[2:]),
    )
    if summary_file:
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def _audit(args) -> int:
    import pandas as pd

    from .audit import coverage_audit
    from .tokenizers import load_tokenizer

    csv_file = _output_file(args.csv, "--csv")
    s_tok = load_tokenizer(args.student)
    tables = []
    for teacher in args.teacher:
        audit = coverage_audit(s_tok, load_tokenizer(teacher))
        choice, reason = audit.recommend()
        print(f"\n{args.student} -> {teacher}\n{audit.table.to_string(index=False)}\nrecommend: {choice}: {reason}")
        tables.append(audit.table.assign(teacher=teacher, recommend=choice))
    if csv_file:
        pd.concat(tables).to_csv(csv_file, index=False)
    return 0


def _reproduce(args) -> int:
    from .pipeline import reproduce

    return reproduce(
        scale=args.scale,
        out=args.out,
        start=args.start,
        results=args.results,
        work=args.work,
        notebooks_dir=args.notebooks,
        parameters=dict(args.parameter),
        on_policy=args.on_policy,
    )


def _paper_smoke(args) -> int:
    from .standins import paper_smoke

    return paper_smoke(args.root, nproc=args.nproc, out=args.out, start=args.start)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parameter(text: str) -> tuple[str, object]:
    """NAME=VALUE with VALUE read as YAML (3 -> int, 1e-3 -> float, [a, b] -> list, true -> bool, else str),
    as papermill's -p / -y read theirs."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME a Python identifier, got {text!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a YAML value ({err.problem})") from None
    if isinstance(parsed, str) and _FLOAT.fullmatch(parsed.strip()):
        parsed = float(parsed)  # YAML 1.1 wants a dot in 1.0e-3; papermill's -p takes 1e-3 as a float
    return name.strip(), parsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m xtoken",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "build-w",
        help="build the projection matrix W for a student/teacher tokenizer pair",
        description="Build W (two passes, top-k, row normalization) and save it as safetensors. "
        "Names: the paper's models (rebuilt offline), any Hub id, or a local tokenizer dir.",
    )
    b.add_argument("--student", required=True, help="student tokenizer (e.g. meta-llama/Llama-3.2-1B)")
    b.add_argument("--teacher", required=True, help="teacher tokenizer (e.g. Qwen/Qwen3-4B)")
    b.add_argument("-o", "--output", required=True, help="where to write W (.safetensors)")
    b.add_argument("--summary", help="also write the summary JSON here")
    b.add_argument("--max-span", type=int, default=4, help="skip re-tokenizations longer than this (default 4)")
    b.add_argument("--beta", type=float, default=0.9, help="weight of the first sub-token (default 0.9)")
    b.add_argument("--gamma", type=float, default=0.1, help="decay per sub-token (default 0.1)")
    b.add_argument("--top-k", type=int, default=4, help="entries kept per row (default 4)")
    b.set_defaults(func=_build_w)

    a = sub.add_parser(
        "audit",
        help="coverage audit (Table 8) and the P-KL / H-KL recommendation",
        description="Count per category of student token how many fall in GOLD's strict common set "
        "and in H-KL's W-widened set, and recommend P-KL or H-KL.",
    )
    a.add_argument("--student", required=True)
    a.add_argument("--teacher", required=True, nargs="+")
    a.add_argument("--csv", help="write the tables to this CSV")
    a.set_defaults(func=_audit)

    r = sub.add_parser(
        "reproduce",
        help="run notebooks 01-05 with papermill (--on-policy: then 06)",
        description="Execute the reproduction notebooks in order with papermill, writing executed "
        "copies and results. Stops at the first failing cell and names it.",
    )
    r.add_argument("--scale", choices=["smoke", "mini", "paper"], default="mini")
    r.add_argument(
        "--out",
        default=None,
        help="folder for executed notebooks (default: notebooks/ in place for mini, runs/<scale>/notebooks otherwise)",
    )
    r.add_argument(
        "--results",
        default=None,
        help="folder for results (default: results/ for mini, runs/<scale>/results otherwise)",
    )
    r.add_argument("--work", default=None, help="folder for models, caches and per-run JSON (default runs/<scale>)")
    r.add_argument("--start", default=None, help="resume from this notebook (e.g. 03 or 03_distillation)")
    r.add_argument(
        "-p",
        "--parameter",
        action="append",
        type=_parameter,
        default=[],
        metavar="NAME=VALUE",
        help="extra papermill parameter for the notebooks that declare NAME; VALUE is read as YAML (repeatable)",
    )
    r.add_argument(
        "--on-policy",
        action="store_true",
        help="also run notebook 06, the on-policy experiment (beyond the paper, its own budget: ~8 min at mini "
        "scale), after 01-05; with --start 06 alone, on the workspace 01-05 left",
    )
    r.add_argument(
        "--notebooks",
        default=None,
        help="folder of the notebooks to run (default: notebooks/ of the clone this package runs from)",
    )
    r.set_defaults(func=_reproduce)

    ps = sub.add_parser(
        "paper-smoke",
        help="the paper-scale path end to end on offline stand-ins (CPU)",
        description="Build random-weight stand-ins of the paper's checkpoints (real classes and "
        "vocabularies) in a Hugging Face cache layout, a local corpus and local tasks; run "
        "notebooks 03-05 at scale='paper' on them (2 steps per setting), then one run under "
        "torchrun with --nproc processes (gloo).",
    )
    ps.add_argument("--root", default="runs/paper-smoke", help="folder for the stand-ins, runs and results")
    ps.add_argument("--out", default=None, help="folder for the executed notebooks (default <root>/notebooks)")
    ps.add_argument("--nproc", type=int, default=2, help="processes of the torchrun check (1: skip it)")
    ps.add_argument("--start", default="03", help="first notebook (default 03)")
    ps.set_defaults(func=_paper_smoke)

    # on the main parser and on every subcommand, so it may come before or after the subcommand's name
    p.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    for command in sub.choices.values():
        command.add_argument(
            "--traceback",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback of an error (or set XTOKEN_TRACEBACK=1)",
        )

    args = p.parse_args(argv)
    if args.traceback or os.environ.get("XTOKEN_TRACEBACK", "") not in ("", "0"):
        return args.func(args)
    from .projection import ProjectionMismatch
    from .tokenizers import TokenizerNotFound

    try:
        return args.func(args)
    except (TokenizerNotFound, ProjectionMismatch, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
