"""On-policy distillation (``XTokenConfig.lmbda``, `xtoken.hf.onpolicy`): the student continues each prompt,
the teachers score its text in their own tokenization, and the loss reads the generated part only.

Same tiny real models and small renumbered vocabularies as tests/test_train.py. Where a test needs a given
generation (the student stopping at once, a special token mid-text), the student's ``generate`` is replaced by
a scripted one that returns the prompt batch followed by fixed ids.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import ddp_two_steps
import numpy as np
import pytest
import torch
from ddp_two_steps import TEXTS, checksum, dataset, save_assets
from test_train import REPO, config, qwen_teacher, tiny_llama, tiny_qwen

from xtoken.hf.onpolicy import (
    OnPolicy,
    StopOnText,
    cut_at_text,
    decode_generation,
    encode_prompts,
    on_policy_batch,
)
from xtoken.train import DistillCollator, Teacher, TeacherCache, XTokenConfig, XTokenTrainer, teacher_kd_loss

torch.set_num_threads(1)
# fixtures shared with tests/test_train.py (imported under a condition, as tests/test_train_bad_input.py does)
if __name__ != "__main__":
    from test_train import W, full_W, small, stok, ttok  # noqa: F401

LOSSES = ["kl", "gold", "p_kl", "h_kl", "uld"]
PROMPTS = ["Tom has 123 apples", "A farm had 907 sheep;"]  # prefixes of TEXTS: ids of the small vocabularies


def teacher_for(loss, stok, ttok, W) -> Teacher:
    """A 'kl' teacher with the student's tokenizer, else a Qwen3 teacher whose model has the full 151,936 logits:
    the student's own text can hold words outside the test texts, which the teacher then spells with ids
    outside the small vocabulary (the columns beyond W's are padding to the losses)."""
    if loss == "kl":
        return Teacher("llama3b", tiny_llama(seed=3), stok, "kl")
    return Teacher("qwen", ddp_two_steps.tiny_qwen(seed=1), ttok, loss, projection=W)


def spy_generate(model) -> list[dict]:
    """Record each call of ``model.generate`` (mode, grad, config, stopping criteria, the number of columns it
    generated), then run the real one."""
    calls, real = [], model.generate

    def spy(**kw):
        calls.append(
            dict(
                training=model.training,
                grad=torch.is_grad_enabled(),
                config=kw["generation_config"],
                stopping=list(kw.get("stopping_criteria") or []),
            )
        )
        out = real(**kw)
        sequences = out.sequences if hasattr(out, "sequences") else out
        calls[-1]["new_columns"] = sequences.shape[1] - kw["input_ids"].shape[1]
        return out

    model.generate = spy
    return calls


def script_generate(model, continuations: list[list[int]]) -> list[dict]:
    """``model.generate`` returns the (left-padded) prompt batch followed by ``continuations[b]`` (pad-filled)."""
    calls = []

    def scripted(input_ids, attention_mask, generation_config, stopping_criteria=None):
        calls.append(
            dict(training=model.training, grad=torch.is_grad_enabled(), stopping=list(stopping_criteria or []))
        )
        n = max(1, max(len(c) for c in continuations))
        tail = torch.full((len(continuations), n), generation_config.pad_token_id, dtype=torch.long)
        for b, c in enumerate(continuations):
            tail[b, : len(c)] = torch.tensor(c, dtype=torch.long)
        return torch.cat([input_ids, tail.to(input_ids.device)], 1)

    model.generate = scripted
    return calls


def onpolicy_args(tmp_path, **kw) -> XTokenConfig:
    return config(tmp_path, **{"lmbda": 1.0, "max_new_tokens": 8, **kw})


def words(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def build(tmp_path, stok, teachers, prompts=PROMPTS, student=None, **kw):
    """(batch, generated lengths, collator, student) of one on-policy batch of ``prompts``."""
    student = student if student is not None else tiny_llama()
    col = DistillCollator(stok, teachers, max_length=kw.pop("max_length", 64))
    batch, lengths = on_policy_batch(
        student,
        col,
        list(prompts),
        [f"{i} of the batch" for i in range(len(prompts))],
        None,
        onpolicy_args(tmp_path, **kw),
    )
    return batch, lengths, col, student


# ---- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(lmbda=-0.1),
        dict(lmbda=1.5),
        dict(lmbda=math.nan),
        dict(lmbda=True),
        dict(max_new_tokens=0),
        dict(generation_temperature=-1.0),
        dict(top_p=0.0),
        dict(top_k=-1),
        dict(stop_strings="\n\n"),  # a bare string would be read as its characters
        dict(stop_strings=[""]),  # found in every text: every generation would stop at once
        dict(stop_strings=["\n\n", 3]),
    ],
)
def test_bad_generation_settings_raise(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        XTokenConfig(output_dir="x", **kw)


def test_stop_strings_setting():
    assert XTokenConfig(output_dir="x").stop_strings == []
    args = XTokenConfig(output_dir="x", stop_strings=("\n\n", "Question:"))
    assert args.stop_strings == ["\n\n", "Question:"] and isinstance(args.stop_strings, list)


def test_use_vllm_without_vllm_raises():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ValueError, match="vllm"):
        XTokenConfig(output_dir="x", use_vllm=True)


