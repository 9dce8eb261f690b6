"""The grid's runs: each (setting, seed) from the same base checkpoint, spread over worker processes that keep
what every run reads (vocabularies, corpus, teachers, W, caches, alignments) between runs."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from .config import MiniConfig
from .corpus import load_corpus
from .diagnostics import NumeralMassCallback, _probe, digit_split_fraction, learned_w_summary
from .models import FAMILY_TOKENIZER, load_model, save_model
from .pool import _logged, _pool_map, _threads
from .settings import Setting
from .training import _load_w, evaluate_model, load_vocabs, train_model

_WORKER: dict = {}


def _worker_state(out_dir):
    """Per-process cache of what every run reads (vocabularies, corpus, teachers, W, caches, and the
    alignments of the corpus rows: every run of a worker sees the same texts)."""
    key = str(out_dir)
    if _WORKER.get("key") != key:
        from xtoken.align import AlignmentMemo

        out = Path(out_dir)
        vocabs = load_vocabs(out)
        corpus = load_corpus(out)
        _WORKER.clear()
        _WORKER.update(key=key, vocabs=vocabs, corpus=corpus, teachers={}, memo=AlignmentMemo())
    return _WORKER


def _worker_teacher(st, out_dir, name: str) -> dict:
    """A teacher's model, tokenizer, cache and W, read on first use (a worker may start runs before
    the last teacher exists)."""
    if name not in st["teachers"]:
        from xtoken.train import TeacherCache

        out = Path(out_dir)
        st["teachers"][name] = {
            "model": load_model(out / "teachers" / name)[0],
            "tok": st["vocabs"][FAMILY_TOKENIZER[name]].tok,
            "cache": TeacherCache.load(out / "cache" / f"{name}.npy"),
            "w": _load_w(out, name) if name != "llama" else None,
        }
    return st["teachers"][name]


def _training_rows(st: dict, data: str):
    """The rows a setting trains on (`xtoken.mini.settings.DATA`), built once per worker. The rows keep their
    ``idx`` (the teachers' caches are indexed by it) and ``text``; "arithmetic_prompts" adds ``prompt``."""
    key = f"rows:{data}"
    if key not in st:
        train = st["corpus"]["train"]
        if data == "corpus":
            st[key] = train
        elif data == "arithmetic_prompts":
            arith = train.filter(lambda r: r["skill"] == "arithmetic")
            st[key] = arith.add_column("prompt", [q + "\n" for q in arith["question"]])
        else:
            raise ValueError(f"unknown data {data!r}")
    return st[key]


def run_one(cfg: MiniConfig, out_dir, setting: Setting, seed: int, *, evaluate=True) -> dict:
    """One grid run: base student -> ``cfg.student_steps`` steps of ``setting`` -> result.json."""
    from xtoken.train import Teacher

    _threads()
    out = Path(out_dir)
    st = _worker_state(out)
    student = st["vocabs"]["llama"]
    ds = _training_rows(st, setting.data)
    if "base" not in st:  # read once per worker; every run starts from a copy
        st["base"] = load_model(out / "base_student")[0]
    model = copy.deepcopy(st["base"])
    teachers = []
    for name, loss, weight in setting.teachers:
        t = _worker_teacher(st, out, name)
        teachers.append(
            Teacher(name, t["model"], t["tok"], loss=loss, projection=t["w"], weight=float(weight), cache=t["cache"])
        )
    probe = _probe(out, cfg)
    cb = NumeralMassCallback(student.tok, probe, cfg.diag_every)
    d = out / "runs" / setting.name / f"seed{seed}"
    ce_weight, kd_weight, dynamic = setting.loss_weights(cfg)
    t0 = time.time()
    info = train_model(
        model,
        student.tok,
        ds,
        d / "trainer",
        steps=cfg.student_steps,
        batch=cfg.student_batch,
        lr=cfg.student_lr,
        seed=seed,
        max_length=cfg.max_length,
        teachers=teachers,
        warmup_ratio=cfg.warmup_ratio,
        callbacks=[cb],
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        dynamic_kd_scale=dynamic,
        teacher_weighting=setting.weighting,
        log_every=cfg.diag_every,
        learn_projection=setting.learn_projection,
        projection_lr=cfg.projection_lr,
        lmbda=setting.lmbda,
        on_policy_ce=setting.on_policy_ce,
        max_new_tokens=cfg.max_gen_toks,
        memo=st["memo"],
    )
    train_wall = time.time() - t0
    save_model(model, student, d, extra={"role": "student", "setting": setting.to_dict(), "seed": seed})
    learned = {}
    for name, lp in info["learned"].items():  # learned W: saved in the W format, rows that moved most
        lp.save(d / f"learned_W_{name}.safetensors")
        learned[name] = learned_w_summary(lp, student, st["vocabs"][FAMILY_TOKENIZER[name]])
    res = {
        "setting": setting.name,
        "label": setting.label or setting.name,
        "seed": seed,
        "setting_spec": setting.to_dict(),
        "config": cfg.to_dict(),
        "final": info["final"],
        "log_history": info["log_history"],
        "train_wall_s": train_wall,
        "numeral_mass_history": cb.history,
        "numeral_mass": cb.history[-1][1] if cb.history else None,
        "learned_w": learned,
    }
    prompts = [
        q + "\n" for q, s in zip(st["corpus"]["test"]["question"], st["corpus"]["test"]["skill"]) if s == "arithmetic"
    ][:64]
    res.update(digit_split_fraction(model, student.tok, prompts, max_new_tokens=cfg.max_gen_toks))
    if evaluate:
        res.update(evaluate_model(d, out, cfg))
    res["wall_s"] = time.time() - t0
    (d / "result.json").write_text(json.dumps(res, indent=1, default=float))
    return res


def _run_job(job):
    cfg_d, out_dir, setting_d, seed = job
    with _logged(Path(out_dir) / "runs" / setting_d["name"] / f"seed{seed}" / "train.log"):
        return run_one(MiniConfig.from_dict(cfg_d), out_dir, Setting.from_dict(setting_d), seed)


def run_grid(cfg: MiniConfig, settings, seeds=None, out_dir=".", *, workers=None, skip_done=True):
    """Every (setting, seed) from the same base checkpoint, spread over ``workers`` 1-thread processes.

    Returns a DataFrame, one row per run (setting, label, seed, arithmetic, knowledge, numeral_mass,
    digit_split, final ce / kd, wall times). Finished runs (result.json present) are read back.
    Workers are spawned processes: from a script, call this under ``if __name__ == "__main__":``
    (notebooks need nothing).
    """
    import pandas as pd

    seeds = list(cfg.seeds if seeds is None else seeds)
    out = Path(out_dir)
    done, todo = [], []  # done: a result per (setting, seed) in order; todo: (position, cost, job)
    for s in settings:
        s = s if isinstance(s, Setting) else Setting.from_dict(s)
        for seed in seeds:
            f = out / "runs" / s.name / f"seed{seed}" / "result.json"
            if skip_done and f.exists():
                done.append(json.loads(f.read_text()))
            else:
                todo.append((len(done), s.relative_cost(), (cfg.to_dict(), str(out), s.to_dict(), seed)))
                done.append(None)
    todo.sort(key=lambda x: -x[1])  # costliest first (stable)
    results = _pool_map(
        _run_job,
        [job for _, _, job in todo],
        workers or cfg.workers,
        desc=f"{len(todo)} runs ({len(done) - len(todo)} done before)",
    )
    for (i, _, _), r in zip(todo, results):
        done[i] = r
    keep = [
        "setting",
        "label",
        "seed",
        "arithmetic",
        "knowledge",
        "arithmetic_200",
        "numeral_mass",
        "digit_split",
        "single_digit",
        "train_wall_s",
        "eval_wall_s",
        "wall_s",
    ]
    rows = []
    for r in done:
        row = {k: r.get(k) for k in keep}
        row.update({f"final_{k}": v for k, v in r.get("final", {}).items() if k == "ce" or k.startswith("kd")})
        rows.append(row)
    return pd.DataFrame(rows)


def results_table(df, metrics=("arithmetic", "knowledge", "numeral_mass", "digit_split", "single_digit")):
    """Mean and std over seeds per setting (rows in the order settings first appear)."""
    order = list(dict.fromkeys(df["setting"]))
    g = df.groupby("setting")[list(metrics)].agg(["mean", "std"])
    g[("seeds", "n")] = df.groupby("setting")["seed"].nunique()
    return g.loc[order]
