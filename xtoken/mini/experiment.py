"""The miniature experiment: every function the notebooks call (no logic lives in notebooks).

    cfg = MiniConfig.preset("mini")
    paths = build_corpus(cfg, out)                    # corpus (Arrow), lm-eval JSONL, restricted vocabularies
    teachers = train_teachers(cfg, out)               # llama ("3B"), qwen3, phi: DataFrame of accuracies
    base = train_base_student(cfg, out)               # the "no distillation" row
    build_teacher_caches(cfg, out)                    # teacher log-probs over the training split, once
    df = run_grid(cfg, SINGLE_TEACHER_SETTINGS, cfg.seeds, out)   # one row per (setting, seed)
    results_table(df)                                 # mean and std over seeds
    df2 = run_grid(cfg, multi_teacher_settings(), cfg.seeds, out) # multi-teacher: just more settings

Every training run goes through `xtoken.train.XTokenTrainer` (teachers and the base student with no
teachers = CE only). Every grid run starts from the same base checkpoint, with identical data,
steps and seeds; runs are spread over ``cfg.workers`` processes with one torch thread each.
Each run writes ``runs/<setting>/seed<k>/result.json`` (config, final losses, eval scores per
skill, diagnostics, wall time).

Diagnostics (the mechanism, Proposition 1):
  numeral_mass   the student's probability mass on multi-digit numeral tokens at positions whose
                 next token is a numeral, on a fixed probe batch, logged every ``cfg.diag_every`` steps
  digit_split    the fraction of multi-digit numbers the student generates digit by digit
"""
from __future__ import annotations

import copy
import json
import os
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import MiniConfig
from .corpus import SKILLS, all_texts, load_corpus, make_corpus, save_corpus, write_task_files
from .models import FAMILY_TOKENIZER, LocalVocab, build_model, keep_ids_for, load_model, save_model

__all__ = ["build_corpus", "load_vocabs", "train_model", "train_teachers", "train_base_student",
           "evaluate_model", "build_teacher_caches", "Setting", "SINGLE_TEACHER_SETTINGS",
           "multi_teacher_settings", "run_grid", "run_single_teacher_grid", "results_table", "learned_w_summary",
           "numeral_mass", "digit_split_fraction", "NumeralMassCallback", "TEACHERS", "time_budget", "run_all",
           "run_one"]

TEACHERS = ("llama", "qwen3", "phi")
TEACHER_LABEL = {"llama": "Llama-3.2-3B (tiny)", "qwen3": "Qwen3-4B (tiny)", "phi": "Phi-4-mini (tiny)"}