def test_cache_only_teacher_is_refused_on_policy(tmp_path, stok, ttok, W):
    teacher = qwen_teacher(ttok, W, "p_kl")
    ds = dataset(4)
    cache = TeacherCache.build(teacher, ds, DistillCollator(stok, [teacher], max_length=64))
    cache_only = Teacher("qwen", None, ttok, "p_kl", projection=W, cache=cache)
    kw = dict(model=tiny_llama(), teachers=[cache_only], train_dataset=ds, processing_class=stok)
    XTokenTrainer(args=config(tmp_path), **kw)  # off-policy: the cache is enough
    with pytest.raises(ValueError, match="teacher 'qwen' has no model"):
        XTokenTrainer(args=config(tmp_path, lmbda=0.5), **kw)


def test_on_policy_needs_a_distill_collator(tmp_path, stok):
    with pytest.raises(ValueError, match="DistillCollator"):
        XTokenTrainer(
            model=tiny_llama(),
            args=config(tmp_path, lmbda=1.0, on_policy_ce=True),
            data_collator=lambda rows: rows,
            train_dataset=dataset(4),
            processing_class=stok,
        )


def test_on_policy_without_teacher_or_ce_is_refused(tmp_path, stok):
    """lmbda > 0, no teacher, on_policy_ce False: an on-policy batch would have no loss term; refused by the
    trainer (the config alone is fine). With on_policy_ce, or off-policy (lmbda 0), it constructs."""
    kw = dict(train_dataset=dataset(2), processing_class=stok)
    args = onpolicy_args(tmp_path, lmbda=1.0)
    assert args.on_policy_ce is False, "the default: on-policy batches train KD alone"
    with pytest.raises(ValueError, match="on_policy_ce"):
        XTokenTrainer(model=tiny_llama(), args=args, teachers=[], **kw)
    with pytest.raises(ValueError, match="on_policy_ce"):
        XTokenTrainer(model=tiny_llama(), args=onpolicy_args(tmp_path, lmbda=0.5), **kw)
    trainer = XTokenTrainer(model=tiny_llama(), args=onpolicy_args(tmp_path, on_policy_ce=True), teachers=[], **kw)
    assert trainer.on_policy is not None
    assert XTokenTrainer(model=tiny_llama(), args=config(tmp_path), teachers=[], **kw).on_policy is None


# ---- the decision -------------------------------------------------------------------------------


def test_decision_is_deterministic_per_seed_step_and_micro_batch(tmp_path, stok):
    col = DistillCollator(stok, [], max_length=64)

    def draws(seed, lmbda=0.5):
        on = OnPolicy(config(tmp_path, seed=seed, lmbda=lmbda), col)
        return [on.decide(step) for step in range(1, 101) for _ in range(2)]  # two micro-batches per step

    a = draws(0)
    assert a == draws(0), "same seed, same decisions (every DDP rank draws the same)"
    assert a != draws(1)
    assert 0.3 < np.mean(a) < 0.7
    assert a[0::2] != a[1::2], "each micro-batch of a step draws on its own"
    assert all(draws(0, lmbda=1.0))
    assert not any(draws(0, lmbda=1e-12))


def test_lmbda_zero_is_exactly_off_policy(tmp_path, stok, ttok, W):
    """lmbda=0 runs no on-policy code at all; a lmbda > 0 whose draws all come out off-policy trains exactly
    the same (same losses, same parameters): the prompts in the batch and the live teacher change nothing."""

    def run(out, **kw):
        teacher = qwen_teacher(ttok, W, "h_kl")
        trainer = XTokenTrainer(
            model=tiny_llama(),
            args=config(out, **kw),
            teachers=[teacher],
            train_dataset=dataset(8),
            processing_class=stok,
        )
        trainer.train()
        return trainer, [r for r in trainer.state.log_history if "loss" in r]

    off, off_logs = run(tmp_path / "a")
    assert off.on_policy is None and "on_policy" not in off_logs[0]
    never, never_logs = run(tmp_path / "b", lmbda=1e-12)
    for r, s in zip(off_logs, never_logs):
        assert (r["loss"], r["ce"], r["kd"]) == (s["loss"], s["ce"], s["kd"])
        assert s["on_policy"] == 0.0 and "gen_tokens" not in s
    for a, b in zip(off.model.parameters(), never.model.parameters()):
        assert torch.equal(a, b)


# ---- the on-policy batch ------------------------------------------------------------------------


def test_generation_runs_without_grad_in_eval_mode_and_restores_the_mode(tmp_path, stok, ttok, W):
    student = tiny_llama()
    calls = spy_generate(student)
    for mode in (True, False):
        student.train(mode)
        build(tmp_path, stok, [qwen_teacher(ttok, W)], student=student, generation_temperature=0.7, top_k=5)
        assert student.training == mode, "the student's mode is restored"
    assert len(calls) == 2 and not any(c["training"] or c["grad"] for c in calls)
    cfg = calls[0]["config"]
    assert cfg.use_cache and cfg.do_sample and cfg.temperature == 0.7 and cfg.top_k == 5
    assert stok.eos_token_id in cfg.eos_token_id and cfg.max_new_tokens == 8
    build(tmp_path, stok, [], student=student, generation_temperature=0.0)
    assert calls[-1]["config"].do_sample is False, "temperature 0: greedy"


def test_mode_is_restored_when_generation_fails(tmp_path, stok):
    student = tiny_llama().train()

    def broken(**kw):
        raise RuntimeError("out of memory")

    student.generate = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        build(tmp_path, stok, [], student=student)
    assert student.training


