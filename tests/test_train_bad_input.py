"""Bad training input never corrupts a run silently: non-finite teacher logits or student losses, empty
rows, undecodable text, batches with nothing to distil, invalid settings, special-token strings in
corpus text, and decomposed (NFD) text under a normalizing tokenizer.

Same tiny real models and small renumbered vocabularies as tests/test_train.py. The DDP cases run this
file under torchrun (gloo):

    torchrun --nproc_per_node 2 tests/test_train_bad_input.py OUT_DIR ASSETS_DIR MODE
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import ddp_two_steps
import pytest
import torch
from ddp_two_steps import checksum, dataset, save_assets
from hypothesis import given
from hypothesis import strategies as st
from test_align import ALPHABET, SETTINGS
from transformers import TrainerCallback

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SPECIAL_LITERALS = [
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|im_end|>",
    "<|im_start|>",
    "<think>",
    "</think>",
    "<|eot_id|>",
    "<|end|>",
]


# ---- helpers ------------------------------------------------------------------------------------


class InjectAt(torch.nn.Module):
    """A real teacher model whose logits are spoiled on its ``at``-th forward call (1-based).

    kind: "nan" | "posinf" (one entry of the row), "neginf_row" (the whole row -inf), "neginf_some" (a few
    entries -inf: a legitimate masked vocabulary). ``pos=None``: the row's first padded position."""

    def __init__(self, model, at: int, kind: str = "nan", row: int = 0, pos: int | None = 3, ranks: tuple = (0,)):
        super().__init__()
        self.model, self.config = model, model.config
        self.at, self.kind, self.row, self.pos, self.ranks, self.calls = at, kind, row, pos, ranks, 0

    def forward(self, input_ids=None, attention_mask=None, **kw):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        self.calls += 1
        if self.calls == self.at and int(os.environ.get("RANK", 0)) in self.ranks:
            logits = out.logits.clone()
            pos = self.pos
            if pos is None:
                pos = int((attention_mask[self.row] == 0).nonzero()[0])
            if self.kind == "nan":
                logits[self.row, pos, 5] = math.nan
            elif self.kind == "posinf":
                logits[self.row, pos, 5] = math.inf
            elif self.kind == "neginf_row":
                logits[self.row, pos, :] = -math.inf
            elif self.kind == "neginf_some":
                logits[self.row, pos, :3] = -math.inf
            out.logits = logits
        return out