def _threads():
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextmanager
def _logged(path):
    """Send one job's console output (Trainer logs, the progress bars of lm-eval, datasets and
    transformers) to ``path``: a notebook then shows one progress bar per stage, and each model's
    log stays next to it (``train.log``). Exceptions still propagate."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, redirect_stdout(f), redirect_stderr(f):
        yield


# ---- corpus and vocabularies ---------------------------------------------------------------------

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
    return {"corpus": str(out / "corpus"), "tasks": tasks, "vocab_sizes": sizes,
            "n_train": len(dd["train"]), "n_test": len(dd["test"])}


def load_vocabs(out_dir) -> dict:
    """{family: LocalVocab} read from ``out/vocab`` (the full tokenizers load only when W is built)."""
    return {name: LocalVocab.load(Path(out_dir) / "vocab" / name) for name in ("llama", "qwen3", "phi")}


def _mixed(dataset, mix: dict | None, seed: int):
    """Rows of ``dataset`` kept per skill with probability mix[skill] (default: all)."""
    if not mix:
        return dataset
    import random
    rng = random.Random(seed)
    keep = [i for i, s in enumerate(dataset["skill"]) if rng.random() < float(mix.get(s, 1.0))]
    return dataset.select(keep)


# ---- training --------------------------------------------------------------------------------------

def train_model(model, tok, dataset, out_dir, *, steps, batch, lr, seed, max_length, teachers=(),
                warmup_ratio=0.05, callbacks=(), kd_weight=1.0, dynamic_kd_scale=False,
                teacher_weighting="static", log_every=None, learn_projection=False, projection_lr=1e-2,
                memo=None) -> dict:
    """Train ``model`` with `XTokenTrainer` for ``steps`` steps; returns log history, wall time and the
    learned W modules ({teacher: LearnableProjection}, empty unless ``learn_projection``).
    ``memo``: an `xtoken.align.AlignmentMemo` (tokenizations and alignments) shared by the runs of one worker."""
    from xtoken.train import DistillCollator, XTokenConfig, XTokenTrainer
    _threads()
    args = XTokenConfig(
        output_dir=str(out_dir), max_steps=int(steps), per_device_train_batch_size=int(batch),
        learning_rate=float(lr), lr_scheduler_type="cosine", warmup_steps=int(round(warmup_ratio * steps)), weight_decay=0.0,
        seed=int(seed), data_seed=int(seed), save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        logging_steps=log_every or max(1, steps // 10), disable_tqdm=True, loss_curve=False,
        max_length=max_length, kd_weight=kd_weight, dynamic_kd_scale=dynamic_kd_scale,
        teacher_weighting=teacher_weighting, report_to="none", learn_projection=learn_projection,
        projection_learning_rate=projection_lr)
    collator = DistillCollator(tok, list(teachers), max_length, memo=memo)
    trainer = XTokenTrainer(model=model, args=args, teachers=list(teachers), train_dataset=dataset,
                            processing_class=tok, data_collator=collator, callbacks=list(callbacks))
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    hist = [r for r in trainer.state.log_history if "loss" in r]
    return {"wall_s": wall, "log_history": hist, "final": hist[-1] if hist else {},
            "learned": trainer.learned_projections}


def evaluate_model(model_dir, out_dir, cfg: MiniConfig, limit=None) -> dict:
    """lm-eval exact match per skill {skill: value} on the held-out test split, plus the per-item scores
    (`xtoken.mini.items.score_items`: lm-eval's own greedy generations and one teacher-forced pass) written to
    ``model_dir/items.csv``; the returned dict adds per skill the solution match and the mean teacher-forced
    log-probability of the gold solution, and ``arithmetic_200`` (exact match on the first 200 arithmetic items)."""
    from xtoken.evaluate import evaluate, load_lm

    from .items import score_items
    t0 = time.time()
    lm = load_lm(model_dir, batch_size=cfg.eval_batch_size)
    df, raw = evaluate(model_dir, [f"xtoken_mini_{s}" for s in SKILLS], data_dir=Path(out_dir) / "tasks",
                       max_gen_toks=cfg.max_gen_toks, limit=limit, lm=lm, log_samples=True, return_raw=True)
    scores = {r.task.replace("xtoken_mini_", ""): r.value for r in df.itertuples()}
    t1 = time.time()
    items = score_items(lm, raw, batch=cfg.eval_batch_size)
    items.to_csv(Path(model_dir) / "items.csv", index=False)
    for s in SKILLS:
        g = items[items.skill == s]
        scores[f"{s}_solution_match"] = float(g.solution_match.mean())
        scores[f"{s}_logp_solution"] = float(g.logp_solution.mean())
    a = items[(items.skill == "arithmetic") & (items.item < 200)]
    scores["arithmetic_200"] = float(a.exact_match.mean())
    scores["items_wall_s"] = time.time() - t1
    scores["eval_wall_s"] = time.time() - t0
    return scores


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
    info = train_model(model, vocab.tok, ds, d / "trainer", steps=cfg.teacher_steps, batch=cfg.teacher_batch,
                       lr=cfg.teacher_lr, seed=cfg.seed, max_length=cfg.max_length, warmup_ratio=cfg.warmup_ratio)
    save_model(model, vocab, d, extra={"role": "teacher", "family": name})
    scores = evaluate_model(d, out, cfg)
    row = {"teacher": name, "label": TEACHER_LABEL[name], "params": sum(p.numel() for p in model.parameters()),
           "vocab": vocab.size, **{s: scores[s] for s in SKILLS}, "train_wall_s": info["wall_s"],
           "eval_wall_s": scores["eval_wall_s"], "final_loss": info["final"].get("loss")}
    (d / "result.json").write_text(json.dumps(dict(row, log_history=info["log_history"]), indent=1))
    return row


def _pool_map(fn, jobs, workers, desc=None):
    """[fn(job) for job in jobs] over ``workers`` spawned 1-thread processes (inline for one worker),
    in order, with one progress bar (``desc``) over the jobs."""
    return _pool_dag(fn, jobs, list(range(len(jobs))), [()] * len(jobs), workers, desc)


def _pool_dag(fn, jobs, keys, deps, workers, desc=None):
    """[fn(job) for job in jobs] over ``workers`` spawned 1-thread processes (inline for one worker), where
    job i starts only after the jobs whose keys are in ``deps[i]`` have finished (keys that name no job
    count as done); among the ready jobs the earliest in the list goes first. Worker processes live for
    the whole call, so per-process state (`_worker_state`) is reused by their later jobs."""
    from tqdm.auto import tqdm
    known = set(keys)
    deps = [set(d) & known for d in deps]
    results, started, done = [None] * len(jobs), set(), set()
    bar = tqdm(total=len(jobs), desc=desc, disable=desc is None or not jobs)

    def ready():
        return [i for i in range(len(jobs)) if i not in started and deps[i] <= done]

    try:
        if workers <= 1 or len(jobs) <= 1:
            while len(started) < len(jobs):
                todo = ready()
                if not todo:
                    raise ValueError("jobs with circular dependencies")
                i = todo[0]
                started.add(i)
                results[i] = fn(jobs[i])
                done.add(keys[i])
                bar.update()
            return results
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn"),
                                 initializer=_threads) as pool:
            running = {}
            while len(done) < len(jobs):
                for i in ready()[:max(0, workers - len(running))]:
                    started.add(i)
                    running[pool.submit(fn, jobs[i])] = i
                if not running:
                    raise ValueError("jobs with circular dependencies")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    i = running.pop(f)
                    results[i] = f.result()          # a failed job raises here, naming its error
                    done.add(keys[i])
                    bar.update()
        return results
    finally:
        bar.close()


def train_teachers(cfg: MiniConfig, out_dir, names=TEACHERS, workers=None):
    """Train (CE only) and evaluate each teacher; DataFrame with per-skill exact match and wall time."""
    import pandas as pd
    rows = _pool_map(_train_one_teacher, [(cfg.to_dict(), str(out_dir), n) for n in names],
                     workers or cfg.workers, desc="teachers")
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
    info = train_model(model, vocab.tok, ds, d / "trainer", steps=cfg.base_steps, batch=cfg.student_batch,
                       lr=cfg.base_lr, seed=cfg.seed, max_length=cfg.max_length, warmup_ratio=cfg.warmup_ratio)
    save_model(model, vocab, d, extra={"role": "base_student"})
    scores = evaluate_model(d, out, cfg)
    res = {"setting": "base", **{s: scores[s] for s in SKILLS}, "train_wall_s": info["wall_s"],
           "eval_wall_s": scores["eval_wall_s"], "numeral_mass": numeral_mass(model, vocab.tok, _probe(out, cfg))}
    (d / "result.json").write_text(json.dumps(res, indent=1))
    return res


# ---- diagnostics -------------------------------------------------------------------------------------

def _probe(out_dir, cfg: MiniConfig, n: int = 64) -> list[str]:
    """A fixed probe batch: the first ``n`` arithmetic test texts (full solutions)."""
    test = load_corpus(out_dir)["test"]
    return [t for t, s in zip(test["text"], test["skill"]) if s == "arithmetic"][:n]


@torch.no_grad()
def numeral_mass(model, tok, texts, vocab_size=None) -> float:
    """Mean student probability mass on multi-digit numeral tokens at positions whose next token is a
    numeral (Proposition 1: GOLD pushes this towards 0 when multi-digit numerals are uncommon)."""
    v = vocab_size or model.get_output_embeddings().weight.shape[0]
    strings = [tok.decode([i]) for i in range(v)]
    is_num = torch.tensor([s.strip().isdigit() for s in strings])
    is_multi = torch.tensor([s.strip().isdigit() and len(s.strip()) >= 2 for s in strings])
    enc = tok(texts, return_tensors="pt", padding=True)
    was = model.training
    model.eval()
    logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, :-1]
    model.train(was)
    nxt = enc.input_ids[:, 1:]
    pos = is_num[nxt.clamp(max=v - 1)] & (enc.attention_mask[:, 1:] == 1)
    p = torch.softmax(logits.float(), -1)
    mass = (p * is_multi.to(p.dtype)).sum(-1)
    return float(mass[pos].mean()) if pos.any() else float("nan")


@torch.no_grad()
def digit_split_fraction(model, tok, prompts, max_new_tokens=32, batch=32) -> dict:
    """Generate greedily for ``prompts``; among generated numbers with >= 2 digits, the fraction
    written with more than one token, i.e. digit by digit (e.g. '3','4','7') -> ``digit_split``;
    among all generated numbers, the fraction with a single digit -> ``single_digit`` (a student that
    lost its multi-digit tokens may also just write one digit where a number belongs)."""
    v = model.get_output_embeddings().weight.shape[0]
    strings = [tok.decode([i]) for i in range(v)]
    digits = [s.strip() if s.strip().isdigit() and s == s.strip() else None for s in strings]
    side = tok.padding_side
    tok.padding_side = "left"
    split = total = numbers = single = 0
    model.eval()
    try:
        for a in range(0, len(prompts), batch):
            enc = tok(prompts[a:a + batch], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            for row in out[:, enc.input_ids.shape[1]:].tolist():
                run = []
                for i in row + [-1]:
                    d = digits[i] if 0 <= i < v else None
                    if d is not None:
                        run.append(d)
                        continue
                    if run:
                        numbers += 1
                        single += len("".join(run)) == 1
                    if run and len("".join(run)) >= 2:
                        total += 1
                        split += len(run) > 1
                    run = []
    finally:
        tok.padding_side = side
    return {"digit_split": split / total if total else float("nan"), "numbers": total,
            "single_digit": single / numbers if numbers else float("nan"), "all_numbers": numbers}


def NumeralMassCallback(tok, texts, every: int):
    """A TrainerCallback logging `numeral_mass` every ``every`` steps into ``self.history``."""
    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def __init__(self):
            self.history = []

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % every == 0 or state.global_step == 1:
                self.history.append((state.global_step, numeral_mass(model, tok, texts)))
    return _CB()


# ---- the grid ----------------------------------------------------------------------------------------

@dataclass
class Setting:
    """One grid setting: a list of (teacher, loss, weight) and how the teachers' terms are weighted.

    ``teachers=[]`` is CE only (continued pre-training). Same-tokenizer teachers (llama) use ``kl``;
    cross-tokenizer ones ``gold`` | ``p_kl`` | ``h_kl`` | ``uld`` through the restricted W.
    ``learn_projection``: the P-KL teachers' W is fine-tuned with the student (``cfg.projection_lr``).
    """
    name: str
    teachers: list = field(default_factory=list)     # [(teacher name, loss, weight), ...]
    weighting: str = "static"                         # static | ce | entropy | max_prob
    label: str = ""
    learn_projection: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "teachers": [list(t) for t in self.teachers], "weighting": self.weighting,
                "label": self.label or self.name, "learn_projection": self.learn_projection}

    def relative_cost(self) -> float:
        """A run's wall time relative to a CE-only run (measured on the miniature: CE 20 s, KL teacher +4 s,
        a cross-tokenizer teacher +8-14 s, adaptive weights and learned W +1-2 s). Pools start the costliest
        runs first, so no long run is left alone at the end while the other worker idles."""
        cost = 1.0 + sum(0.2 if loss == "kl" else 0.55 for _, loss, _ in self.teachers)
        return cost + 0.05 * (self.weighting != "static") + 0.1 * self.learn_projection

    @classmethod
    def from_dict(cls, d) -> "Setting":
        return cls(d["name"], [tuple(t) for t in d["teachers"]], d.get("weighting", "static"), d.get("label", ""),
                   bool(d.get("learn_projection", False)))


SINGLE_TEACHER_SETTINGS = [
    Setting("ce_only", [], label="continued pre-training, CE only"),
    Setting("kd_llama", [("llama", "kl", 1.0)], label="same-tokenizer KD (Llama-3B)"),
    Setting("gold_qwen3", [("qwen3", "gold", 1.0)], label="GOLD (Qwen3)"),
    Setting("pkl_qwen3", [("qwen3", "p_kl", 1.0)], label="X-Token P-KL (Qwen3)"),
    Setting("pkl_learned_qwen3", [("qwen3", "p_kl", 1.0)], label="X-Token P-KL, learned W (Qwen3)",
            learn_projection=True),
    Setting("hkl_qwen3", [("qwen3", "h_kl", 1.0)], label="X-Token H-KL (Qwen3)"),
    Setting("gold_phi", [("phi", "gold", 1.0)], label="GOLD (Phi-mini)"),
    Setting("pkl_phi", [("phi", "p_kl", 1.0)], label="X-Token P-KL (Phi-mini)"),
    Setting("hkl_phi", [("phi", "h_kl", 1.0)], label="X-Token H-KL (Phi-mini)"),
]


def multi_teacher_settings(weightings=("static", "ce", "entropy", "max_prob"), teacher_scores=None) -> list:
    """The multi-teacher grid: pairs of teachers x weighting schemes.

    Phi (H-KL) + Llama (KL) is the paper's best; Phi + Qwen3 (two reasoning-heavy teachers) the
    paper's worse pair; Qwen3 (P-KL) + Llama (KL) completes the triangle; all three together last.

    Weightings: "static" = equal weights; "static_tuned" = static weights set a priori, before any
    multi-teacher run, proportional to each teacher's own held-out exact match averaged over the skills
    (``teacher_scores``: the teachers table of `prepare`, columns teacher / arithmetic / knowledge);
    "ce" | "entropy" | "max_prob" = confidence-adaptive per batch (`xtoken.multi_teacher`).
    """
    pairs = {
        "phi_hkl+llama_kl": [("phi", "h_kl", 0.5), ("llama", "kl", 0.5)],
        "phi_hkl+qwen3_pkl": [("phi", "h_kl", 0.5), ("qwen3", "p_kl", 0.5)],
        "qwen3_pkl+llama_kl": [("qwen3", "p_kl", 0.5), ("llama", "kl", 0.5)],
        "phi_hkl+qwen3_pkl+llama_kl": [("phi", "h_kl", 1 / 3), ("qwen3", "p_kl", 1 / 3), ("llama", "kl", 1 / 3)],
        "phi_gold+qwen3_gold": [("phi", "gold", 0.5), ("qwen3", "gold", 0.5)],
    }
    out = []
    for name, teachers in pairs.items():
        for w in weightings:
            if w == "static_tuned":
                if teacher_scores is None:
                    raise ValueError("static_tuned weights need teacher_scores (prepare(...)['teachers'])")
                acc = {r["teacher"]: (float(r["arithmetic"]) + float(r["knowledge"])) / 2
                       for r in teacher_scores.to_dict(orient="records")}
                total = sum(acc[t] for t, _, _ in teachers)
                tuned = [(t, loss, round(acc[t] / total if total > 0 else 1 / len(teachers), 4))   # untrained
                         for t, loss, _ in teachers]                                              # teachers: equal
                out.append(Setting(f"{name}@static_tuned", tuned, weighting="static",
                                   label=f"{name} (static weights {'/'.join(str(x[2]) for x in tuned)}, set a priori)"))
            else:
                out.append(Setting(f"{name}@{w}", teachers, weighting=w, label=f"{name} ({w} weights)"))
    return out


def _projection_path(out_dir, teacher: str) -> Path:
    return Path(out_dir) / "projections" / f"llama_to_{teacher}.safetensors"


def _full_projection(student_tok, teacher_tok):
    """W on the full vocabularies, built once per tokenizer pair and kept under ``$XTOKEN_CACHE``
    (a Llama x o200k build takes minutes on a loaded CPU; every corpus reuses it)."""
    from xtoken.projection import Projection, build_projection
    from xtoken.tokenizers import _cache_dir, tokenizer_fingerprint
    p = _cache_dir().parent / "projections" / (
        f"{tokenizer_fingerprint(student_tok)}-{tokenizer_fingerprint(teacher_tok)}.safetensors")
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
            w = _full_projection(student.full_tok, v.full_tok).restrict(student.local_to_full, v.local_to_full,
                                                                        student_tok=student.tok, teacher_tok=v.tok)
            w.save(p)
    model = load_model(out / "teachers" / name)[0]
    teacher = Teacher(name, model, v.tok, loss="kl" if name == "llama" else "uld",
                      projection=None if name == "llama" else _load_w(out, name))
    (out / "cache").mkdir(parents=True, exist_ok=True)
    TeacherCache.build(teacher, load_corpus(out)["train"], DistillCollator(student.tok, [teacher], cfg.max_length),
                       batch_size=64, path=out / "cache" / f"{name}.npy")
    return name, time.time() - t0


def build_teacher_caches(cfg: MiniConfig, out_dir, names=TEACHERS, workers=None) -> dict:
    """Once: the restricted W of each cross-tokenizer pair (built on full ids, then restricted) and each
    teacher's log-probs over the training split (`xtoken.train.TeacherCache`, memory-mapped under
    ``out/cache``), one teacher per worker. Returns {teacher: seconds}."""
    return dict(_pool_map(_cache_one, [(cfg.to_dict(), str(out_dir), n) for n in names], workers or cfg.workers,
                          desc="teacher caches"))


def _load_w(out_dir, teacher):
    from xtoken.projection import Projection
    return Projection.load(_projection_path(out_dir, teacher))


def w_groups(out_dir, teacher: str = "qwen3") -> dict:
    """{numeral: W's top teacher token of its student token} for a teacher's restricted W in ``out_dir``
    (`xtoken.mini.items.w_first_token_groups`)."""
    from .items import w_first_token_groups
    v = load_vocabs(out_dir)
    return w_first_token_groups(_load_w(out_dir, teacher), v["llama"].tok, v[FAMILY_TOKENIZER[teacher]].tok)


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
        st["teachers"][name] = {"model": load_model(out / "teachers" / name)[0],
                                "tok": st["vocabs"][FAMILY_TOKENIZER[name]].tok,
                                "cache": TeacherCache.load(out / "cache" / f"{name}.npy"),
                                "w": _load_w(out, name) if name != "llama" else None}
    return st["teachers"][name]


def run_one(cfg: MiniConfig, out_dir, setting: Setting, seed: int, *, evaluate=True) -> dict:
    """One grid run: base student -> ``cfg.student_steps`` steps of ``setting`` -> result.json."""
    from xtoken.train import Teacher
    _threads()
    out = Path(out_dir)
    st = _worker_state(out)
    student = st["vocabs"]["llama"]
    ds = st["corpus"]["train"]
    if "base" not in st:                  # read once per worker; every run starts from a copy
        st["base"] = load_model(out / "base_student")[0]
    model = copy.deepcopy(st["base"])
    teachers = []
    for name, loss, weight in setting.teachers:
        t = _worker_teacher(st, out, name)
        teachers.append(Teacher(name, t["model"], t["tok"], loss=loss, projection=t["w"], weight=float(weight),
                                cache=t["cache"]))
    probe = _probe(out, cfg)
    cb = NumeralMassCallback(student.tok, probe, cfg.diag_every)
    d = out / "runs" / setting.name / f"seed{seed}"
    t0 = time.time()
    info = train_model(model, student.tok, ds, d / "trainer", steps=cfg.student_steps, batch=cfg.student_batch,
                       lr=cfg.student_lr, seed=seed, max_length=cfg.max_length, teachers=teachers,
                       warmup_ratio=cfg.warmup_ratio, callbacks=[cb], kd_weight=cfg.kd_weight,
                       dynamic_kd_scale=cfg.dynamic_kd_scale, teacher_weighting=setting.weighting,
                       log_every=cfg.diag_every, learn_projection=setting.learn_projection,
                       projection_lr=cfg.projection_lr, memo=st["memo"])
    train_wall = time.time() - t0
    save_model(model, student, d, extra={"role": "student", "setting": setting.to_dict(), "seed": seed})
    learned = {}
    for name, lp in info["learned"].items():       # learned W: saved in the W format, rows that moved most
        lp.save(d / f"learned_W_{name}.safetensors")
        learned[name] = learned_w_summary(lp, student, st["vocabs"][FAMILY_TOKENIZER[name]])
    res = {"setting": setting.name, "label": setting.label or setting.name, "seed": seed,
           "setting_spec": setting.to_dict(), "config": cfg.to_dict(),
           "final": info["final"], "log_history": info["log_history"], "train_wall_s": train_wall,
           "numeral_mass_history": cb.history, "numeral_mass": cb.history[-1][1] if cb.history else None,
           "learned_w": learned}
    prompts = [q + "\n" for q, s in zip(st["corpus"]["test"]["question"], st["corpus"]["test"]["skill"])
               if s == "arithmetic"][:64]
    res.update(digit_split_fraction(model, student.tok, prompts, max_new_tokens=cfg.max_gen_toks))
    if evaluate:
        res.update(evaluate_model(d, out, cfg))
    res["wall_s"] = time.time() - t0
    (d / "result.json").write_text(json.dumps(res, indent=1, default=float))
    return res


def learned_w_summary(lp, student_vocab, teacher_vocab, n: int = 12) -> dict:
    """How far a learned W moved: mean/max L1 change over its trainable rows, the share of numeral rows
    among them, and the ``n`` rows that moved most as readable strings (student token -> teacher tokens,
    weights before -> after)."""
    import numpy as np
    dist = lp.row_changes()
    s_str = lambda i: student_vocab.tok.convert_ids_to_tokens(int(i))
    t_str = lambda i: teacher_vocab.tok.convert_ids_to_tokens(int(i))
    is_num = np.array([s_str(r).lstrip("Ġ").isdigit() for r in lp.rows.tolist()], dtype=bool)
    top = []
    for m in lp.moved_rows(n):
        top.append({"student": s_str(m["row"]), "teacher": [t_str(t) for t in m["teacher_ids"]],
                    "before": [round(x, 4) for x in m["before"]], "after": [round(x, 4) for x in m["after"]],
                    "l1_change": round(m["l1_change"], 4)})
    d = dist.numpy()
    return {"trainable_rows": int(len(d)), "numeral_rows": int(is_num.sum()),
            "mean_l1_change": float(d.mean()) if len(d) else 0.0, "max_l1_change": float(d.max()) if len(d) else 0.0,
            "mean_l1_change_numerals": float(d[is_num].mean()) if is_num.any() else 0.0,
            "mean_l1_change_other": float(d[~is_num].mean()) if (~is_num).any() else 0.0, "top_moved": top}


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
    done, todo = [], []                   # done: a result per (setting, seed) in order; todo: (position, cost, job)
    for s in settings:
        s = s if isinstance(s, Setting) else Setting.from_dict(s)
        for seed in seeds:
            f = out / "runs" / s.name / f"seed{seed}" / "result.json"
            if skip_done and f.exists():
                done.append(json.loads(f.read_text()))
            else:
                todo.append((len(done), s.relative_cost(), (cfg.to_dict(), str(out), s.to_dict(), seed)))
                done.append(None)
    todo.sort(key=lambda x: -x[1])        # costliest first (stable)
    results = _pool_map(_run_job, [job for _, _, job in todo], workers or cfg.workers,
                        desc=f"{len(todo)} runs ({len(done) - len(todo)} done before)")
    for (i, _, _), r in zip(todo, results):
        done[i] = r
    keep = ["setting", "label", "seed", "arithmetic", "knowledge", "arithmetic_200", "numeral_mass", "digit_split",
            "single_digit", "train_wall_s", "eval_wall_s", "wall_s"]
    rows = []
    for r in done:
        row = {k: r.get(k) for k in keep}
        row.update({f"final_{k}": v for k, v in r.get("final", {}).items()
                    if k == "ce" or k.startswith("kd")})
        rows.append(row)
    return pd.DataFrame(rows)


def run_single_teacher_grid(cfg: MiniConfig, settings=None, seeds=None, out_dir=".", **kw):
    """The single-teacher table: CE-only, same-tokenizer KD, GOLD / P-KL / H-KL x (Qwen3, Phi)."""
    return run_grid(cfg, settings or SINGLE_TEACHER_SETTINGS, seeds, out_dir, **kw)


def results_table(df, metrics=("arithmetic", "knowledge", "numeral_mass", "digit_split", "single_digit")):
    """Mean and std over seeds per setting (rows in the order settings first appear)."""
    order = list(dict.fromkeys(df["setting"]))
    g = df.groupby("setting")[list(metrics)].agg(["mean", "std"])
    g[("seeds", "n")] = df.groupby("setting")["seed"].nunique()
    return g.loc[order]


def time_budget(cfg: MiniConfig, *, teacher_s: float, base_s: float, cache_s: float, run_s: float,
                n_runs: int, corpus_s: float = 25.0) -> dict:
    """Projected wall time of a reproduction from measured per-item times (seconds)."""
    w = max(1, cfg.workers)
    teachers = teacher_s * -(-len(TEACHERS) // w)
    runs = run_s * n_runs / w
    total = corpus_s + teachers + base_s + cache_s + runs
    return {"corpus_s": corpus_s, "teachers_s": teachers, "base_s": base_s, "cache_s": cache_s,
            "runs_s": runs, "total_s": total, "total_min": total / 60}


def run_all(cfg: MiniConfig, out_dir, *, single=None, multi=None, seeds=None) -> dict:
    """The whole miniature in order, with the wall time of each stage (what `smoke` and `mini` time).

    Returns {"corpus", "teachers" (DataFrame), "base", "caches", "single" (DataFrame),
    "multi" (DataFrame or None), "timings" {stage: seconds}}. ``multi=[]`` skips the multi-teacher grid.
    """
    t = {}
    t0 = time.time()
    res = {"corpus": build_corpus(cfg, out_dir)}
    t["corpus_s"] = time.time() - t0
    t0 = time.time()
    res["teachers"] = train_teachers(cfg, out_dir)
    t["teachers_s"] = time.time() - t0
    t0 = time.time()
    res["base"] = train_base_student(cfg, out_dir)
    t["base_s"] = time.time() - t0
    t0 = time.time()
    res["caches"] = build_teacher_caches(cfg, out_dir)
    t["caches_s"] = time.time() - t0
    t0 = time.time()
    res["single"] = run_grid(cfg, single or SINGLE_TEACHER_SETTINGS, seeds, out_dir)
    t["single_s"] = time.time() - t0
    multi = multi_teacher_settings() if multi is None else multi
    t0 = time.time()
    res["multi"] = run_grid(cfg, multi, seeds, out_dir) if multi else None
    t["multi_s"] = time.time() - t0
    t["total_s"] = sum(t.values())
    res["timings"] = t
    Path(out_dir, "timings.json").write_text(json.dumps(t, indent=1))
    return res


# ---- what the notebooks call ------------------------------------------------------------------------

def single_teacher_settings(teachers=("qwen3", "phi"), losses=("gold", "p_kl", "h_kl"), learned_w=False) -> list:
    """The single-teacher rows for some cross-tokenizer teachers and losses, with CE only and
    same-tokenizer KD (Llama "3B") always included as the references; ``learned_w`` adds the
    "P-KL, learned W" rows (Qwen3) when P-KL is among the losses."""
    keep = []
    for s in SINGLE_TEACHER_SETTINGS:
        if not s.teachers or s.teachers[0][0] == "llama":
            keep.append(s)
        elif s.teachers[0][0] in teachers and s.teachers[0][1] in losses and (learned_w or not s.learn_projection):
            keep.append(s)
    return keep


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
    for s in sorted(runs, key=lambda s: -s.relative_cost()):                  # costliest first (stable)
        for seed in (cfg.seeds if seeds is None else seeds):
            if not (out / "runs" / s.name / f"seed{seed}" / "result.json").exists():
                add("run", (s.to_dict(), seed), ("run", s.name, seed),
                    [("base",)] + [("cache", name) for name, _, _ in s.teachers])
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