def test_the_prompt_carries_no_loss_on_any_side(tmp_path, stok, ttok, W):
    """Student rows are the prompt's ids followed by the generated ids; labels, the kl mask and every chunk pair
    cover the generated part only, on the student's and the teacher's side."""
    teachers = [teacher_for("kl", stok, ttok, W), qwen_teacher(ttok, W, "p_kl")]
    gen = [words(stok, " and buys 45 more"), words(stok, " 88 were sold")]
    student = tiny_llama()
    script_generate(student, gen)
    batch, lengths, _, _ = build(tmp_path, stok, teachers, student=student)
    assert lengths == [len(g) for g in gen]
    ids, mask, labels, kd = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["kd_mask"]
    for b, (prompt, g) in enumerate(zip(PROMPTS, gen)):
        p = len(stok(prompt)["input_ids"])
        end = int(mask[b].sum())
        assert ids[b, :end].tolist() == stok(prompt)["input_ids"] + g, "the student's own ids, not re-tokenized"
        assert int(batch["gen_start"][b]) == p
        assert (labels[b, :p] == -100).all() and (labels[b, end:] == -100).all()
        assert torch.equal(labels[b, p:end], ids[b, p:end])
        assert kd[b].nonzero().squeeze(1).tolist() == list(range(p - 1, end - 1)), "logits predicting generated ids"
        entry = batch["teachers"]["qwen"]
        a = entry["alignments"][b]
        assert len(a) > 0 and (a.student_spans[:, 0] >= p).all()
        t_ids = entry["input_ids"][b][entry["attention_mask"][b] == 1].tolist()
        first_teacher = int(a.teacher_spans[0, 0])
        assert len(ttok.decode(t_ids[:first_teacher], skip_special_tokens=True)) >= len(prompt), (
            "the teacher's chunk pairs start after the prompt's text"
        )
        text = ttok.decode(t_ids, skip_special_tokens=True)
        assert text == prompt + stok.decode(g), "the teacher sees prompt + the decoded generation"
        assert torch.equal(batch["teachers"]["llama3b"]["input_ids"][b], ids[b]), "a kl teacher reuses the ids"


@pytest.mark.parametrize("loss", LOSSES)
def test_kd_reads_the_generated_part_only_and_is_positive(tmp_path, stok, ttok, W, loss):
    """On an on-policy batch each loss is finite and > 0, its gradient is zero at the student's prompt logits,
    and the teacher's logits over the prompt do not change it."""
    teacher = teacher_for(loss, stok, ttok, W)
    student = tiny_llama()
    script_generate(student, [words(stok, " and buys 45 more"), words(stok, " 88 were sold")])
    batch, _, _, _ = build(tmp_path, stok, [teacher], student=student)
    entry = batch["teachers"][teacher.name]
    torch.manual_seed(0)
    s_logits = torch.randn(*batch["input_ids"].shape, student.config.vocab_size, requires_grad=True)
    t_logits = torch.randn(*entry["input_ids"].shape, teacher.model.config.vocab_size)

    def kd(t):
        return teacher_kd_loss(
            teacher, s_logits, batch["kd_mask"], t, entry["attention_mask"], entry["alignments"], metrics=False
        )[0]

    value = kd(t_logits)
    assert math.isfinite(float(value.detach())) and float(value.detach()) > 0
    (grad,) = torch.autograd.grad(value, s_logits)
    for b, p in enumerate(batch["gen_start"].tolist()):
        assert (grad[b, : p - 1] == 0).all(), "no gradient from the prompt's logits"
        assert grad[b, p - 1 :].abs().sum() > 0
    noisy = t_logits.clone()
    for b in range(len(noisy)):
        if loss == "kl":
            t_start = int(batch["gen_start"][b])
        else:
            t_start = int(entry["alignments"][b].teacher_spans[0, 0])
        assert t_start > 2, "the prompt spans teacher positions"
        noisy[b, : t_start - 1] = torch.randn_like(noisy[b, : t_start - 1]) * 5
    assert float(kd(noisy).detach()) == pytest.approx(float(value.detach()), rel=1e-6), (
        "the teacher's prompt logits are not read"
    )


