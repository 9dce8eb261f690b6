"""The paper-scale grid: checks before anything loads (`preflight`), every (setting, seed) run in-process or under
torchrun (`run_grid`), the notebooks' configs (`grid_config`, `on_policy_config`), the base student's scores
(`prepare`), and the per-run entry point of ``python -m xtoken.paper LAUNCH.json`` (`main`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .config import PaperConfig, settings_by_name
from .data import HubUnavailable, _in_hub_cache, _local_or_hub, fetch_hint, load_paper_tokenizer, logit_width
from .run import run_setting, task_scores


def preflight(cfg: PaperConfig, settings) -> None:
    """Refuse a grid before any model loads: unknown teachers, W files for another tokenizer pair, and
    (offline) every checkpoint or dataset missing from the local cache, all named in one message."""
    from ..mini.settings import Setting

    problems = []
    keys = {k for s in settings for k, _, _ in (s.teachers if isinstance(s, Setting) else [])}
    for k in sorted(keys - set(cfg.teachers)):
        problems.append(
            f"setting uses teacher {k!r}, which PaperConfig.teachers does not name (known: {', '.join(cfg.teachers)})"
        )
    for k, path in cfg.projections.items():
        if not Path(path).exists():
            problems.append(f"W file of teacher {k!r} not found: {path}")
    if cfg.offline or os.environ.get("HF_HUB_OFFLINE") == "1":
        for name in [cfg.student] + [cfg.teachers[k] for k in sorted(keys & set(cfg.teachers))]:
            if not Path(name).expanduser().exists() and not _in_hub_cache(name):
                problems.append(
                    f"model {name!r} is not in the local cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}):\n"
                    + fetch_hint(name)
                )
        datasets = {s.data for s in settings if isinstance(s, Setting)} or {"corpus"}
        for data in sorted(datasets):
            name = cfg.prompt_dataset if data == "arithmetic_prompts" else cfg.dataset
            if not Path(name).expanduser().exists() and not _in_hub_cache(name, "dataset"):
                problems.append(
                    f"dataset {name!r} is not a local path nor in the local cache:\n" + fetch_hint(name, "dataset")
                )
    if problems:
        raise HubUnavailable("the paper-scale grid cannot start:\n- " + "\n- ".join(problems))
    if cfg.projections:  # W files: refused for another tokenizer pair before any model loads
        from ..projection import Projection

        s_tok = load_paper_tokenizer(cfg.student)
        for k, path in cfg.projections.items():
            Projection.load(path, s_tok, load_paper_tokenizer(cfg.teachers[k]))


def _launch(cfg: PaperConfig, setting, seed: int, work_dir) -> None:
    """One run under ``torchrun --nproc_per_node N`` (``python -m xtoken.paper``), its output streamed."""
    spec = {"config": cfg.to_dict(), "setting": setting.to_dict(), "seed": seed, "work_dir": str(work_dir)}
    f = Path(work_dir) / "runs" / setting.name / f"seed{seed}" / "launch.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(spec, indent=1))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.nproc_per_node}",
        "-m",
        "xtoken.paper",
        str(f),
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_grid(cfg: PaperConfig, settings, seeds=None, work_dir="runs/paper"):
    """Every (setting, seed) not yet finished, then one row per run as the miniature's grid gives them:
    setting, label, seed, a column per task (fraction correct), final losses, wall times."""
    import pandas as pd

    settings = settings_by_name(settings)
    seeds = cfg.seeds if seeds is None else seeds
    preflight(cfg, settings)
    work = Path(work_dir)
    rows = []
    todo = [(s, seed) for s in settings for seed in seeds]
    for i, (s, seed) in enumerate(todo, 1):
        f = work / "runs" / s.name / f"seed{seed}" / "result.json"
        if not f.exists():
            print(f"[{i}/{len(todo)}] {s.name} seed {seed}", flush=True)
            if cfg.nproc_per_node > 1:
                _launch(cfg, s, seed, work)
            else:
                run_setting(cfg, s, seed, work)
        r = json.loads(f.read_text())
        row = {k: r.get(k) for k in ("setting", "label", "seed")}
        row.update({t: r.get(t) for t in cfg.tasks})
        row.update({f"final_{k}": v for k, v in r.get("final", {}).items() if k in ("ce", "kd") or k.startswith("kd_")})
        row.update({k: r.get(k) for k in ("train_wall_s", "eval_wall_s", "wall_s")})
        row["tokens_per_s"] = r.get("record", {}).get("tokens_per_s")
        rows.append(row)
    return pd.DataFrame(rows)


def grid_config(standin_root=None, **overrides) -> PaperConfig:
    """The notebooks' paper-scale config: the paper's setup, or with ``standin_root`` the stand-ins' (the
    notebook sets ``HF_HOME`` to ``<standin_root>/hf_home`` before importing anything). ``None`` overrides
    are ignored (a notebook parameter left at its default)."""
    overrides = {k: (tuple(v) if k == "seeds" else v) for k, v in overrides.items() if v is not None}
    if standin_root:
        return PaperConfig.preset("standin", root=standin_root, **overrides)
    return PaperConfig.preset("paper", **overrides)


# notebook 06 at paper scale: three passes over GSM8k's 7,473 training questions at the paper's global batch of 64
ON_POLICY_STEPS = 350


def on_policy_config(standin_root=None, steps=None, **overrides) -> PaperConfig:
    """Notebook 06's paper-scale config: `grid_config`, with ``ON_POLICY_STEPS`` steps unless ``steps`` is given
    or the stand-ins run (their preset's 2), and the paper's warm-up share (250 of 5,000 steps: 5%) of them."""
    cfg = grid_config(standin_root, steps=steps, **overrides)
    if not standin_root:
        cfg.steps = int(steps or ON_POLICY_STEPS)
        cfg.warmup_steps = round(0.05 * cfg.steps)
        cfg.validate()
    return cfg


def prepare(cfg: PaperConfig, work_dir) -> dict:
    """What the grid's tables need besides the runs: the teachers (key, checkpoint, logit width) and the
    "no distillation" row, the student checkpoint scored as it is (once; ``<work>/base/result.json``)."""
    import pandas as pd

    from ..evaluate import evaluate, save_raw_results

    if cfg.offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    teachers = pd.DataFrame(
        [{"teacher": k, "checkpoint": v, "logit width": logit_width(v)} for k, v in cfg.teachers.items()]
    )
    f = Path(work_dir) / "base" / "result.json"
    if not f.exists():
        import torch

        t0 = time.time()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        df, raw = evaluate(
            _local_or_hub(cfg.student),
            cfg.tasks,
            data_dir=cfg.task_data_dir,
            limit=cfg.eval_limit,
            batch_size=cfg.eval_batch_size,
            device=device,
            offline=cfg.offline,
            dtype="bfloat16" if cfg.bf16 and device == "cuda" else "float32",
            return_raw=True,
        )
        save_raw_results(raw, f.parent / "lm_eval_results.json")
        f.write_text(
            json.dumps(
                {
                    "setting": "base",
                    "label": "base student (no distillation)",
                    **task_scores(df),
                    "eval_wall_s": round(time.time() - t0, 2),
                },
                indent=1,
            )
        )
    return {"teachers": teachers, "base": json.loads(f.read_text())}


def main(argv=None) -> int:
    """``python -m xtoken.paper LAUNCH.json``: one run on this process (torchrun starts one per GPU)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m xtoken.paper LAUNCH.json   (written by xtoken.paper.run_grid)", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    from ..mini.settings import Setting

    run_setting(
        PaperConfig.from_dict(spec["config"]), Setting.from_dict(spec["setting"]), int(spec["seed"]), spec["work_dir"]
    )
    return 0
