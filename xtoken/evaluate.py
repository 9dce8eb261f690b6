"""Evaluate a saved model directory with lm-eval; tidy results.

    evaluate(model_dir, ["xtoken_mini_arithmetic", "xtoken_mini_knowledge"], data_dir=corpus_dir / "tasks")
    evaluate(model_dir, {"gsm8k": 5, "arc_challenge": 25}, device="cuda")    # paper scale: shots per task

The miniature's tasks are lm-eval YAML tasks in ``xtoken/tasks/`` (generate_until, exact match on
the ``#### answer``) over the local JSONL test files that `xtoken.mini.corpus.write_task_files`
writes; ``data_dir`` points them at one corpus. Everything runs offline (HF_DATASETS_OFFLINE /
HF_HUB_OFFLINE are set when ``offline=True``).

Overhead: the model is loaded once per call (an `HFLM` built here and passed to
`lm_eval.simple_evaluate`, which is what ``model="hf"`` would build) and every task runs in that one
call with batched greedy generation; pass ``lm=`` to reuse an already loaded `HFLM` across calls.
Two fixed costs that cannot change within a process are paid once per process (the miniature evaluates
~70 students per run, 3.3 s each, half of it these two): the tokenizer of a local model directory, loaded
exactly as `HFLM` would load it and kept by the content of its files (every miniature student has the same
one: 1.2 s each, mostly parsing tokenizer.json), and torch's environment report that lm-eval adds to its
results (`collect_env` lists pip packages in subprocesses: 0.6 s each).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from pathlib import Path

__all__ = ["evaluate", "task_configs", "TASK_DIR", "MINI_TASKS", "load_lm", "save_raw_results"]

TASK_DIR = Path(__file__).parent / "tasks"
MINI_TASKS = ("xtoken_mini_arithmetic", "xtoken_mini_knowledge")


def _set_offline():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def task_configs(tasks, data_dir=None, max_gen_toks=None) -> list:
    """Task specs for `simple_evaluate`: our YAML tasks as dicts pointed at ``data_dir``, others by name."""
    import yaml

    out = []
    for t in tasks:
        p = TASK_DIR / f"{t}.yaml"
        if not p.exists():
            out.append(t)
            continue
        cfg = yaml.safe_load(p.read_text())
        cfg.pop("tag", None)
        if data_dir is None:
            raise ValueError(f"task {t} reads local files: pass data_dir (the corpus' tasks/ folder)")
        files = copy.deepcopy(cfg["dataset_kwargs"]["data_files"])
        for split, name in files.items():
            f = Path(data_dir) / name
            if not f.exists():
                raise FileNotFoundError(f"{f} (write it with xtoken.mini.corpus.write_task_files)")
            files[split] = str(f.resolve())
        cfg["dataset_kwargs"]["data_files"] = files
        if max_gen_toks:
            cfg["generation_kwargs"]["max_gen_toks"] = int(max_gen_toks)
        out.append(cfg)
    return out


_TOKENIZERS: dict = {}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _local_tokenizer(model_dir, **kwargs):
    """The tokenizer of a local model directory, ``AutoTokenizer.from_pretrained(model_dir, **kwargs)``, loaded
    once per process per content of its files (None for a hub id: HFLM loads it). lm-eval only sets a missing
    pad token on it (the same on every reuse) and restores the padding side it changes."""
    d = Path(model_dir)
    if not d.is_dir():
        return None
    h = hashlib.sha1(repr(sorted(kwargs.items())).encode())
    for name in _TOKENIZER_FILES:
        if (d / name).exists():
            h.update(name.encode() + (d / name).read_bytes())
    key = h.hexdigest()
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(d), **kwargs)
    return _TOKENIZERS[key]


def load_lm(model_dir, *, batch_size=64, device="cpu", dtype="float32", max_length=None, offline=True):
    """One `lm_eval` HFLM over a model directory (load once, evaluate many tasks)."""
    if offline:
        _set_offline()
    from lm_eval.models.huggingface import HFLM

    kw = dict(
        pretrained=str(model_dir), batch_size=batch_size, device=device, dtype=dtype, add_bos_token=True
    )  # the tokenizer's own default specials, as in training
    if max_length:
        kw["max_length"] = max_length
    # what HFLM._create_tokenizer would load (revision "main", no remote code, fast, add_bos_token)
    tok = _local_tokenizer(model_dir, revision="main", trust_remote_code=False, use_fast=True, add_bos_token=True)
    if tok is not None:
        kw["tokenizer"] = tok
    return HFLM(**kw)


_ENV_REPORT: list = []


@contextlib.contextmanager
def _env_report_once():
    """lm-eval adds torch's environment report to every result (``collect_env.get_pretty_env_info``, which
    runs pip and conda in subprocesses); within one process it is the same report, so compute it once."""
    import torch.utils.collect_env as ce

    original = ce.get_pretty_env_info

    def once():
        if not _ENV_REPORT:
            _ENV_REPORT.append(original())
        return _ENV_REPORT[0]

    ce.get_pretty_env_info = once
    try:
        yield
    finally:
        ce.get_pretty_env_info = original


def evaluate(
    model_dir,
    tasks=MINI_TASKS,
    *,
    data_dir=None,
    limit=None,
    batch_size=64,
    device="cpu",
    num_fewshot=None,
    max_gen_toks=None,
    lm=None,
    log_samples=False,
    return_raw=False,
    offline=True,
    dtype="float32",
):
    """Run lm-eval on ``model_dir``; return a tidy DataFrame (task, filter, metric, value, stderr, n, num_fewshot).

    ``tasks``: names of lm-eval tasks (``gsm8k``...) and/or of our YAML tasks (``xtoken_mini_*``,
    ``xtoken_standin_*``, which need ``data_dir``), as a list, or as a dict ``{task: number of shots}``
    (the paper scale: ``{"gsm8k": 5, "arc_challenge": 25, ...}``): tasks that share a shot count run in
    one `simple_evaluate` call, each with its own count. With a list, ``num_fewshot=None`` keeps each
    task's own default. ``device``: where the model runs ("cpu", "cuda", "cuda:1"...), ``dtype`` its
    weights' type; ``offline=False`` lets lm-eval fetch the built-in tasks' datasets from the Hub.
    ``return_raw=True`` also returns lm-eval's results dict (for a dict of tasks: the calls merged, their
    per-call configs under ``"calls"``); save it with `save_raw_results`.
    """
    import pandas as pd

    if offline:
        _set_offline()

    if isinstance(tasks, str):
        tasks = [tasks]
    groups = _fewshot_groups(tasks, num_fewshot)
    if lm is None:
        lm = load_lm(model_dir, batch_size=batch_size, device=device, dtype=dtype, offline=offline)
    raws = [_simple_evaluate(lm, names, shots, data_dir, limit, max_gen_toks, log_samples) for shots, names in groups]
    res = raws[0] if len(raws) == 1 else _merge_raw(raws)
    shots_of = {t: shots for shots, names in groups for t in names}
    rows = []
    for task, metrics in res["results"].items():
        n = res.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            se = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "task": task,
                    "filter": filt,
                    "metric": metric,
                    "value": float(value),
                    "stderr": float(se) if isinstance(se, (int, float)) else float("nan"),
                    "n": n,
                    "num_fewshot": shots_of.get(task, _config_shots(res, task)),
                }
            )
    df = pd.DataFrame(rows, columns=["task", "filter", "metric", "value", "stderr", "n", "num_fewshot"])
    return (df, res) if return_raw else df


def _fewshot_groups(tasks, num_fewshot) -> list[tuple[int | None, list[str]]]:
    """[(shots, [task, ...]), ...]: one group per shot count (a dict of tasks), or one group (a list)."""
    if not isinstance(tasks, dict):
        return [(num_fewshot, list(tasks))]
    groups: dict = {}
    for task, shots in tasks.items():
        if shots is not None and (not isinstance(shots, int) or shots < 0):
            raise ValueError(f"task {task!r}: the number of shots must be an int >= 0 or None, not {shots!r}")
        groups.setdefault(shots, []).append(task)
    return list(groups.items())


def _simple_evaluate(lm, tasks, num_fewshot, data_dir, limit, max_gen_toks, log_samples) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # indexing lm-eval's ~10k built-in task YAMLs costs tens of seconds: skip it when not needed
    ours = all((TASK_DIR / f"{t}.yaml").exists() for t in tasks)
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=not ours)
    with _env_report_once():
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=task_configs(tasks, data_dir, max_gen_toks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=tm,
            log_samples=log_samples,
            bootstrap_iters=1000,
            verbosity="ERROR",
        )


def _config_shots(res: dict, task: str):
    return (res.get("configs", {}).get(task) or {}).get("num_fewshot")


def _merge_raw(raws: list[dict]) -> dict:
    """lm-eval results of several calls as one dict: per-task sections merged, each call's config kept."""
    out = {
        "calls": [{k: r.get(k) for k in ("config", "git_hash", "date", "total_evaluation_time_seconds")} for r in raws]
    }
    for key in (
        "results",
        "groups",
        "group_subtasks",
        "configs",
        "versions",
        "n-shot",
        "higher_is_better",
        "n-samples",
        "samples",
    ):
        merged: dict = {}
        for r in raws:
            merged.update(r.get(key) or {})
        out[key] = merged
    return out


def save_raw_results(raw: dict, path) -> Path:
    """lm-eval's results dict as JSON (what `lm_eval --output_path` writes, samples included if logged)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=1, default=str))
    return path