@pytest.mark.parametrize("loss", LOSSES)
def test_on_policy_training_each_loss(tmp_path, stok, ttok, W, loss):
    teacher = teacher_for(loss, stok, ttok, W)
    student = tiny_llama()
    calls = spy_generate(student)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = XTokenTrainer(
        model=student,
        args=onpolicy_args(tmp_path, generation_temperature=1.0),
        teachers=[teacher],
        train_dataset=dataset(4),
        processing_class=stok,
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(calls) == 2, "one generation per (on-policy) step"
    assert student.training, "the student is back in training mode"
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    for r in logs:
        assert r["on_policy"] == 1.0 and r["gen_tokens"] > 0
        assert math.isfinite(r["loss"]) and math.isfinite(r["kd"]) and r["kd"] > 0


def test_prompt_completion_rows(stok, ttok, W):
    """Rows with prompt + completion train on their whole text off-policy and continue the prompt on-policy."""
    col = DistillCollator(stok, [qwen_teacher(ttok, W)], max_length=64)
    col.keep_prompts = True
    rows = [
        {"prompt": "Tom has 123 apples", "completion": " and buys 45 more.", "idx": 0},
        {"text": TEXTS[1], "idx": 1},
    ]
    batch = col(rows)
    assert batch["prompts"] == ["Tom has 123 apples", TEXTS[1]]
    n = int(batch["attention_mask"][0].sum())
    assert stok.decode(batch["input_ids"][0, :n], skip_special_tokens=True) == "Tom has 123 apples and buys 45 more."
    with pytest.raises(KeyError, match="row idx 3"):
        col([{"completion": "x", "idx": 3}])


# ---- stop strings -------------------------------------------------------------------------------

ANSWER = " 7 + 5 = 12.\n#### 12\n\nTom has"  # an answer, the blank line that ends it, and what the student invents


def test_cut_at_text_keeps_the_stop_text_and_nothing_after(llama):
    """The real Llama-3 tokenizer: the row is cut just after the token that completes the first stop string."""
    prompt = llama("Tom has 7 apples and buys 5 more. How many?\nAnswer:")["input_ids"]
    row = words(llama, ANSWER)
    assert llama.convert_ids_to_tokens(row).count("ĊĊ") == 1, "the test needs '\\n\\n' as one token"
    cut = cut_at_text(llama, prompt, row, ["\n\n"])
    assert cut == row[: row.index(llama.convert_tokens_to_ids("ĊĊ")) + 1]
    text = decode_generation(llama, prompt, cut)
    assert text == " 7 + 5 = 12.\n#### 12\n\n", "the stop text is kept, nothing after it"
    assert "\n\n" not in decode_generation(llama, prompt, cut[:-1]), "the shortest prefix that holds it"
    # no stop string, or none that the text holds: unchanged
    assert cut_at_text(llama, prompt, row, []) == row
    assert cut_at_text(llama, prompt, row, ()) == row
    assert cut_at_text(llama, prompt, row, ["Question:", "\n\n\n"]) == row
    assert cut_at_text(llama, prompt, [], ["\n\n"]) == []


def test_cut_at_text_finds_a_stop_string_across_tokens_and_the_first_of_several(llama):
    prompt = llama("Answer:")["input_ids"]
    row = words(llama, ANSWER)
    tokens = llama.convert_ids_to_tokens(row)
    hash_at = tokens.index("####")
    assert tokens[hash_at - 1] == ".Ċ", "the test needs '.\\n' and '####' as two tokens"
    cut = cut_at_text(llama, prompt, row, ["\n#"])  # '\n' ends one token, '#' starts the next
    assert cut == row[: hash_at + 1]
    assert decode_generation(llama, prompt, cut) == " 7 + 5 = 12.\n####"
    # several stop strings: the one the text reaches first wins, whatever their order in the list
    assert cut_at_text(llama, prompt, row, ["\n\n", "####"]) == row[: hash_at + 1]
    assert cut_at_text(llama, prompt, row, ["Tom", "\n\n"]) == row[: tokens.index("ĊĊ") + 1]
    # two one-character tokens that make the stop string together
    nl = llama.convert_tokens_to_ids("Ċ")
    assert cut_at_text(llama, prompt, [nl, nl, *words(llama, "Tom")], ["\n\n"]) == [nl, nl]


def test_cut_at_text_ignores_a_stop_string_made_with_the_prompt(llama):
    """The prompt ends with '\\n' and the generation starts with '\\n': '\\n\\n' lies across the boundary, not in
    the generated text, so it does not stop the row (`decode_generation` reads the generated part only), for
    `cut_at_text` as for `StopOnText`; a '\\n\\n' wholly inside the prompt does not either."""
    prompt = llama("Question: 7 + 5?\n\nTom has 7 apples.\n")["input_ids"]
    assert llama.decode(prompt).endswith(".\n")
    nl = llama.convert_tokens_to_ids("Ċ")
    row = [nl, *words(llama, "12.\n#### 12")]
    assert "\n\n" in llama.decode(prompt + row) and "\n\n" not in decode_generation(llama, prompt, row)
    assert cut_at_text(llama, prompt, row, ["\n\n"]) == row
    stop = StopOnText(llama, ["\n\n"], width=len(prompt))
    assert stop(torch.tensor([prompt + row]), None).tolist() == [False]
    # a generation that starts with the stop string itself is cut after its first token
    blank = llama.convert_tokens_to_ids("ĊĊ")
    assert cut_at_text(llama, prompt, [blank, *row], ["\n\n"]) == [blank]


def test_stop_on_text_reads_the_generated_columns_per_row(llama):
    """[B, width + n] -> a bool per row: True once the row's generated text holds a stop string; the prompt
    columns (left padding, '\\n\\n' inside a prompt) never count."""
    pad = llama.convert_tokens_to_ids("<|end_of_text|>")
    prompts = [
        llama("Q: 7 + 5?\n\nA:")["input_ids"],  # '\n\n' in the prompt
        llama("Q: 7 + 5?")["input_ids"],
        llama("Q: 7 + 5?\n\nA:")["input_ids"],
    ]
    width = max(len(p) for p in prompts)
    gens = [words(llama, " 12 and Q"), words(llama, " 12\n\nQ"), words(llama, " 12\n\nQ")]
    assert len({len(g) for g in gens}) == 1
    rows = [[pad] * (width - len(p)) + p + g for p, g in zip(prompts, gens)]  # left-padded, as `generate` does
    stop = StopOnText(llama, ["\n\n"], width=width)
    done = stop(torch.tensor(rows), None)
    assert done.dtype == torch.bool and done.shape == (3,)
    assert done.tolist() == [False, True, True]
    # not yet: the generated columns before the stop token
    n = gens[1].index(llama.convert_tokens_to_ids("ĊĊ"))
    assert stop(torch.tensor([r[: width + n] for r in rows]), None).tolist() == [False, False, False]
    # several stop strings: any of them
    two = StopOnText(llama, ["Question:", " and"], width=width)
    assert two(torch.tensor(rows), None).tolist() == [True, False, False]


def test_stop_strings_in_a_scripted_batch_keep_the_stop_tokens_in_the_loss(tmp_path, stok, ttok, W):
    """A scripted generation: the batch row stops just after '.\\n####' (two tokens), which stay in the row,
    its labels, its kd mask and the teacher's text; a row without the stop string keeps all its ids."""
    head, stop_text, tail = " and buys 45 more", ".\n####", " 168 Then"
    gen = [words(stok, head + stop_text + tail), words(stok, " 88 were sold")]
    student = tiny_llama()
    calls = script_generate(student, gen)
    batch, lengths, _, _ = build(
        tmp_path, stok, [qwen_teacher(ttok, W, "p_kl")], student=student, stop_strings=[stop_text]
    )
    assert isinstance(calls[0]["stopping"][0], StopOnText), "generate gets the stopping criterion"
    kept = words(stok, head + stop_text)
    assert lengths == [len(kept), len(gen[1])]
    p = len(stok(PROMPTS[0])["input_ids"])
    end = p + len(kept)
    assert int(batch["attention_mask"][0].sum()) == end
    assert batch["input_ids"][0, p:end].tolist() == kept
    assert batch["labels"][0, p:end].tolist() == kept, "the stop tokens are trained on"
    assert (batch["labels"][0, end:] == -100).all()
    assert batch["kd_mask"][0].nonzero().squeeze(1).tolist() == list(range(p - 1, end - 1))
    entry = batch["teachers"]["qwen"]
    t_ids = entry["input_ids"][0][entry["attention_mask"][0] == 1].tolist()
    assert ttok.decode(t_ids, skip_special_tokens=True) == PROMPTS[0] + head + stop_text
    assert int(entry["alignments"][0].student_spans[:, 1].max()) == end, "the teacher scores the stop tokens too"


def test_stop_strings_stop_the_real_generation(tmp_path, stok, ttok, W):
    """The tiny student, greedy: with a stop string made of its own text, each row is its generation without stop
    strings cut just after the stop string's first occurrence, ending with it; a row whose text holds none runs to
    the budget. The stop strings end HF's generate itself (fewer columns generated), not only the cut after it."""
    budget = 8
    base_student = tiny_llama()
    base, base_lengths, _, _ = build(tmp_path, stok, [], student=base_student, generation_temperature=0.0)
    assert base_lengths == [budget, budget], "the test needs greedy generations that run to the budget"
    prompts = [stok(p)["input_ids"] for p in PROMPTS]
    full = [base["input_ids"][b, len(p) : len(p) + budget].tolist() for b, p in enumerate(prompts)]
    texts = [decode_generation(stok, p, g) for p, g in zip(prompts, full)]
    own = [decode_generation(stok, p, g[1:3]) for p, g in zip(prompts, full)]  # two tokens of each row's text
    assert own[0] not in texts[1], "the test needs a stop string only row 0's text holds"

    def expected(g, p, stops):
        k = next((k for k in range(1, len(g) + 1) if any(s in decode_generation(stok, p, g[:k]) for s in stops)), None)
        return g if k is None else g[:k]

    for stops in ([own[0]], own):
        student = tiny_llama()
        calls = spy_generate(student)
        batch, lengths, _, _ = build(
            tmp_path,
            stok,
            [teacher_for("p_kl", stok, ttok, W)],  # all of Qwen's ids: no `fit_to_teachers` cut
            student=student,
            generation_temperature=0.0,
            stop_strings=stops,
        )
        assert len(calls[0]["stopping"]) == 1 and isinstance(calls[0]["stopping"][0], StopOnText)
        for b, (p, g) in enumerate(zip(prompts, full)):
            n = lengths[b]
            got = batch["input_ids"][b, len(p) : len(p) + n].tolist()
            assert got == expected(g, p, stops), f"row {b}"
            assert n <= base_lengths[b], "no longer than without stop strings"
            text = decode_generation(stok, p, got)
            if n < budget:
                assert any(text.endswith(s) for s in stops) and not any(
                    s in decode_generation(stok, p, got[:-1]) for s in stops
                )
            end = len(p) + n
            assert batch["labels"][b, len(p) : end].tolist() == got and (batch["labels"][b, end:] == -100).all()
            assert batch["kd_mask"][b].nonzero().squeeze(1).tolist() == list(range(len(p) - 1, end - 1))
        if stops == [own[0]]:
            assert lengths[0] < budget and lengths[1] == budget
            assert calls[0]["new_columns"] == budget, "row 1 runs on"
        else:
            assert max(lengths) < budget
            assert calls[0]["new_columns"] == max(lengths) < budget, "generate stopped once every row was done"


# ---- CE on on-policy batches (on_policy_ce) ------------------------------------------------------

GEN = [" and buys 45 more", " 88 were sold"]  # the scripted generations: words of the small vocabularies
ROWS = [{"prompt": p, "completion": t[len(p) :], "idx": i} for i, (p, t) in enumerate(zip(PROMPTS, TEXTS))]


def one_micro_batch(tmp_path, stok, ttok, W, gen=GEN, **kw):
    """One micro-batch of `ROWS` through the trainer as `training_step` does it (on-policy with probability lmbda,
    the student generating ``gen``, then `compute_loss` in training mode), with a live P-KL teacher.
    Returns (trainer, the inputs compute_loss got, the loss, its gradient over the student's parameters,
    the metrics recorded for the log). Static weights (ce_weight * CE + kd_weight * KD) unless kw sets
    dynamic_kd_scale (on by default in XTokenConfig)."""
    kw = {"dynamic_kd_scale": False, **kw}
    student = tiny_llama()
    script_generate(student, [words(stok, g) if isinstance(g, str) else g for g in gen])
    trainer = XTokenTrainer(
        model=student,
        args=onpolicy_args(tmp_path, **kw),
        teachers=[qwen_teacher(ttok, W, "p_kl")],
        train_dataset=dataset(2),
        processing_class=stok,
    )
    inputs = trainer.data_collator([dict(r) for r in ROWS])
    if trainer.on_policy is not None:
        inputs = trainer.on_policy.prepare(student, inputs, 1)
    student.train()
    loss = trainer.compute_loss(student, inputs)
    grads = torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad])
    metrics = {k: v[-1] for k, v in trainer._metrics.items()}
    return trainer, inputs, loss.detach(), grads, metrics


