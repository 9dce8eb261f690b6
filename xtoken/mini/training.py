"""What every job of the miniature does: read the restricted vocabularies and W, train a model with
`xtoken.train.XTokenTrainer`, evaluate it with lm-eval and per-item scores."""

from __future__ import annotations

import time
from pathlib import Path

from .config import MiniConfig
from .corpus import SKILLS
from .models import LocalVocab
from .pool import _threads

# Where the miniature's documents end: every training text closes with a blank line, and lm-eval's tasks stop
# generating there (`until` in xtoken/tasks/xtoken_mini_*.yaml). On-policy generations stop at the same place.
STOP_STRINGS = ("\n\n",)


def load_vocabs(out_dir) -> dict:
    """{family: LocalVocab} read from ``out/vocab`` (the full tokenizers load only when W is built)."""
    return {name: LocalVocab.load(Path(out_dir) / "vocab" / name) for name in ("llama", "qwen3", "phi")}


def _projection_path(out_dir, teacher: str) -> Path:
    return Path(out_dir) / "projections" / f"llama_to_{teacher}.safetensors"


def _load_w(out_dir, teacher):
    from xtoken.projection import Projection

    return Projection.load(_projection_path(out_dir, teacher))


def train_model(
    model,
    tok,
    dataset,
    out_dir,
    *,
    steps,
    batch,
    lr,
    seed,
    max_length,
    teachers=(),
    warmup_ratio=0.05,
    callbacks=(),
    ce_weight=1.0,
    kd_weight=1.0,
    dynamic_kd_scale=False,
    teacher_weighting="static",
    log_every=None,
    learn_projection=False,
    projection_lr=1e-2,
    memo=None,
    lmbda=0.0,
    max_new_tokens=48,
    stop_strings=STOP_STRINGS,
    on_policy_ce=False,
) -> dict:
    """Train ``model`` with `XTokenTrainer` for ``steps`` steps; returns log history, wall time and the
    learned W modules ({teacher: LearnableProjection}, empty unless ``learn_projection``).
    ``memo``: an `xtoken.align.AlignmentMemo` (tokenizations and alignments) shared by the runs of one worker.
    ``lmbda`` > 0: on-policy batches with that probability, at most ``max_new_tokens`` generated per row, each
    ended at the first of ``stop_strings`` (kept); ``on_policy_ce``: those batches also train CE on the sample."""
    from xtoken.train import DistillCollator, XTokenConfig, XTokenTrainer

    _threads()
    args = XTokenConfig(
        output_dir=str(out_dir),
        max_steps=int(steps),
        per_device_train_batch_size=int(batch),
        learning_rate=float(lr),
        lr_scheduler_type="cosine",
        warmup_steps=int(round(warmup_ratio * steps)),
        weight_decay=0.0,
        seed=int(seed),
        data_seed=int(seed),
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        logging_steps=log_every or max(1, steps // 10),
        disable_tqdm=True,
        loss_curve=False,
        max_length=max_length,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        dynamic_kd_scale=dynamic_kd_scale,
        teacher_weighting=teacher_weighting,
        report_to="none",
        learn_projection=learn_projection,
        projection_learning_rate=projection_lr,
        lmbda=float(lmbda),
        max_new_tokens=int(max_new_tokens),
        stop_strings=list(stop_strings),
        on_policy_ce=bool(on_policy_ce),
    )
    collator = DistillCollator(tok, list(teachers), max_length, memo=memo)
    trainer = XTokenTrainer(
        model=model,
        args=args,
        teachers=list(teachers),
        train_dataset=dataset,
        processing_class=tok,
        data_collator=collator,
        callbacks=list(callbacks),
    )
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    hist = [r for r in trainer.state.log_history if "loss" in r]
    return {
        "wall_s": wall,
        "log_history": hist,
        "final": hist[-1] if hist else {},
        "learned": trainer.learned_projections,
    }


def evaluate_model(model_dir, out_dir, cfg: MiniConfig, limit=None) -> dict:
    """lm-eval exact match per skill {skill: value} on the held-out test split, plus the per-item scores
    (`xtoken.mini.items.score_items`: lm-eval's own greedy generations and one teacher-forced pass) written to
    ``model_dir/items.csv`` and lm-eval's results (without the samples) to ``model_dir/lm_eval_results.json``; the
    returned dict adds per skill the solution match and the mean teacher-forced
    log-probability of the gold solution, and ``arithmetic_200`` (exact match on the first 200 arithmetic items)."""
    from xtoken.evaluate import evaluate, load_lm, save_raw_results

    from .items import score_items

    t0 = time.time()
    lm = load_lm(model_dir, batch_size=cfg.eval_batch_size)
    df, raw = evaluate(
        model_dir,
        [f"xtoken_mini_{s}" for s in SKILLS],
        data_dir=Path(out_dir) / "tasks",
        max_gen_toks=cfg.max_gen_toks,
        limit=limit,
        lm=lm,
        log_samples=True,
        return_raw=True,
    )
    scores = {r.task.replace("xtoken_mini_", ""): r.value for r in df.itertuples()}
    t1 = time.time()
    items = score_items(lm, raw, batch=cfg.eval_batch_size)
    items.to_csv(Path(model_dir) / "items.csv", index=False)
    # lm-eval's own results beside the model (the generations are in items.csv; the raw samples are not kept)
    save_raw_results({k: v for k, v in raw.items() if k != "samples"}, Path(model_dir) / "lm_eval_results.json")
    for s in SKILLS:
        g = items[items.skill == s]
        scores[f"{s}_solution_match"] = float(g.solution_match.mean())
        scores[f"{s}_logp_solution"] = float(g.logp_solution.mean())
    a = items[(items.skill == "arithmetic") & (items.item < 200)]
    scores["arithmetic_200"] = float(a.exact_match.mean())
    scores["items_wall_s"] = time.time() - t1
    scores["eval_wall_s"] = time.time() - t0
    return scores
