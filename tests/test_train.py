"""XTokenTrainer end to end on tiny real HF models (Llama student, Qwen3 / Llama teachers).

Real tokenizers renumbered to small vocabularies (the ids of the test texts, ~50 each; see
`ddp_two_steps.small_vocab`), W built on the full vocabularies and restricted, models of hidden
size 32 and one layer: a training step takes milliseconds on one CPU thread. The collator test
uses the full tokenizers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ddp_two_steps
import numpy as np
import pytest
import torch
from ddp_two_steps import checksum, dataset, save_assets, small_vocab

from xtoken.train import DistillCollator, Teacher, TeacherCache, XTokenConfig, XTokenTrainer

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full_W(llama, qwen):
    from xtoken.projection import build_projection

    return build_projection(llama, qwen)


VOCAB = {}  # model output sizes, set by the `small` fixture


@pytest.fixture(scope="module")
def small(llama, qwen, full_W):
    """(student tokenizer, teacher tokenizer, W) over the small renumbered vocabularies."""
    s_tok, s_l2f = small_vocab(llama)
    t_tok, t_l2f = small_vocab(qwen)
    W = full_W.restrict(s_l2f, t_l2f, student_tok=s_tok, teacher_tok=t_tok)
    VOCAB.update(student=W.student_vocab_size, teacher=W.teacher_vocab_size)
    return s_tok, t_tok, W


@pytest.fixture
def stok(small):
    return small[0]


@pytest.fixture
def ttok(small):
    return small[1]


@pytest.fixture
def W(small):
    return small[2]


def tiny_llama(seed=0):
    return ddp_two_steps.tiny_llama(vocab_size=VOCAB["student"], seed=seed)


def tiny_qwen(seed=1):
    return ddp_two_steps.tiny_qwen(vocab_size=VOCAB["teacher"], seed=seed)


def config(tmp_path, **kw) -> XTokenConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        loss_curve=False,
        seed=0,
        max_length=64,
    )
    base.update(kw)
    return XTokenConfig(**base)


def qwen_teacher(ttok, W, loss="p_kl", name="qwen", **kw) -> Teacher:
    return Teacher(name, tiny_qwen(), ttok, loss, projection=None if loss == "kl" else W, **kw)


def train(tmp_path, stok, teachers, n=8, **kw):
    student = tiny_llama()
    before = [p.detach().clone() for p in student.parameters()]
    t_before = [checksum(t.model) for t in teachers]
    trainer = XTokenTrainer(
        model=student, args=config(tmp_path, **kw), teachers=teachers, train_dataset=dataset(n), processing_class=stok
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    t_after = [checksum(t.model) for t in teachers]
    return trainer, logs, changed, t_before == t_after


# ---- the collator -------------------------------------------------------------------------------


def test_collator_labels_and_same_text(llama, qwen, full_W):
    teacher = Teacher("qwen", None, qwen, "p_kl", projection=full_W)  # the collator never runs the model
    col = DistillCollator(llama, [teacher], max_length=12)
    rows = [dataset(4)[0], {"text": "Add 12 and 999.", "idx": 7}, dataset(4)[2]]
    batch = col(rows)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape[1] <= 12
    assert torch.equal(labels[mask == 1], ids[mask == 1]) and (labels[mask == 0] == -100).all()
    assert (mask == 0).any(), "rows of different lengths must be padded"
    entry = batch["teachers"]["qwen"]
    assert len(entry["alignments"]) == 3
    for b in range(3):
        s = llama.decode(ids[b][mask[b] == 1], skip_special_tokens=True)
        t = qwen.decode(entry["input_ids"][b][entry["attention_mask"][b] == 1], skip_special_tokens=True)
        assert s == t, "the teacher must see exactly the student's (truncated) text"
        assert len(entry["alignments"][b]) > 0
    assert batch["idx"].tolist() == [0, 7, 2]


# ---- training steps -----------------------------------------------------------------------------


def test_ce_only(tmp_path, stok):
    _, logs, changed, _ = train(tmp_path, stok, [])
    assert changed and len(logs) == 2
    assert all(math.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["ce"]) for r in logs)
    assert "kd" not in logs[0]


@pytest.mark.parametrize("loss", ["kl", "gold", "p_kl", "h_kl", "uld"])
def test_two_steps_each_loss(tmp_path, stok, ttok, W, loss):
    if loss == "kl":  # same-tokenizer teacher
        teacher = Teacher("llama3b", tiny_llama(seed=3), stok, "kl")
    else:
        teacher = qwen_teacher(ttok, W, loss)
    _, logs, changed, teacher_same = train(tmp_path, stok, [teacher])
    assert changed, "the student must be updated"
    assert teacher_same, "the teacher must stay frozen"
    assert not any(p.requires_grad for p in teacher.model.parameters())
    for r in logs:
        assert math.isfinite(r["loss"]) and math.isfinite(r["kd"]) and r["kd"] >= 0
        assert f"kd_{teacher.name}" in r
    # dynamic scaling (default): KD is rescaled to CE's value, so loss = CE + CE
    assert logs[0]["loss"] == pytest.approx(2 * logs[0]["ce"], rel=1e-4)


def test_static_weights(tmp_path, stok):
    teacher = Teacher("llama3b", tiny_llama(seed=3), stok, "kl")
    _, logs, _, _ = train(tmp_path, stok, [teacher], dynamic_kd_scale=False, kd_weight=0.5, ce_weight=2.0)
    r = logs[0]
    assert "kd_scale" not in r
    assert r["loss"] == pytest.approx(2.0 * r["ce"] + 0.5 * r["kd"], rel=1e-4)


def test_multi_teacher_kl_plus_pkl(tmp_path, stok, ttok, W):
    teachers = [
        Teacher("llama3b", tiny_llama(seed=3), stok, "kl", weight=0.5),
        qwen_teacher(ttok, W, "p_kl", weight=0.5),
    ]
    _, logs, changed, teacher_same = train(tmp_path, stok, teachers, dynamic_kd_scale=False)
    assert changed and teacher_same
    r = logs[0]
    assert r["kd"] == pytest.approx(0.5 * r["kd_llama3b"] + 0.5 * r["kd_qwen"], rel=1e-4)


@pytest.mark.parametrize("scheme,per", [("ce", "batch"), ("entropy", "sample"), ("max_prob", "batch")])
def test_adaptive_weights(tmp_path, stok, ttok, W, scheme, per):
    teachers = [Teacher("llama3b", tiny_llama(seed=3), stok, "kl"), qwen_teacher(ttok, W, "p_kl")]
    _, logs, changed, _ = train(
        tmp_path, stok, teachers, max_steps=1, teacher_weighting=scheme, weighting_per=per, dynamic_kd_scale=False
    )
    r = logs[0]
    assert changed and math.isfinite(r["loss"])
    a, b = r["alpha_llama3b"], r["alpha_qwen"]
    assert a + b == pytest.approx(1.0, abs=1e-5) and 0 < a < 1
    if per == "batch":  # one weight per teacher: KD is exactly their weighted sum
        assert r["kd"] == pytest.approx(a * r["kd_llama3b"] + b * r["kd_qwen"], rel=1e-4)


def test_same_seed_same_losses(tmp_path, stok, ttok, W):
    runs = [train(tmp_path / str(i), stok, [qwen_teacher(ttok, W)])[1] for i in range(2)]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]


def test_loss_curve_png(tmp_path, stok):
    trainer, _, _, _ = train(tmp_path, stok, [], loss_curve=True)
    png = Path(trainer.args.output_dir) / "loss_curve.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_config():
    with pytest.raises(ValueError):
        XTokenConfig(output_dir="x", teacher_weighting="softmax")
    with pytest.raises(ValueError):
        Teacher("t", None, None, "p_kl")  # cross-tokenizer loss without W


def test_kl_teacher_needs_student_tokenizer(stok, ttok):
    with pytest.raises(ValueError, match="not the student's"):
        DistillCollator(stok, [Teacher("q", None, ttok, "kl")])


@pytest.mark.parametrize(
    "kw",
    [dict(bf16=True), dict(gradient_accumulation_steps=2), dict(dataloader_num_workers=1)],
    ids=["bf16", "grad_accum", "workers"],
)
def test_trainer_machinery(tmp_path, stok, ttok, W, kw):
    """Mixed precision, accumulation and collation in worker processes come from HF Trainer unchanged."""
    teacher = qwen_teacher(ttok, W, "h_kl")
    _, logs, changed, teacher_same = train(tmp_path, stok, [teacher], **kw)
    assert changed and len(logs) == 2
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kd"]) for r in logs)
    if kw.get("bf16"):  # the teacher is cast to the training dtype (so its checksum moves), still frozen
        assert next(teacher.model.parameters()).dtype == torch.bfloat16
        assert not any(p.requires_grad for p in teacher.model.parameters())
    else:
        assert teacher_same


# ---- teacher cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["kl", "p_kl"])
def test_cache_matches_live(tmp_path, stok, ttok, W, loss):
    teacher = Teacher("llama3b", tiny_llama(seed=3), stok, "kl") if loss == "kl" else qwen_teacher(ttok, W, loss)
    ds = dataset(6)
    live_col = DistillCollator(stok, [teacher], max_length=64)
    cache = TeacherCache.build(teacher, ds, live_col, batch_size=4, path=tmp_path / "cache.npy")
    assert len(cache) == 6 and cache.vocab_size == teacher.model.config.vocab_size
    cached = Teacher(
        teacher.name,
        teacher.model,
        teacher.tokenizer,
        teacher.loss,
        teacher.projection,
        cache=TeacherCache.load(tmp_path / "cache.npy"),
    )
    trainer = XTokenTrainer(
        model=tiny_llama(),
        args=config(tmp_path, dynamic_kd_scale=False),
        teachers=[teacher],
        train_dataset=ds,
        processing_class=stok,
    )
    rows = [ds[i] for i in (5, 0, 3)]
    with torch.no_grad():
        live = trainer.compute_loss(trainer.model, live_col(rows))
        batch = DistillCollator(stok, [cached], max_length=64)(rows)
        assert batch["teachers"][teacher.name]["logprobs"].dtype == torch.float16
        trainer.teachers = [cached]
        from_cache = trainer.compute_loss(trainer.model, batch)
    kd_live, kd_cache = trainer._metrics["kd"]
    assert kd_live > 0
    assert kd_cache == pytest.approx(kd_live, rel=2e-3, abs=1e-4)
    assert float(from_cache) == pytest.approx(float(live), rel=2e-3)


def test_cache_refuses_other_tokenization(tmp_path, stok):
    teacher = Teacher("llama3b", tiny_llama(seed=3), stok, "kl")
    ds = dataset(4)
    cache = TeacherCache.build(teacher, ds, DistillCollator(stok, [teacher], max_length=64))
    teacher.cache = cache
    with pytest.raises(ValueError, match="cache row"):
        DistillCollator(stok, [teacher], max_length=8)([ds[0]])
    with pytest.raises(ValueError, match="cache row"):  # same idx, another text of the same length
        DistillCollator(stok, [teacher], max_length=64)([{"text": ds[0]["text"].replace("apples", "pens"), "idx": 0}])
    assert DistillCollator(stok, [teacher], max_length=64)([ds[1]])["teachers"]["llama3b"]["logprobs"].shape[0] == 1


# ---- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("learn", [False, True], ids=["fixed_W", "learned_W"])
def test_resume_gives_same_next_loss(tmp_path, stok, ttok, W, learn):
    def run(out, max_steps, resume=None):
        teacher = qwen_teacher(ttok, W)
        trainer = XTokenTrainer(
            model=tiny_llama(),
            args=config(
                out,
                max_steps=max_steps,
                save_strategy="steps",
                save_steps=2,
                lr_scheduler_type="constant",
                learn_projection=learn,
                projection_learning_rate=0.5,
            ),
            teachers=[teacher],
            train_dataset=dataset(8),
            processing_class=stok,
        )
        trainer.train(resume_from_checkpoint=resume)
        return {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}

    full = run(tmp_path / "a", 3)  # constant lr: the first 2 steps of both runs are the same
    assert run(tmp_path / "b", 2)[2] == full[2]
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and set(keys) <= set(tiny_llama().state_dict()), "only the student is saved"
    assert (ckpt / "learned_W_qwen.safetensors").exists() == learn
    resumed = run(tmp_path / "b", 3, resume=str(ckpt))
    assert resumed[3] == pytest.approx(full[3], rel=1e-5)


# ---- DDP ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["p_kl", "p_kl_learned"])
def test_ddp_two_ranks_agree(tmp_path, small, loss):
    save_assets(tmp_path, *small)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "tests" / "ddp_two_steps.py"),
        str(tmp_path),
        str(tmp_path),
        loss,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)
    assert ranks[0]["checksum"] != pytest.approx(checksum(tiny_llama()), rel=1e-9), "DDP must train"
    assert ranks[0]["teacher_checksum"] == pytest.approx(checksum(tiny_qwen()), rel=1e-12)
    assert all(math.isfinite(x) for r in ranks for x in r["losses"])
    assert len(ranks[0]["ce"]) == 2 and ranks[0]["ce"] == ranks[1]["ce"], "logged metrics are averaged over ranks"
    if loss == "p_kl_learned":  # each rank saw other rows: W stays equal only if its gradients are averaged
        assert ranks[0]["w_checksum"] == ranks[1]["w_checksum"]
        assert ranks[0]["w_checksum"] != pytest.approx(ddp_two_steps.w_checksum(small[2].weights), rel=1e-9), (
            "W must be learned"
        )


# ---- learned W ---------------------------------------------------------------------------------


def _learn(tmp_path, stok, ttok, W, **kw):
    student = tiny_llama()
    trainer = XTokenTrainer(
        model=student,
        args=config(tmp_path, max_steps=4, learn_projection=True, **kw),
        teachers=[qwen_teacher(ttok, W)],
        train_dataset=dataset(8),
        processing_class=stok,
    )
    trainer.train()
    return trainer


def test_learned_w_at_lr_zero_is_bit_identical_to_fixed_w(tmp_path, stok, ttok, W):
    fixed = XTokenTrainer(
        model=tiny_llama(),
        args=config(tmp_path / "f", max_steps=4),
        teachers=[qwen_teacher(ttok, W)],
        train_dataset=dataset(8),
        processing_class=stok,
    )
    fixed.train()
    learned = _learn(tmp_path / "l", stok, ttok, W, projection_learning_rate=0.0)
    lp = learned.learned_projections["qwen"]
    assert lp.n_trainable_rows > 0, "the restricted Llama->Qwen W has multi-token rows to learn"
    assert torch.equal(lp.weights(), W.weights)
    for a, b in zip(fixed.model.parameters(), learned.model.parameters()):
        assert torch.equal(a, b)
    assert [r["loss"] for r in fixed.state.log_history if "loss" in r] == [
        r["loss"] for r in learned.state.log_history if "loss" in r
    ]


def test_learned_w_moves_stays_on_simplex_and_is_saved(tmp_path, stok, ttok, W):
    from xtoken.projection import MULTI, Projection

    trainer = _learn(tmp_path, stok, ttok, W, projection_learning_rate=0.5)
    lp = trainer.learned_projections["qwen"]
    w = lp.weights().detach()
    assert not torch.equal(w, W.weights)
    assert (w >= 0).all() and torch.allclose(w.sum(1), W.weights.sum(1), atol=1e-6)
    fixed_rows = W.row_kind != MULTI
    assert torch.equal(w[fixed_rows], W.weights[fixed_rows])
    (group,) = [g for g in trainer.optimizer.param_groups if any(p is lp.theta for p in g["params"])]
    assert group["initial_lr"] == 0.5 and group["weight_decay"] == 0.0
    assert all(p.grad is None for p in lp.parameters()), "W's gradients are cleared after each step"
    trainer.save_model(str(tmp_path / "saved"))
    back = Projection.load(tmp_path / "saved" / "learned_W_qwen.safetensors")
    assert back.is_learned and back.meta["learned_from"] == W.digest()
    assert torch.equal(back.weights, w)


def test_learned_w_needs_a_p_kl_teacher(tmp_path, stok, ttok, W):
    with pytest.raises(ValueError, match="p_kl"):
        XTokenTrainer(
            model=tiny_llama(),
            args=config(tmp_path, learn_projection=True),
            teachers=[qwen_teacher(ttok, W, "h_kl")],
            train_dataset=dataset(8),
            processing_class=stok,
        )


def test_loss_metrics_are_computed_for_logged_steps(tmp_path, stok, ttok, W):
    _, logs, changed, _ = train(tmp_path, stok, [qwen_teacher(ttok, W, "h_kl")], max_steps=4, logging_steps=2)
    assert changed and [r["step"] for r in logs] == [2, 4]
    for r in logs:  # computed on the logged steps' micro-batches only, but present in every log
        assert 0 <= r["qwen/top1_agreement"] <= 1 and r["qwen/teacher_common_mass"] > 0
        assert math.isfinite(r["kd"])


def test_collator_alignment_memo_gives_the_same_batches(llama, qwen, full_W):
    from xtoken.align import AlignmentMemo

    teacher = Teacher("qwen", None, qwen, "p_kl", projection=full_W)
    rows = [dataset(6)[i] for i in range(6)]
    plain = DistillCollator(llama, [teacher], max_length=24)
    memo = AlignmentMemo()
    cached = DistillCollator(llama, [teacher], max_length=24, memo=memo)
    for batch_rows in (rows[:4], rows[2:], rows[:4]):  # rows 2-3 come back in another batch (other width)
        a, b = plain(batch_rows), cached(batch_rows)
        for x, y in zip(a["teachers"]["qwen"]["alignments"], b["teachers"]["qwen"]["alignments"]):
            assert np.array_equal(x.student_spans, y.student_spans) and np.array_equal(x.teacher_spans, y.teacher_spans)
            assert np.array_equal(x.student_unpaired, y.student_unpaired) and x.student_valid == y.student_valid
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
        assert torch.equal(a["teachers"]["qwen"]["input_ids"], b["teachers"]["qwen"]["input_ids"])
    distinct = len({r["text"] for r in rows})
    # per row: one student tokenization, one teacher tokenization, one alignment
    assert memo.misses == 3 * distinct and memo.hits == 3 * (12 - distinct) and distinct >= 3