def ce_and_kd(trainer, inputs):
    """(CE, KD) of ``inputs`` under the trainer's student, computed apart from compute_loss (on the graph)."""
    model = trainer.model
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return trainer._ce(logits, inputs["labels"]), trainer.kd_loss(inputs, logits, {}, check=False)


def grad_of(trainer, value):
    return torch.autograd.grad(value, [p for p in trainer.model.parameters() if p.requires_grad], retain_graph=True)


def assert_grads_close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def grads_differ(a, b) -> bool:
    return any(not torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))


def test_on_policy_batch_trains_kd_alone_by_default(tmp_path, stok, ttok, W):
    """on_policy_ce False (the default): an on-policy batch's loss is kd_weight * KD, its value and its gradient,
    whatever ce_weight is; CE is still computed and recorded (finite, > 0)."""
    runs = {w: one_micro_batch(tmp_path / str(w), stok, ttok, W, ce_weight=w, kd_weight=0.7) for w in (0.3, 5.0)}
    trainer, inputs, loss, grads, m = runs[0.3]
    assert m["on_policy"] == 1.0 and m["gen_tokens"] > 0
    assert inputs["ce_weight"] == 0.0, "prepare marks the on-policy batch"
    assert math.isfinite(m["ce"]) and m["ce"] > 0 and m["kd"] > 0
    assert float(loss) == pytest.approx(0.7 * m["kd"], rel=1e-6)
    assert float(loss) != pytest.approx(0.3 * m["ce"] + 0.7 * m["kd"], rel=1e-3)
    ce, kd = ce_and_kd(trainer, inputs)
    assert float(ce.detach()) == pytest.approx(m["ce"], rel=1e-6), "the recorded CE is the batch's CE"
    assert_grads_close(grads, grad_of(trainer, 0.7 * kd))
    assert grads_differ(grads, grad_of(trainer, 0.3 * ce + 0.7 * kd)), "the test needs CE to move the gradient"
    _, _, loss5, grads5, m5 = runs[5.0]
    assert torch.equal(loss, loss5), "ce_weight changes nothing on an on-policy batch"
    assert all(torch.equal(a, b) for a, b in zip(grads, grads5))
    assert m5["ce"] == m["ce"] and m5["kd"] == m["kd"]


