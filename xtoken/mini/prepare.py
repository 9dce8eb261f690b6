"""What the grid reads, built once per work dir: the corpus and vocabularies, the teachers, the base student,
each pair's restricted W and each teacher's cache; `prepare` runs them (and early grid runs) as one DAG."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .config import MiniConfig
from .corpus import SKILLS, load_corpus, make_corpus, save_corpus, write_task_files
from .diagnostics import _probe, numeral_mass
from .models import FAMILY_TOKENIZER, LocalVocab, build_model, keep_ids_for, load_model, save_model
from .pool import _logged, _pool_dag, _pool_map, _threads
from .runs import _run_job
from .settings import TEACHER_LABEL, TEACHERS, Setting
from .training import _load_w, _projection_path, evaluate_model, load_vocabs, train_model


def build_corpus(cfg: MiniConfig, out_dir) -> dict:
    """Corpus -> ``out/corpus`` (Arrow), ``out/tasks/*.jsonl``, ``out/vocab/<family>/``, ``out/config.json``.

    The restricted vocabularies are the ids of the *training* texts (+ numerals 0..999, specials); the
    vocabulary check then covers the test split as well, so a test word unseen in training raises.
    """
    with _logged(Path(out_dir) / "corpus.log"):
        return _build_corpus(cfg, out_dir)


def _build_corpus(cfg: MiniConfig, out_dir) -> dict:
    from xtoken import load_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dd = make_corpus(cfg)
    train_texts = list(dd["train"]["text"])
    full = {name: load_tokenizer(name) for name in ("llama", "qwen3", "phi")}
    keep = {name: keep_ids_for(train_texts, tok) for name, tok in full.items()}
    from .corpus import check_vocab

    check_vocab(dd, full, {k: set(v) for k, v in keep.items()})
    save_corpus(dd, out)
    tasks = write_task_files(dd, out)
    sizes = {}
    for name, tok in full.items():
        v = LocalVocab(name, tok, keep[name])
        v.save(out / "vocab" / name)
        sizes[name] = v.size
    (out / "config.json").write_text(cfg.to_json())
    return {
        "corpus": str(out / "corpus"),
        "tasks": tasks,
        "vocab_sizes": sizes,
        "n_train": len(dd["train"]),
        "n_test": len(dd["test"]),
    }


def _mixed(dataset, mix: dict | None, seed: int):
    """Rows of ``dataset`` kept per skill with probability mix[skill] (default: all)."""
    if not mix:
        return dataset
    import random

    rng = random.Random(seed)
    keep = [i for i, s in enumerate(dataset["skill"]) if rng.random() < float(mix.get(s, 1.0))]
    return dataset.select(keep)


def _train_one_teacher(args):
    with _logged(Path(args[1]) / "teachers" / args[2] / "train.log"):
        return _train_one_teacher_logged(args)


def _train_one_teacher_logged(args):
    cfg_d, out_dir, name = args
    _threads()
    cfg = MiniConfig.from_dict(cfg_d)
    out = Path(out_dir)
    vocab = load_vocabs(out)[FAMILY_TOKENIZER[name]]
    ds = _mixed(load_corpus(out)["train"], cfg.teacher_mix.get(name), cfg.seed)
    model = build_model(name, cfg.teacher_size(name), vocab.size, vocab.tok, seed=cfg.seed + 100)
    d = out / "teachers" / name
    info = train_model(
        model,
        vocab.tok,
        ds,
        d / "trainer",
        steps=cfg.teacher_steps,
        batch=cfg.teacher_batch,
        lr=cfg.teacher_lr,
        seed=cfg.seed,
        max_length=cfg.max_length,
        warmup_ratio=cfg.warmup_ratio,
    )
    save_model(model, vocab, d, extra={"role": "teacher", "family": name})
    scores = evaluate_model(d, out, cfg)
    import pandas as pd

    items = pd.read_csv(d / "items.csv")
    arith = items[items.skill == "arithmetic"]
    row = {
        "teacher": name,
        "label": TEACHER_LABEL[name],
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": vocab.size,
        **{s: scores[s] for s in SKILLS},
        # exact match per arithmetic kind: where each teacher's advantage lies
        **{f"arithmetic: {k}": float(v) for k, v in arith.groupby("kind").exact_match.mean().sort_index().items()},
        "train_wall_s": info["wall_s"],
        "eval_wall_s": scores["eval_wall_s"],
        "final_loss": info["final"].get("loss"),
    }
    (d / "result.json").write_text(json.dumps(dict(row, log_history=info["log_history"]), indent=1))
    return row


def train_teachers(cfg: MiniConfig, out_dir, names=TEACHERS, workers=None):
    """Train (CE only) and evaluate each teacher; DataFrame with per-skill exact match and wall time."""
    import pandas as pd

    rows = _pool_map(
        _train_one_teacher, [(cfg.to_dict(), str(out_dir), n) for n in names], workers or cfg.workers, desc="teachers"
    )
    return pd.DataFrame(rows)


def train_base_student(cfg: MiniConfig, out_dir) -> dict:
    """The "no distillation" student: a short CE pre-training of the tiny Llama student; evaluated."""
    with _logged(Path(out_dir) / "base_student" / "train.log"):
        return _train_base_student(cfg, out_dir)


def _train_base_student(cfg: MiniConfig, out_dir) -> dict:
    _threads()
    out = Path(out_dir)
    vocab = load_vocabs(out)["llama"]
    ds = load_corpus(out)["train"]
    model = build_model("student", cfg.student, vocab.size, vocab.tok, seed=cfg.seed + 7)
    d = out / "base_student"
    info = train_model(
        model,
        vocab.tok,
        ds,
        d / "trainer",
        steps=cfg.base_steps,
        batch=cfg.student_batch,
        lr=cfg.base_lr,
        seed=cfg.seed,
        max_length=cfg.max_length,
        warmup_ratio=cfg.warmup_ratio,
    )
    save_model(model, vocab, d, extra={"role": "base_student"})
    scores = evaluate_model(d, out, cfg)
    res = {
        "setting": "base",
        **{s: scores[s] for s in SKILLS},
        "train_wall_s": info["wall_s"],
        "eval_wall_s": scores["eval_wall_s"],
        "numeral_mass": numeral_mass(model, vocab.tok, _probe(out, cfg)),
    }
    (d / "result.json").write_text(json.dumps(res, indent=1))
    return res


def _full_projection(student_tok, teacher_tok):
    """W on the full vocabularies, built once per tokenizer pair and kept under ``$XTOKEN_CACHE``
    (a Llama x o200k build takes minutes on a loaded CPU; every corpus reuses it)."""
    from xtoken.projection import Projection, build_projection
    from xtoken.tokenizers import _cache_dir, tokenizer_fingerprint

    p = (
        _cache_dir().parent
        / "projections"
        / (f"{tokenizer_fingerprint(student_tok)}-{tokenizer_fingerprint(teacher_tok)}.safetensors")
    )
    if p.exists():
        return Projection.load(p, student_tok, teacher_tok)
    w = build_projection(student_tok, teacher_tok)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    w.save(tmp)
    tmp.replace(p)
    return w


def _cache_one(job):
    with _logged(Path(job[1]) / "cache" / f"{job[2]}.log"):
        return _cache_one_logged(job)


def _cache_one_logged(job):
    cfg_d, out_dir, name = job
    from xtoken.train import DistillCollator, Teacher, TeacherCache

    _threads()
    cfg = MiniConfig.from_dict(cfg_d)
    out = Path(out_dir)
    t0 = time.time()
    vocabs = load_vocabs(out)
    student, v = vocabs["llama"], vocabs[FAMILY_TOKENIZER[name]]
    if name != "llama":
        p = _projection_path(out, name)
        if not p.exists():
            w = _full_projection(student.full_tok, v.full_tok).restrict(
                student.local_to_full, v.local_to_full, student_tok=student.tok, teacher_tok=v.tok
            )
            w.save(p)
    model = load_model(out / "teachers" / name)[0]
    teacher = Teacher(
        name,
        model,
        v.tok,
        loss="kl" if name == "llama" else "uld",
        projection=None if name == "llama" else _load_w(out, name),
    )
    (out / "cache").mkdir(parents=True, exist_ok=True)
    TeacherCache.build(
        teacher,
        load_corpus(out)["train"],
        DistillCollator(student.tok, [teacher], cfg.max_length),
        batch_size=64,
        path=out / "cache" / f"{name}.npy",
    )
    return name, time.time() - t0


def build_teacher_caches(cfg: MiniConfig, out_dir, names=TEACHERS, workers=None) -> dict:
    """Once: the restricted W of each cross-tokenizer pair (built on full ids, then restricted) and each
    teacher's log-probs over the training split (`xtoken.train.TeacherCache`, memory-mapped under
    ``out/cache``), one teacher per worker. Returns {teacher: seconds}."""
    return dict(
        _pool_map(
            _cache_one, [(cfg.to_dict(), str(out_dir), n) for n in names], workers or cfg.workers, desc="teacher caches"
        )
    )


def w_groups(out_dir, teacher: str = "qwen3") -> dict:
    """{numeral: W's top teacher token of its student token} for a teacher's restricted W in ``out_dir``
    (`xtoken.mini.items.w_first_token_groups`)."""
    from .items import w_first_token_groups

    v = load_vocabs(out_dir)
    return w_first_token_groups(_load_w(out_dir, teacher), v["llama"].tok, v[FAMILY_TOKENIZER[teacher]].tok)


def _prepare_job(job):
    """One job of `prepare`'s pool: train a teacher, the base student, cache a teacher, or one grid run
    (`_pool_dag` starts each only when what it reads is there)."""
    cfg_d, out_dir, kind, arg = job
    if kind == "teacher":
        return _train_one_teacher((cfg_d, out_dir, arg))
    if kind == "base":
        return train_base_student(MiniConfig.from_dict(cfg_d), out_dir)
    if kind == "cache":
        return _cache_one((cfg_d, out_dir, arg))
    return _run_job((cfg_d, out_dir) + tuple(arg))


def prepare(cfg: MiniConfig, out_dir, runs=None, seeds=None) -> dict:
    """Corpus, teachers, base student and teacher caches in ``out_dir``, each stage skipped when its
    output is already there for the same config (so notebooks 03 and 04 share one preparation).

    ``runs``: grid settings (`Setting`, each for ``seeds``, default ``cfg.seeds``) to run in the same pool:
    a run starts as soon as the base student and its teachers' caches exist, on a worker that would
    otherwise wait for the last teacher (3 teachers on 2 workers leave one free for a round). Their
    results are saved as `run_grid` saves them, so a later `run_grid` reads them back.

    Returns {"teachers": DataFrame of teacher scores, "base": the base student's result, "timings"}.
    A different config in an existing ``out_dir`` is refused rather than silently mixed."""
    import pandas as pd

    out = Path(out_dir)
    t = {}
    cfg_file = out / "config.json"
    if cfg_file.exists():
        if json.loads(cfg_file.read_text()) != json.loads(cfg.to_json()):
            raise ValueError(f"{out} holds a miniature built with another config; use another work_dir or delete it")
    else:
        t0 = time.time()
        build_corpus(cfg, out)
        t["corpus_s"] = time.time() - t0
    # one pool for the rest, in priority order: teachers (the critical path), base student, caches, runs
    jobs, keys, deps = [], [], []

    def add(kind, arg, key, needs=()):
        jobs.append((cfg.to_dict(), str(out), kind, arg))
        keys.append(key)
        deps.append(set(needs))

    for n in TEACHERS:
        if not (out / "teachers" / n / "result.json").exists():
            add("teacher", n, ("teacher", n))
    if not (out / "base_student" / "result.json").exists():
        add("base", "", ("base",))
    for n in TEACHERS:
        if not (out / "cache" / f"{n}.npy").exists():
            add("cache", n, ("cache", n), [("teacher", n)])
    n_prep = len(jobs)
    runs = [s if isinstance(s, Setting) else Setting.from_dict(s) for s in runs or ()]
    for s in sorted(runs, key=lambda s: -s.relative_cost()):  # costliest first (stable)
        for seed in cfg.seeds if seeds is None else seeds:
            if not (out / "runs" / s.name / f"seed{seed}" / "result.json").exists():
                add(
                    "run",
                    (s.to_dict(), seed),
                    ("run", s.name, seed),
                    [("base",)] + [("cache", name) for name, _, _ in s.teachers],
                )
    if jobs:
        t0 = time.time()
        desc = "teachers, base student, teacher caches" + (f", {len(jobs) - n_prep} runs" if len(jobs) > n_prep else "")
        _pool_dag(_prepare_job, jobs, keys, deps, cfg.workers, desc=desc)
        t["models_s"] = time.time() - t0
    rows = []
    for n in TEACHERS:
        r = json.loads((out / "teachers" / n / "result.json").read_text())
        r.pop("log_history", None)
        rows.append(r)
    base = json.loads((out / "base_student" / "result.json").read_text())
    return {"teachers": pd.DataFrame(rows), "base": base, "timings": t}
