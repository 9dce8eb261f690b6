"""Evaluation cost per student: `xtoken.evaluate` vs lm-eval loading everything itself, same run, one core.

    python benchmarks/bench_evaluate.py [--items 160] [--repeats 3]

The miniature evaluates ~70 students per default run, each a separate `evaluate` call on a saved model
directory. A tiny Llama-tokenized student (the real restricted Llama tokenizer, hidden 64 / 2 layers,
random weights: the cost measured is lm-eval's, not the answers') is saved once and scored on both
mini tasks over ``--items`` synthetic questions each. Two ways, alternated, steady state (each warmed
up once):
  lm-eval   `HFLM(pretrained=dir)` + `simple_evaluate` as a plain call: the tokenizer parsed from
            the directory and torch's environment report (pip and conda in subprocesses) on every call,
            ``doc_to_target`` as the template ``{{answer}}`` (compiled per document)
  xtoken    `xtoken.evaluate.evaluate`: the same call with the directory's tokenizer and the environment
            report kept per process, ``doc_to_target: answer`` read as a field
Both must give identical scores (0 here: random weights; `tests/test_evaluate.py` checks identical
generations on a trained model); the script checks it and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def setup(tmp: Path, items: int):
    from xtoken import load_tokenizer
    from xtoken.mini.config import ModelSize
    from xtoken.mini.models import LocalVocab, build_model, keep_ids_for, save_model

    qa = [
        (
            f"Ana has {i * 7 % 1000} pens. Ana gets {i % 9 + 1} more. How many pens does Ana have now?",
            str(i * 7 % 1000 + i % 9 + 1),
        )
        for i in range(items)
    ]
    texts = [f"{q}\n#### {a}\n\n" for q, a in qa]
    vocab = LocalVocab("llama", load_tokenizer("llama"), keep_ids_for(texts, load_tokenizer("llama")))
    torch.manual_seed(0)
    save_model(build_model("student", ModelSize(64, 2, 4), vocab.size, vocab.tok, seed=0), vocab, tmp / "model")
    for task in ("arithmetic", "knowledge"):
        with open(tmp / f"{task}_test.jsonl", "w") as f:
            for q, a in qa:
                f.write(json.dumps({"question": q, "answer": a}) + "\n")
    return tmp / "model"


def plain_lm_eval(model_dir, data_dir):
    """One evaluation the way lm-eval runs it by itself (no per-process reuse)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from xtoken.evaluate import MINI_TASKS, TASK_DIR, task_configs

    cfgs = task_configs(MINI_TASKS, data_dir, 48)
    for c in cfgs:
        c["doc_to_target"] = "{{answer}}"
    lm = HFLM(pretrained=str(model_dir), batch_size=64, device="cpu", dtype="float32", add_bos_token=True)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=cfgs,
        task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        bootstrap_iters=1000,
        verbosity="ERROR",
    )
    return sorted((t, m["exact_match,strict-match"]) for t, m in res["results"].items())


def ours(model_dir, data_dir):
    from xtoken.evaluate import evaluate

    df = evaluate(model_dir, data_dir=data_dir, batch_size=64, max_gen_toks=48)
    return sorted(zip(df["task"], df["value"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = setup(Path(tmp), args.items)
        fns = {"lm-eval": plain_lm_eval, "xtoken": ours}
        scores = {name: fn(model_dir, tmp) for name, fn in fns.items()}  # warm-up (imports, first load)
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                assert fn(model_dir, tmp) == scores[name]
                times[name].append(time.perf_counter() - t0)
    assert scores["lm-eval"] == scores["xtoken"], scores
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.items} items per task, 2 tasks, one thread; scores identical: {scores['xtoken']}")
    for k, v in times.items():
        print(f"  {k:8s} {t[k]:6.2f} s per evaluation (median of {len(v)}: {', '.join(f'{x:.2f}' for x in v)})")
    print(f"  xtoken / lm-eval: {t['xtoken'] / t['lm-eval']:.2f}")


if __name__ == "__main__":
    main()