def test_on_policy_ce_trains_ce_on_the_sample_too(tmp_path, stok, ttok, W):
    """on_policy_ce True: the same on-policy batch trains ce_weight * CE + kd_weight * KD."""
    trainer, inputs, loss, grads, m = one_micro_batch(
        tmp_path, stok, ttok, W, ce_weight=0.3, kd_weight=0.7, on_policy_ce=True
    )
    assert m["on_policy"] == 1.0 and "ce_weight" not in inputs
    assert m["ce"] > 0 and m["kd"] > 0
    assert float(loss) == pytest.approx(0.3 * m["ce"] + 0.7 * m["kd"], rel=1e-6)
    ce, kd = ce_and_kd(trainer, inputs)
    assert_grads_close(grads, grad_of(trainer, 0.3 * ce + 0.7 * kd))
    # the same batch (same generation, same models) without on_policy_ce: the same CE and KD, only KD trained
    _, _, loss_kd, grads_kd, m_kd = one_micro_batch(tmp_path / "b", stok, ttok, W, ce_weight=0.3, kd_weight=0.7)
    assert (m_kd["ce"], m_kd["kd"]) == (m["ce"], m["kd"])
    assert float(loss - loss_kd) == pytest.approx(0.3 * m["ce"], rel=1e-5)
    assert grads_differ(grads, grads_kd)