class ParamsPerStep(TrainerCallback):
    """The student's parameters after every optimizer step."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.after[state.global_step] = [p.detach().clone() for p in model.parameters()]


def _xt():
    from xtoken import train

    return train


# ---- fixtures shared with tests/test_train.py ---------------------------------------------------

if __name__ != "__main__":
    from test_train import W, config, full_W, qwen_teacher, small, stok, tiny_llama, tiny_qwen, ttok  # noqa: F401


def _train(tmp_path, stok, teachers, texts=None, n=8, callbacks=(), student=None, **kw):
    """Train; ``texts``: the rows as a plain list of dicts (Arrow cannot even hold a lone surrogate)."""
    xt = _xt()
    ds = dataset(n) if texts is None else [{"text": x, "idx": i} for i, x in enumerate(texts)]
    trainer = xt.XTokenTrainer(
        model=student if student is not None else tiny_llama(),
        args=config(tmp_path, **kw),
        teachers=teachers,
        train_dataset=ds,
        processing_class=stok,
        callbacks=list(callbacks),
    )
    trainer.train()
    return trainer, [r for r in trainer.state.log_history if "loss" in r]


def _finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


# ---- non-finite teacher logits and student losses -----------------------------------------------


@pytest.mark.parametrize("kind", ["nan", "posinf", "neginf_row"])
def test_nonfinite_teacher_logits_raise_naming_teacher_step_position(tmp_path, stok, ttok, W, kind):
    teacher = qwen_teacher(ttok, W, "p_kl")
    teacher.model = InjectAt(teacher.model, at=2, kind=kind, row=0, pos=3)
    student = tiny_llama()
    with pytest.raises(RuntimeError, match=r"teacher 'qwen'.*step 2.*row 0.*position 3") as err:
        _train(tmp_path, stok, [teacher], max_steps=3, student=student)
    assert "nonfinite_teacher" in str(err.value), "the message names the setting that skips instead"
    assert _finite(student), "no update from the bad step"


@pytest.mark.parametrize("kind", ["padding", "neginf_some"])
def test_nonfinite_teacher_logits_where_the_loss_does_not_read_them_are_fine(tmp_path, stok, ttok, W, kind):
    """NaN at a padded position, or a few -inf entries (a masked vocabulary) at a used one: no error."""
    teacher = qwen_teacher(ttok, W, "p_kl")
    texts = ["Tom has 123 apples.", "A farm had 907 sheep; 88 were sold, so 907 - 88 = 819 remain. #### 819"] * 4
    if kind == "padding":  # one short and one long row per batch (no shuffling), NaN on the short row's padding
        teacher.model = InjectAt(teacher.model, at=1, kind="nan", row=0, pos=None)
    else:
        teacher.model = InjectAt(teacher.model, at=1, kind="neginf_some", row=0, pos=3)
    student = tiny_llama()
    _, logs = _train(
        tmp_path,
        stok,
        [teacher],
        texts=texts,
        max_steps=2,
        student=student,
        per_device_train_batch_size=2,
        train_sampling_strategy="sequential",
    )
    assert teacher.model.calls >= 1
    assert all(math.isfinite(r["loss"]) for r in logs) and _finite(student)


def test_nonfinite_teacher_logits_skip_the_step(tmp_path, stok, ttok, W):
    teacher = qwen_teacher(ttok, W, "p_kl")
    teacher.model = InjectAt(teacher.model, at=2, kind="nan")
    student, params = tiny_llama(), ParamsPerStep()
    trainer, logs = _train(
        tmp_path, stok, [teacher], max_steps=3, student=student, callbacks=[params], nonfinite_teacher="skip"
    )
    assert _finite(student)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(params.after[a], params.after[b]))
    assert same(1, 2), "the skipped step must not update the student"
    assert not same(2, 3), "training goes on after a skipped step"
    by_step = {r["step"]: r for r in logs}
    assert [by_step[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert math.isnan(by_step[2]["loss"]), "a log window of skipped steps only has no loss"
    for s in (1, 3):
        assert math.isfinite(by_step[s]["loss"]) and by_step[s]["loss"] > 0
        assert all(math.isfinite(v) for k, v in by_step[s].items() if isinstance(v, float))
    summary = trainer.state.log_history[-1]
    assert summary["train_loss"] == pytest.approx((by_step[1]["loss"] + by_step[3]["loss"]) / 2, rel=1e-5)


def test_skip_drops_the_whole_accumulated_step(tmp_path, stok, ttok, W):
    """With gradient accumulation, a bad micro-batch drops its optimizer step, the good micro-batches too."""
    teacher = qwen_teacher(ttok, W, "h_kl")
    teacher.model = InjectAt(teacher.model, at=4, kind="posinf")  # 2nd micro-batch of step 2
    student, params = tiny_llama(), ParamsPerStep()
    _, logs = _train(
        tmp_path,
        stok,
        [teacher],
        n=12,
        max_steps=3,
        student=student,
        callbacks=[params],
        nonfinite_teacher="skip",
        gradient_accumulation_steps=2,
        per_device_train_batch_size=1,
    )
    assert all(torch.equal(x, y) for x, y in zip(params.after[1], params.after[2]))
    by_step = {r["step"]: r for r in logs}
    assert math.isnan(by_step[2]["loss"]) and by_step[3]["skipped_steps"] == 1 and math.isfinite(by_step[3]["loss"])


def test_nonfinite_cached_teacher_logprobs_raise(tmp_path, stok, ttok, W):
    xt = _xt()
    teacher = qwen_teacher(ttok, W, "p_kl")
    ds = dataset(8)
    cache = xt.TeacherCache.build(teacher, ds, xt.DistillCollator(stok, [teacher], max_length=64))
    for i in range(len(cache)):
        cache.data[int(cache.offsets[i]) + 2, 7] = math.nan
    teacher.cache = cache
    with pytest.raises(RuntimeError, match=r"teacher 'qwen'.*step 1.*position 2"):
        _train(tmp_path, stok, [teacher], max_steps=2)


def test_nonfinite_cached_teacher_logprobs_skip(tmp_path, stok, ttok, W):
    xt = _xt()
    teacher = qwen_teacher(ttok, W, "p_kl")
    ds = dataset(8)
    cache = xt.TeacherCache.build(teacher, ds, xt.DistillCollator(stok, [teacher], max_length=64))
    for i in range(len(cache)):
        cache.data[int(cache.offsets[i]) + 2] = -math.inf  # a whole row -inf
    teacher.cache = cache
    student = tiny_llama()
    before = [p.detach().clone() for p in student.parameters()]
    _, logs = _train(tmp_path, stok, [teacher], max_steps=2, student=student, nonfinite_teacher="skip")
    assert logs[-1]["skipped_steps"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


@pytest.mark.parametrize("teachers", ["none", "p_kl"])
def test_nonfinite_student_loss_stops_training(tmp_path, stok, ttok, W, teachers):
    student = tiny_llama()
    with torch.no_grad():
        student.model.norm.weight[0] = math.nan  # every hidden state, hence every logit, turns NaN
    ts = [] if teachers == "none" else [qwen_teacher(ttok, W, "p_kl")]
    with pytest.raises(RuntimeError, match=r"non-finite training loss at step 1"):
        _train(tmp_path, stok, ts, max_steps=2, student=student, nonfinite_teacher="skip")


def test_exploding_student_stops_training(tmp_path, stok):
    """A huge learning rate blows the student up within a few updates: training stops there."""
    with pytest.raises(RuntimeError, match=r"non-finite training loss at step [2-5]"):
        _train(tmp_path, stok, [], max_steps=6, learning_rate=1e30, max_grad_norm=0.0)


# ---- empty rows and undecodable text ------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 4])
def test_all_empty_batch_gives_zero_loss(tmp_path, stok, ttok, W, chunk):
    student = tiny_llama()
    _, logs = _train(
        tmp_path,
        stok,
        [qwen_teacher(ttok, W, "p_kl")],
        texts=[""] * 4,
        max_steps=2,
        student=student,
        loss_chunk_size=chunk,
    )
    assert [r["loss"] for r in logs] == [0.0, 0.0]
    assert all(r["ce"] == 0.0 and r["kd"] == 0.0 for r in logs)
    assert _finite(student)


def test_ce_only_all_empty_batch(tmp_path, stok):
    _, logs = _train(tmp_path, stok, [], texts=[""] * 4, max_steps=1)
    assert logs[0]["loss"] == 0.0


def test_empty_rows_next_to_real_ones(tmp_path, stok, ttok, W):
    texts = ["", ddp_two_steps.TEXTS[0], "", ddp_two_steps.TEXTS[1]]
    student = tiny_llama()
    _, logs = _train(tmp_path, stok, [qwen_teacher(ttok, W, "h_kl")], texts=texts, max_steps=2, student=student)
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in logs) and _finite(student)


def test_lone_surrogate_is_replaced_and_counted(llama, qwen, full_W, caplog):
    xt = _xt()
    col = xt.DistillCollator(llama, [xt.Teacher("qwen", None, qwen, "p_kl", projection=full_W)], max_length=32)
    rows = [
        {"text": "abc\ud800def", "idx": 11},
        {"text": "ok \ud83d\ude42 fine", "idx": 12},
        {"text": "plain", "idx": 13},
    ]
    with caplog.at_level(logging.WARNING, logger="xtoken.train"):
        batch = col(rows)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[0][mask[0] == 1].tolist() == llama("abc\ufffddef")["input_ids"]
    assert ids[1][mask[1] == 1].tolist() == llama("ok \U0001f642 fine")["input_ids"], "a split pair is rejoined"
    assert col.repaired_rows == 2
    msgs = [r.getMessage() for r in caplog.records if "surrogate" in r.getMessage()]
    assert len(msgs) == 2 and "idx 11" in msgs[0] and "idx 12" in msgs[1]
    assert all(len(a) > 0 for a in batch["teachers"]["qwen"]["alignments"])


def test_lone_surrogate_trains(tmp_path, llama):
    """The full Llama vocabulary (U+FFFD is not among the small vocabulary's ids)."""
    texts = [ddp_two_steps.TEXTS[0] + "\udc80", ddp_two_steps.TEXTS[1]] * 2
    _, logs = _train(tmp_path, llama, [], texts=texts, max_steps=2, student=ddp_two_steps.tiny_llama())
    assert all(math.isfinite(r["loss"]) for r in logs)


# ---- kd_scale only where there is something to distil --------------------------------------------


def test_kd_scale_logged_only_where_kd_is_positive(tmp_path, stok, ttok, W):
    xt = _xt()
    teacher = qwen_teacher(ttok, W, "p_kl")
    trainer = xt.XTokenTrainer(
        model=tiny_llama(), args=config(tmp_path), teachers=[teacher], train_dataset=dataset(4), processing_class=stok
    )
    col = trainer.data_collator
    trainer.model.train()
    logged = []
    for rows in ([{"text": "Tom", "idx": 0}, {"text": "A", "idx": 1}], [dataset(4)[0], dataset(4)[1]]):
        # one token each: the student has a next token to predict (CE > 0), the teacher's only chunk starts
        # its row, so no chunk is predictable: KD = 0 (CE / 1e-12 ~ 1e13 would swamp the averaged metric)
        with torch.no_grad():
            trainer.compute_loss(trainer.model, col(rows))
        trainer.log({"loss": 1.0})
        logged.append(dict(trainer.state.log_history[-1]))
    nothing, real = logged
    assert nothing["kd"] == 0.0 and nothing["ce"] > 0 and "kd_scale" not in nothing
    assert real["kd"] > 0 and real["kd_scale"] == pytest.approx(real["ce"] / real["kd"], rel=1e-5)
    # both in one log window: the mean is over the batch with KD only
    with torch.no_grad():
        trainer.compute_loss(trainer.model, col([{"text": "Tom", "idx": 0}, {"text": "A", "idx": 1}]))
        trainer.compute_loss(trainer.model, col([dataset(4)[0], dataset(4)[1]]))
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["kd_scale"] == pytest.approx(real["kd_scale"], rel=1e-5)


# ---- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=math.nan),
        dict(temperature=math.inf),
        dict(temperature=0.0),
        dict(max_length=0),
        dict(max_length=-5),
        dict(loss_chunk_size=0),
        dict(loss_chunk_size=-1),
        dict(kd_weight=-1.0),
        dict(ce_weight=-0.5),
        dict(kd_weight=math.nan),
        dict(ce_weight=math.inf),
        dict(projection_learning_rate=math.nan),
        dict(nonfinite_teacher="ignore"),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_bad_settings_raise(kw):
    xt = _xt()
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        xt.XTokenConfig(output_dir="x", **kw)


def test_good_settings_pass():
    xt = _xt()
    cfg = xt.XTokenConfig(
        output_dir="x", kd_weight=0.0, ce_weight=0.0, loss_chunk_size=1, max_length=1, temperature=0.5
    )
    assert cfg.nonfinite_teacher == "raise"


@pytest.mark.parametrize("weight", [math.nan, math.inf, -1.0])
def test_bad_teacher_weight_raises(weight):
    xt = _xt()
    with pytest.raises(ValueError, match="weight"):
        xt.Teacher("t", None, None, "kl", weight=weight)


def test_static_weights_summing_to_zero_raise(tmp_path, stok):
    xt = _xt()
    teachers = [
        xt.Teacher("a", tiny_llama(seed=3), stok, "kl", weight=0.0),
        xt.Teacher("b", tiny_llama(seed=4), stok, "kl", weight=0.0),
    ]
    with pytest.raises(ValueError, match="weight"):
        xt.XTokenTrainer(
            model=tiny_llama(),
            args=config(tmp_path),
            teachers=teachers,
            train_dataset=dataset(4),
            processing_class=stok,
        )


# ---- special-token strings in corpus text -------------------------------------------------------


def _char_spans(tok, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character offsets of ``ids`` in ``text``: from the tokenization (with or without special-token
    splitting) that reproduces ``ids``."""
    for split in (True, False):
        enc = tok(text, add_special_tokens=True, split_special_tokens=split, return_offsets_mapping=True)
        if enc["input_ids"] == ids:
            return enc["offset_mapping"]
    raise AssertionError("no tokenization of the text reproduces the collator's ids")


def check_same_characters(text, s_tok, s_ids, t_tok, t_ids, a):
    """Every text chunk pair covers the same character span of ``text`` on both sides."""
    s_off, t_off = _char_spans(s_tok, text, s_ids), _char_spans(t_tok, text, t_ids)

    def span(off, a_, b_):
        xs = [off[i] for i in range(a_, b_) if off[i][1] > off[i][0]]
        return (min(x for x, _ in xs), max(y for _, y in xs)) if xs else None

    for k in range(len(a)):
        if a.is_special[k]:
            continue
        (sa, sb), (ta, tb) = a.student_spans[k], a.teacher_spans[k]
        s_span, t_span = span(s_off, sa, sb), span(t_off, ta, tb)
        assert s_span == t_span, (
            f"chunk {k}: student {text[slice(*s_span)]!r} at {s_span} ~ teacher {text[slice(*t_span)]!r} at {t_span}"
        )


@pytest.fixture(scope="module")
def phi_W(llama, phi):
    from xtoken.projection import build_projection

    return build_projection(llama, phi)


@pytest.fixture(scope="module")
def special_collator(llama, qwen, phi, full_W, phi_W):
    xt = _xt()
    teachers = [
        xt.Teacher("qwen", None, qwen, "p_kl", projection=full_W),
        xt.Teacher("phi", None, phi, "p_kl", projection=phi_W),
    ]
    return xt.DistillCollator(llama, teachers, max_length=1024)


def _check_collated(col, text):
    batch = col([{"text": text}])
    s_ids = batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist()
    for t in col.teachers:
        e = batch["teachers"][t.name]
        t_ids = e["input_ids"][0][e["attention_mask"][0] == 1].tolist()
        check_same_characters(text, col.student_tokenizer, s_ids, t.tokenizer, t_ids, e["alignments"][0])
    return batch


def test_special_token_strings_stay_text(special_collator, llama, qwen):
    text = (
        "The answer is 42.<|endoftext|>Next <|begin_of_text|>doc: <|im_start|>user hi<|im_end|> <think>hmm</think> done"
    )
    batch = _check_collated(special_collator, text)
    s_ids = batch["input_ids"][0].tolist()
    assert s_ids[0] == llama.bos_token_id, "the BOS the tokenizer adds by itself stays"
    assert llama.bos_token_id not in s_ids[1:] and not set(s_ids) & set(llama.all_special_ids[1:])
    q = batch["teachers"]["qwen"]
    assert not set(q["input_ids"][0][q["attention_mask"][0] == 1].tolist()) & set(qwen.all_special_ids)
    a = q["alignments"][0]
    assert a.student_unpaired.tolist() == [0] and len(a.teacher_unpaired) == 0


# the alignment tests' alphabet, plus special-token literals as whole pieces
TEXT_WITH_SPECIALS = st.lists(
    st.one_of(st.sampled_from(ALPHABET), st.sampled_from(SPECIAL_LITERALS)), min_size=0, max_size=120
).map("".join)


@SETTINGS
@given(TEXT_WITH_SPECIALS)
def test_chunks_cover_the_same_characters_property(special_collator, text):
    _check_collated(special_collator, text)


# ---- decomposed text under a normalizing teacher ------------------------------------------------

GERMAN = (
    "Über die Brücke gingen Mädchen und Jungen; große Straßen, schöne Grüße aus Köln. Die Bäume "
    "blühen, während Väter Äpfel, Birnen und Pflaumen für die Kinder pflücken. Öl, Käse, Brötchen."
)


def test_nfd_text_pairs_under_nfc_teacher(special_collator, llama, qwen):
    text = unicodedata.normalize("NFD", GERMAN)
    assert text != GERMAN
    batch = special_collator([{"text": text}])
    n = int(batch["attention_mask"][0].sum())
    a = batch["teachers"]["qwen"]["alignments"][0]
    assert a.student_unpaired.tolist() == [0], f"{len(a.student_unpaired)} of {n} student tokens unpaired"
    assert len(a.teacher_unpaired) == 0
    # both sides read the composed text: the student's ids are those of the NFC text
    assert batch["input_ids"][0][:n].tolist() == llama(GERMAN)["input_ids"]


def test_text_is_left_alone_when_no_tokenizer_normalizes(llama, phi, phi_W):
    xt = _xt()
    col = xt.DistillCollator(llama, [xt.Teacher("phi", None, phi, "p_kl", projection=phi_W)], max_length=256)
    text = unicodedata.normalize("NFD", GERMAN)
    batch = col([{"text": text}])
    n = int(batch["attention_mask"][0].sum())
    assert batch["input_ids"][0][:n].tolist() == llama(text)["input_ids"]


def test_unpaired_share_is_logged(tmp_path, stok, ttok, W):
    _, logs = _train(tmp_path, stok, [qwen_teacher(ttok, W, "p_kl")], max_steps=2)
    for r in logs:  # Llama's BOS is the one unpaired student token of each row
        assert 0 < r["qwen/unpaired_share"] < 0.1


# ---- the miniature's tokenization does not move -------------------------------------------------


def test_corpus_text_tokenizes_as_the_plain_tokenizer_does(llama, qwen):
    """Corpus text without special-token strings or decomposed characters: the collator's ids are
    exactly the tokenizers' own (the miniature's numbers depend on it)."""
    from xtoken.mini.config import MiniConfig
    from xtoken.mini.corpus import make_corpus

    xt = _xt()
    texts = list(make_corpus(MiniConfig.preset("smoke"))["train"]["text"])[:48]
    col = xt.DistillCollator(llama, [], max_length=64)
    student, _ = col.tokenize(texts)
    assert student == llama(texts, truncation=True, max_length=64)["input_ids"]
    for tok in (llama, qwen):
        from xtoken.hf.collator import encode

        assert encode(tok, texts, 128)["input_ids"] == tok(texts, truncation=True, max_length=128)["input_ids"]


# ---- DDP ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_ddp_nonfinite_teacher_on_one_rank(tmp_path, small, mode):
    """NaN teacher logits on rank 0 only: both ranks skip the same step (weights stay equal), or both stop
    with an error (no rank left waiting in a collective)."""
    save_assets(tmp_path, *small)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__)),
        str(tmp_path),
        str(tmp_path),
        mode,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    if mode == "raise":
        assert proc.returncode != 0
        assert "teacher 'qwen'" in proc.stderr and "step 2" in proc.stderr
        assert "on another rank" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == [0, 1, 1]
    assert ranks[0]["finite"] and ranks[1]["finite"]


def _ddp_main(out_dir: str, assets: str, mode: str) -> None:
    from transformers import AutoTokenizer

    from xtoken.projection import Projection

    xt = _xt()
    rank = int(os.environ.get("RANK", 0))
    s_tok = AutoTokenizer.from_pretrained(os.path.join(assets, "student_tok"))
    t_tok = AutoTokenizer.from_pretrained(os.path.join(assets, "teacher_tok"))
    W = Projection.load(os.path.join(assets, "W.safetensors"))
    teacher = xt.Teacher(
        "qwen", InjectAt(ddp_two_steps.tiny_qwen(W.teacher_vocab_size), at=2, ranks=(0,)), t_tok, "p_kl", projection=W
    )
    args = xt.XTokenConfig(
        output_dir=out_dir,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        use_cpu=True,
        ddp_backend="gloo",
        save_strategy="no",
        disable_tqdm=True,
        loss_curve=False,
        seed=0,
        max_length=64,
        nonfinite_teacher=mode,
    )
    student = ddp_two_steps.tiny_llama(W.student_vocab_size)
    trainer = xt.XTokenTrainer(
        model=student, args=args, teachers=[teacher], train_dataset=dataset(12), processing_class=s_tok
    )
    trainer.train()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "checksum": checksum(trainer.model),
                "finite": _finite(trainer.model),
                "skipped": [r["skipped_steps"] for r in trainer.state.log_history if "loss" in r],
            },
            f,
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    _ddp_main(*sys.argv[1:])