@pytest.mark.parametrize("how", ["lmbda_0", "decision_off", "all_empty_fallback"])
def test_off_policy_batches_keep_ce(tmp_path, stok, ttok, W, how):
    """Off-policy batches train ce_weight * CE + kd_weight * KD whatever on_policy_ce is: lmbda 0, a lmbda > 0
    whose draw is off, and an on-policy draw in which no row generated anything (trained off-policy)."""
    kw = dict(
        lmbda_0=dict(lmbda=0.0),
        decision_off=dict(lmbda=1e-12),
        all_empty_fallback=dict(gen=[[stok.eos_token_id]] * 2),
    )[how]
    trainer, inputs, loss, grads, m = one_micro_batch(tmp_path, stok, ttok, W, ce_weight=0.3, kd_weight=0.7, **kw)
    assert trainer.args.on_policy_ce is False and "ce_weight" not in inputs
    assert m.get("on_policy", 0.0) == 0.0
    assert m["ce"] > 0 and m["kd"] > 0
    assert float(loss) == pytest.approx(0.3 * m["ce"] + 0.7 * m["kd"], rel=1e-6)
    ce, kd = ce_and_kd(trainer, inputs)
    assert_grads_close(grads, grad_of(trainer, 0.3 * ce + 0.7 * kd))
    assert grads_differ(grads, grad_of(trainer, 0.7 * kd))


def test_dynamic_kd_scale_reads_ce_on_a_kd_alone_batch(tmp_path, stok, ttok, W):
    """dynamic_kd_scale with on_policy_ce False: CE is not trained on the on-policy batch but still sets the scale:
    kd_scale == ce / kd, the loss's value is kd_weight * CE and its gradient is kd_weight * (ce / kd) * grad KD."""
    trainer, inputs, loss, grads, m = one_micro_batch(
        tmp_path, stok, ttok, W, ce_weight=0.3, kd_weight=0.7, dynamic_kd_scale=True
    )
    assert m["on_policy"] == 1.0 and inputs["ce_weight"] == 0.0
    assert m["ce"] > 0 and m["kd"] > 0 and m["ce"] != pytest.approx(m["kd"], rel=1e-3)
    assert m["kd_scale"] == pytest.approx(m["ce"] / m["kd"], rel=1e-6)
    assert float(loss) == pytest.approx(0.7 * m["ce"], rel=1e-6)
    ce, kd = ce_and_kd(trainer, inputs)
    scale = float(ce.detach() / kd.detach())
    assert_grads_close(grads, grad_of(trainer, 0.7 * scale * kd))


def test_kd_alone_on_policy_through_train_logs_ce(tmp_path, stok, ttok, W):
    """Two real on-policy steps (the student generating, on_policy_ce False): the logs carry a finite ce > 0, and
    the logged loss is kd_weight * kd, not ce_weight * ce + kd_weight * kd."""
    trainer = XTokenTrainer(
        model=tiny_llama(),
        args=onpolicy_args(tmp_path, ce_weight=0.5, kd_weight=0.7, dynamic_kd_scale=False, max_steps=2),
        teachers=[teacher_for("p_kl", stok, ttok, W)],
        train_dataset=dataset(4),
        processing_class=stok,
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2
    for r in logs:
        assert r["on_policy"] == 1.0 and r["gen_tokens"] > 0
        assert math.isfinite(r["ce"]) and r["ce"] > 0 and r["kd"] > 0
        assert r["loss"] == pytest.approx(0.7 * r["kd"], rel=1e-3, abs=1e-4)
        assert r["loss"] != pytest.approx(0.5 * r["ce"] + 0.7 * r["kd"], rel=1e-2)


# ---- bad input ----------------------------------------------------------------------------------


def test_prompt_without_room_to_generate_raises_naming_the_row(tmp_path, stok):
    rows = [{"text": TEXTS[0], "idx": 5}, {"text": TEXTS[1], "idx": 6}]
    trainer = XTokenTrainer(
        model=tiny_llama(),
        args=onpolicy_args(tmp_path, max_length=16, on_policy_ce=True),
        train_dataset=rows,
        processing_class=stok,
    )
    with pytest.raises(ValueError, match=r"row idx [56]: the prompt is \d+ student tokens, but max_length=16"):
        trainer.train()
    n = len(stok("Tom has 123 apples")["input_ids"])
    assert encode_prompts(stok, ["Tom has 123 apples"], n + 1, ["r"])  # exactly max_length - 1: room for one
    with pytest.raises(ValueError, match="row r"):
        encode_prompts(stok, ["Tom has 123 apples"], n, ["r"])


def test_empty_prompt_without_bos_raises(ttok):
    with pytest.raises(ValueError, match="row 1 of the batch: the prompt has no student token"):
        encode_prompts(ttok, ["Tom", ""], 64, ["0 of the batch", "1 of the batch"])


def test_special_token_mid_generation_cuts_it(tmp_path, stok, ttok, W):
    """The student emits a chat marker mid-text: the generation ends there (the marker and what follows are
    dropped); an id past the tokenizer (a padded logit column) ends it too."""
    head, tail = words(stok, " and buys"), words(stok, " 45 more")
    marker = stok.convert_tokens_to_ids("<|eot_id|>")
    student = tiny_llama()
    script_generate(student, [head + [marker] + tail, head + [len(stok) + 3] + tail])
    batch, lengths, _, _ = build(tmp_path, stok, [qwen_teacher(ttok, W)], student=student)
    assert lengths == [len(head), len(head)]
    for b, prompt in enumerate(PROMPTS):
        n = int(batch["attention_mask"][b].sum())
        assert batch["input_ids"][b, :n].tolist() == stok(prompt)["input_ids"] + head
        entry = batch["teachers"]["qwen"]
        t_ids = entry["input_ids"][b][entry["attention_mask"][b] == 1].tolist()
        assert ttok.decode(t_ids) == prompt + " and buys"


def test_empty_generation_row_has_no_positions(tmp_path, stok, ttok, W):
    student = tiny_llama()
    script_generate(student, [[stok.eos_token_id, 5, 6], words(stok, " 88 were sold")])
    batch, lengths, _, _ = build(tmp_path, stok, [qwen_teacher(ttok, W, "h_kl")], student=student)
    assert lengths[0] == 0 and lengths[1] > 0
    assert (batch["labels"][0] == -100).all() and not batch["kd_mask"][0].any()
    assert len(batch["teachers"]["qwen"]["alignments"][0]) == 0
    assert len(batch["teachers"]["qwen"]["alignments"][1]) > 0


def test_all_empty_generations_train_off_policy_with_a_warning(tmp_path, stok, ttok, W, caplog):
    """No row generated anything: the batch trains off-policy (a real loss, not a silent zero), warned and
    counted."""
    student = tiny_llama()
    script_generate(student, [[stok.eos_token_id]] * 2)
    trainer = XTokenTrainer(
        model=student,
        args=onpolicy_args(tmp_path, max_steps=1),
        teachers=[qwen_teacher(ttok, W, "p_kl")],
        train_dataset=dataset(2),
        processing_class=stok,
    )
    with caplog.at_level(logging.WARNING, logger="xtoken.hf.onpolicy"):
        trainer.train()
    (r,) = [r for r in trainer.state.log_history if "loss" in r]
    assert r["on_policy"] == 0.0 and r["gen_empty_rows"] == 1.0 and r["gen_tokens"] == 0.0
    assert r["loss"] > 0 and r["kd"] > 0
    assert trainer.on_policy.empty_batches == 1
    assert "trained off-policy instead" in caplog.text


def test_batch_without_prompts_raises(tmp_path, stok):
    col = DistillCollator(stok, [], max_length=64)
    batch = col([{"text": TEXTS[0]}])  # keep_prompts not set
    with pytest.raises(ValueError, match="no 'prompts'"):
        OnPolicy(onpolicy_args(tmp_path), col).prepare(tiny_llama(), batch, 1)


# ---- DDP ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_ranks_on_policy(tmp_path, small):
    """Two on-policy steps (lmbda=1.0) under torchrun on two CPU ranks (gloo): both ranks draw the same decisions,
    each generates for its own shard of the rows, the loss stays finite, and DDP keeps the students equal."""
    save_assets(tmp_path, *small)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    script = str(REPO / "tests" / "ddp_two_steps.py")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        script,
        str(tmp_path),
        str(tmp_path),
        "p_kl_onpolicy",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["decisions"] == ranks[1]["decisions"] == [True, True], "the same draws on every rank"
    assert ranks[0]["on_policy"] == [1.0, 1.0] and all(g > 0 for g in ranks[0]["gen_tokens"])
    for step in range(2):
        a, b = ranks[0]["shards"][step], ranks[1]["shards"][step]
        assert len(a) == len(b) == 2 and not set(a) & set(b), "each rank generates for its own rows"
        prompts = [r["prompts"][step] for r in ranks]
        assert not set(prompts[0]) & set(prompts[1]), "different prompts per rank"
        assert all(
            p == ddp_two_steps.prompt_dataset(8)[i]["prompt"]
            for r in ranks
            for p, i in zip(r["prompts"][step], r["shards"][step])
        )
        assert ranks[0]["rows"][step] != ranks[1]["rows"][step]
    assert all(math.isfinite(x) for r in ranks for x in r["losses"]) and len(ranks[0]["losses"]) == 2
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9), "DDP kept the ranks in sync"
    assert ranks[0]["checksum"] != pytest.approx(checksum(tiny_llama()), rel=1e-9), "DDP must train"


def test_generation_a_restricted_teacher_cannot_embed_is_cut(tmp_path, stok, ttok, W):
    """The student writes a word outside the teacher model's (restricted) vocabulary: the generation is cut before
    that token, so the teacher never reads an id it has no embedding for (it raised IndexError in the embedding);
    what comes before it is kept and scored."""
    head, tail = words(stok, " and buys"), words(stok, " 45 more")
    outside = words(stok, " zebra")
    teacher = Teacher("qwen", tiny_qwen(), ttok, "p_kl", projection=W)  # the model: the small vocabulary only
    n_emb = teacher.model.get_input_embeddings().num_embeddings
    assert max(words(ttok, " zebra")) >= n_emb, "the test needs a word the teacher model cannot embed"
    student = tiny_llama()
    script_generate(student, [head + outside + tail, head + tail])
    batch, lengths, _, _ = build(tmp_path, stok, [teacher], student=student)
    assert lengths == [len(head), len(head + tail)]
    entry = batch["teachers"]["qwen"]
    assert int(entry["input_ids"][entry["attention_mask"] == 1].max()) < n_emb
    assert ttok.decode(entry["input_ids"][0][entry["attention_mask"][0] == 1].tolist()) == PROMPTS[0] + " and buys"
    assert len(entry["alignments"][0]) > 0
