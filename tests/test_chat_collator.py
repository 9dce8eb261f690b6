"""Chat rows in `DistillCollator` and on-policy (xtoken.hf.collator, xtoken.hf.chat_onpolicy): each side renders the
messages with its own template, the loss covers the assistant contents and each side's end-of-turn token, paired
across tokenizers by W; on-policy, the student's end-of-turn is kept and paired with the teacher's.

Real Llama-3 / Qwen3 tokenizers renumbered to small vocabularies (the ids of these conversations in both
templates, as tests/test_train.py does for its texts), W from results/ restricted to them, tiny real models.
"""

from __future__ import annotations

import copy
import math

import ddp_two_steps
import pytest
import torch
from test_onpolicy import script_generate
from test_train import config as train_config

from xtoken.chat import encode_chat, with_chat_template
from xtoken.hf.onpolicy import on_policy_batch
from xtoken.projection import Projection
from xtoken.train import DistillCollator, Teacher, XTokenConfig, XTokenTrainer, teacher_kd_loss

torch.set_num_threads(1)
LOSSES = ["kl", "gold", "p_kl", "h_kl", "uld"]
CONVS = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 12+30?"},
        {"role": "assistant", "content": "12 + 30 = 42."},
        {"role": "user", "content": "Spell it, naïvely."},
        {"role": "assistant", "content": "Forty-two."},
    ],
    [
        {"role": "user", "content": "Tom has 123 apples and buys 45 more. How many?"},
        {"role": "assistant", "content": "123 + 45 = 168 apples."},
    ],
]
GENERATED = [" Forty two", " 168 apples"]  # what the scripted student answers (words of the conversations)


def answers(conv) -> list[str]:
    return [m["content"] for m in conv if m["role"] == "assistant"]


def small_chat_vocab(tok, family):
    """(renumbered tokenizer with the family's template, local_to_full): the ids of CONVS and GENERATED as the
    template renders them, plus bos/eos/pad and every end-of-turn token."""
    from xtoken.mini.models import restrict_tokenizer

    full = with_chat_template(copy.deepcopy(tok), family)
    keep = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}
    keep.update(tok.convert_tokens_to_ids(s) for s in ("<|end_of_text|>", "<|endoftext|>") if s in tok.get_vocab())
    for conv in CONVS:
        keep.update(encode_chat(full, conv).input_ids)
        keep.update(encode_chat(full, conv[:-1] + [{"role": "assistant", "content": g} for g in GENERATED]).input_ids)
    local, l2f = restrict_tokenizer(tok, sorted(keep))
    return with_chat_template(local, family), l2f


@pytest.fixture(scope="module")
def chat_small(llama, qwen):
    """(student tokenizer, teacher tokenizer, W) over the small vocabularies, both with their templates."""
    s_tok, s_l2f = small_chat_vocab(llama, "llama")
    t_tok, t_l2f = small_chat_vocab(qwen, "qwen3")
    W = Projection.load("results/W_Llama-3.2-1B_to_Qwen3-4B.safetensors")
    return s_tok, t_tok, W.restrict(s_l2f, t_l2f, student_tok=s_tok, teacher_tok=t_tok)


def student_model(W, seed=0):
    return ddp_two_steps.tiny_llama(vocab_size=W.student_vocab_size, seed=seed)


def teacher_for(loss, s_tok, t_tok, W) -> Teacher:
    """A 'kl' teacher with the student's tokenizer, else a Qwen3 teacher with all 151,936 logits (on-policy text
    can hold teacher ids outside the small vocabulary)."""
    if loss == "kl":
        return Teacher("llama3b", student_model(W, seed=3), s_tok, "kl")
    return Teacher("qwen", ddp_two_steps.tiny_qwen(seed=1), t_tok, loss, projection=W)


def rows():
    return [{"messages": conv, "idx": i} for i, conv in enumerate(CONVS)]


def real(entry, b):
    """Row b of a batch side, padding dropped."""
    return entry["input_ids"][b][entry["attention_mask"][b] == 1].tolist()


# ---- off-policy chat rows -----------------------------------------------------------------------


def test_chat_rows_train_on_assistant_turns_and_end_of_turn(chat_small):
    s_tok, t_tok, W = chat_small
    col = DistillCollator(s_tok, [teacher_for("p_kl", s_tok, t_tok, W)], max_length=128, chat=True)
    batch = col(rows())
    eot_s, eot_t = s_tok.convert_tokens_to_ids("<|eot_id|>"), t_tok.convert_tokens_to_ids("<|im_end|>")
    entry = batch["teachers"]["qwen"]
    for b, conv in enumerate(CONVS):
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        assert s_tok.decode(ids[labels != -100]) == "".join(a + "<|eot_id|>" for a in answers(conv))
        assert torch.equal(labels[labels != -100], ids[labels != -100])
        assert batch["kd_mask"][b, :-1].tolist() == (labels[1:] != -100).long().tolist(), "logit p predicts p + 1"
        assert int(batch["loss_tokens"][b]) == int((labels != -100).sum())
        s_loss = set((labels != -100).nonzero().squeeze(1).tolist())
        t_ids = real(entry, b)
        t_enc = encode_chat(t_tok, conv)
        assert t_ids == t_enc.input_ids, "the teacher renders the messages with its own template"
        t_loss = set(t_enc.loss_mask.nonzero().squeeze(1).tolist())
        a = entry["alignments"][b]
        assert len(a) > 0
        for (sa, sb), (ta, tb), special in zip(a.student_spans.tolist(), a.teacher_spans.tolist(), a.is_special):
            assert set(range(sa, sb)) <= s_loss and set(range(ta, tb)) <= t_loss, "chunks in assistant turns only"
            assert special == (int(ids[sa]) == eot_s), "the end-of-turn tokens are one special chunk"
            if special:
                assert (sb - sa, tb - ta, t_ids[ta]) == (1, 1, eot_t)
                assert W.indices[eot_s].tolist()[0] == eot_t, "W pairs them"
        assert a.is_special.sum() == len(answers(conv)), "one end-of-turn pair per assistant turn"
        paired = {p for sa, sb in a.student_spans.tolist() for p in range(sa, sb)}
        assert paired | set(a.student_unpaired.tolist()) == s_loss


@pytest.mark.parametrize("loss", LOSSES)
def test_kd_losses_on_a_chat_batch_read_assistant_turns_only(chat_small, loss):
    s_tok, t_tok, W = chat_small
    teacher = teacher_for(loss, s_tok, t_tok, W)
    batch = DistillCollator(s_tok, [teacher], max_length=128, chat=True)(rows())
    entry = batch["teachers"][teacher.name]
    torch.manual_seed(0)
    used = kd_on_random_logits(teacher, batch, entry, W)
    assert not (used & (batch["kd_mask"] == 0)).any(), "no gradient at logits predicting prompt or template tokens"
    assert used.any()


def test_trainer_trains_on_chat_rows(tmp_path, chat_small):
    """A dataset with a 'messages' column: XTokenTrainer's default collator renders it per side."""
    s_tok, t_tok, W = chat_small
    student = student_model(W)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = XTokenTrainer(
        model=student,
        args=config(tmp_path),
        teachers=[Teacher("qwen", ddp_two_steps.tiny_qwen(W.teacher_vocab_size), t_tok, "p_kl", projection=W)],
        train_dataset=rows() * 2,
        processing_class=s_tok,
    )
    assert trainer.data_collator.chat
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in logs)
    assert all(0 <= r["qwen/unpaired_share"] < 0.5 for r in logs), "share of the loss positions, not of the row"
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def config(tmp_path, **kw) -> XTokenConfig:
    """tests/test_train.py's config with room for a whole rendered conversation (128 tokens)."""
    return train_config(tmp_path, **{"max_length": 128, **kw})


def kd_on_random_logits(teacher, batch: dict, entry: dict, W) -> torch.Tensor:
    """The teacher's KD loss on random student and teacher logits over ``batch``: asserts it is finite and > 0,
    returns [B, L] bool, the student logits that received a gradient."""
    s_logits = torch.randn(*batch["input_ids"].shape, W.student_vocab_size, requires_grad=True)
    t_logits = torch.randn(*entry["input_ids"].shape, teacher.model.config.vocab_size)
    value, _ = teacher_kd_loss(
        teacher, s_logits, batch["kd_mask"], t_logits, entry["attention_mask"], entry["alignments"], metrics=False
    )
    assert math.isfinite(float(value.detach())) and float(value.detach()) > 0
    (grad,) = torch.autograd.grad(value, s_logits)
    return grad.abs().sum(-1) > 0


# ---- bad input ----------------------------------------------------------------------------------


def bare_tokenizer(name: str):
    """A tokenizer of no chat family (no template, no family's markers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1, "</s>": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")
    tok.name_or_path = name
    return tok


def test_a_side_without_chat_template_raises_at_construction(chat_small):
    s_tok, t_tok, W = chat_small
    unchecked_W = object()  # a W the collator cannot check against the tokenizers: the chat check comes next
    mystery = Teacher("mystery", None, bare_tokenizer("mystery-model"), "uld", projection=unchecked_W)
    with pytest.raises(ValueError, match=r"teacher 'mystery' tokenizer \(mystery-model\) has no chat template"):
        DistillCollator(s_tok, [mystery], max_length=64, chat=True)
    with pytest.raises(ValueError, match="the student tokenizer"):
        DistillCollator(bare_tokenizer("x"), [], max_length=64, chat=True)
    with pytest.raises(ValueError, match="side 'mystery'.*pick the template of this tokenizer's own family"):
        DistillCollator(s_tok, [mystery], max_length=64, chat={"mystery": "qwen3"})
    DistillCollator(s_tok, [mystery], max_length=64)  # text rows only: no template needed
    cached = Teacher("qwen", None, t_tok, "p_kl", projection=W, cache=object())
    with pytest.raises(ValueError, match=r"teacher\(s\) \['qwen'\] have a TeacherCache"):
        DistillCollator(s_tok, [cached], max_length=128, chat=True)(rows())


def test_chat_rows_need_chat_and_a_batch_of_one_kind(chat_small):
    s_tok, t_tok, W = chat_small
    with pytest.raises(ValueError, match=r"row idx 0 has 'messages' but the collator was built without chat=True"):
        DistillCollator(s_tok, [], max_length=64)(rows())
    col = DistillCollator(s_tok, [], max_length=64, chat=True)
    with pytest.raises(ValueError, match=r"mixes chat rows .* text rows \(idx 7\)"):
        col(rows() + [{"text": "Tom has 123 apples", "idx": 7}])
    bad = [{"messages": [{"role": "user", "content": "What is 12+30?"}], "idx": 4}]
    with pytest.raises(ValueError, match="row idx 4: .*no assistant turn"):
        col(bad)


def test_text_rows_are_unchanged_by_chat(chat_small):
    """A chat-enabled collator batches text rows exactly as a plain one (the text path is untouched)."""
    s_tok, t_tok, W = chat_small
    teacher = Teacher("qwen", None, t_tok, "p_kl", projection=W)
    text_rows = [{"text": "Tom has 123 apples and buys 45 more.", "idx": 0}, {"text": "What is 12+30?", "idx": 1}]
    plain = DistillCollator(s_tok, [teacher], max_length=64)(text_rows)
    chat = DistillCollator(s_tok, [teacher], max_length=64, chat=True)(text_rows)
    assert plain.keys() == chat.keys() and "kd_mask" not in plain and "loss_tokens" not in plain
    for key in ("input_ids", "attention_mask", "labels", "idx"):
        assert torch.equal(plain[key], chat[key])
    p, c = plain["teachers"]["qwen"], chat["teachers"]["qwen"]
    assert torch.equal(p["input_ids"], c["input_ids"])
    for a, b in zip(p["alignments"], c["alignments"]):
        assert (a.student_spans == b.student_spans).all() and (a.teacher_spans == b.teacher_spans).all()


# ---- on-policy chat rows ------------------------------------------------------------------------


def chat_on_policy(tmp_path, chat_small, teachers, continuations, max_new_tokens=8):
    """(batch, generated lengths, student) of one on-policy batch of CONVS, the student's answers scripted."""
    s_tok, _, W = chat_small
    col = DistillCollator(s_tok, teachers, max_length=128, chat=True)
    col.keep_prompts = True
    prompts = col(rows())["prompts"]
    student = student_model(W)
    script_generate(student, continuations)
    args = config(tmp_path, lmbda=1.0, max_new_tokens=max_new_tokens)
    batch, lengths = on_policy_batch(student, col, prompts, ["idx 0", "idx 1"], [0, 1], args)
    return batch, lengths, prompts


def test_chat_on_policy_keeps_the_end_of_turn_on_both_sides(tmp_path, chat_small):
    """Row 0 stops at <|eot_id|>: kept as its last generated token and paired with the teacher's <|im_end|>
    (appended after the decoded answer). Row 1 hits max_new_tokens: no end-of-turn on either side."""
    s_tok, t_tok, W = chat_small
    eot_s, eot_t = s_tok.convert_tokens_to_ids("<|eot_id|>"), t_tok.convert_tokens_to_ids("<|im_end|>")
    words = [s_tok(g, add_special_tokens=False)["input_ids"] for g in GENERATED]
    # scripted rows of one length (a shorter one would be pad-filled, and the pad, Llama's eos, is a stop);
    # what follows the end-of-turn in row 0 is dropped, row 1 never stops (it has used up max_new_tokens)
    rows_ids = [words[0] + [eot_s, words[1][0]], words[1] + words[0][:1]]
    assert len(rows_ids[0]) == len(rows_ids[1])
    answer = [GENERATED[0], GENERATED[1] + s_tok.decode(words[0][:1])]
    teacher = teacher_for("p_kl", s_tok, t_tok, W)
    batch, lengths, prompts = chat_on_policy(tmp_path, chat_small, [teacher], rows_ids, len(rows_ids[1]))
    assert prompts[0] == CONVS[0][:-1] and prompts[1] == CONVS[1][:-1], "the messages before the last answer"
    assert lengths == [len(words[0]) + 1, len(rows_ids[1])]
    entry = batch["teachers"]["qwen"]
    for b in range(2):
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        p = int(batch["gen_start"][b])
        prompt_text = s_tok.apply_chat_template(prompts[b], tokenize=False, add_generation_prompt=True)
        assert s_tok.decode(ids[:p]) == prompt_text, "the student's template with the generation prompt"
        t_ids, a = real(entry, b), entry["alignments"][b]
        t_prompt = t_tok.apply_chat_template(prompts[b], tokenize=False, add_generation_prompt=True)
        if b == 0:
            assert s_tok.decode(ids[labels != -100]) == GENERATED[0] + "<|eot_id|>"
            assert t_tok.decode(t_ids) == t_prompt + GENERATED[0] + "<|im_end|>"
            (sa, sb), (ta, tb) = a.student_spans[-1].tolist(), a.teacher_spans[-1].tolist()
            assert a.is_special[-1] and (int(ids[sa]), t_ids[ta]) == (eot_s, eot_t), "the stops are paired"
            assert sb == int(batch["attention_mask"][b].sum()) and tb == len(t_ids)
            assert int(batch["kd_mask"][b, sa - 1]) == 1, "the logit deciding to stop is distilled"
        else:
            assert s_tok.decode(ids[labels != -100]) == answer[1]
            assert t_tok.decode(t_ids) == t_prompt + answer[1], "no end-of-turn appended"
            assert not a.is_special.any()
        assert (a.student_spans[:, 0] >= p).all() and len(a.student_unpaired) == 0
        assert s_tok.decode(ids[a.student_spans[0, 0] : int(batch["attention_mask"][b].sum())]).startswith(answer[b])


def test_chat_on_policy_eos_pairs_with_the_teachers_end_of_text_and_markers_are_dropped(tmp_path, chat_small):
    """Row 0 stops at eos (<|end_of_text|>, role end_of_text): kept, and the teacher appends its token of that
    role (<|endoftext|>), as W pairs them. Row 1 emits a chat marker mid-answer: cut there and dropped, as for
    text rows (it is no end of turn), so that row has no end-of-turn."""
    s_tok, t_tok, W = chat_small
    eos_s, eos_t = s_tok.eos_token_id, t_tok.convert_tokens_to_ids("<|endoftext|>")
    marker = s_tok.convert_tokens_to_ids("<|start_header_id|>")
    words = [s_tok(g, add_special_tokens=False)["input_ids"] for g in GENERATED]
    scripted = [words[0] + [eos_s, words[1][0]], words[1][:1] + [marker] + words[1][1:]]
    assert len(scripted[0]) == len(scripted[1])
    batch, lengths, _ = chat_on_policy(tmp_path, chat_small, [teacher_for("gold", s_tok, t_tok, W)], scripted)
    assert lengths == [len(words[0]) + 1, 1]
    entry = batch["teachers"]["qwen"]
    a0, a1 = entry["alignments"]
    (sa, _), (ta, _) = a0.student_spans[-1].tolist(), a0.teacher_spans[-1].tolist()
    assert a0.is_special[-1] and (int(batch["input_ids"][0, sa]), real(entry, 0)[ta]) == (eos_s, eos_t)
    assert real(entry, 0)[-1] == eos_t
    p, end = int(batch["gen_start"][1]), int(batch["attention_mask"][1].sum())
    assert batch["input_ids"][1, p:end].tolist() == words[1][:1] and not a1.is_special.any()


@pytest.mark.parametrize("loss", ["kl", "p_kl", "uld"])
def test_chat_on_policy_kd_reads_the_answer_and_its_stop(tmp_path, chat_small, loss):
    s_tok, t_tok, W = chat_small
    teacher = teacher_for(loss, s_tok, t_tok, W)
    eot_s = s_tok.convert_tokens_to_ids("<|eot_id|>")
    words = [s_tok(g, add_special_tokens=False)["input_ids"] + [eot_s] for g in GENERATED]
    batch, _, _ = chat_on_policy(tmp_path, chat_small, [teacher], words)
    entry = batch["teachers"][teacher.name]
    used = kd_on_random_logits(teacher, batch, entry, W)
    assert not (used & (batch["kd_mask"] == 0)).any()
    for b in range(2):
        end = int(batch["attention_mask"][b].sum())
        assert used[b, end - 2], "the logit predicting the kept end-of-turn is trained"


def test_chat_on_policy_training(tmp_path, chat_small):
    """lmbda=1 on chat rows with the student's real (sampled) generations: finite, KD > 0, the student moves."""
    s_tok, t_tok, W = chat_small
    student = student_model(W)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = XTokenTrainer(
        model=student,
        args=config(tmp_path, lmbda=1.0, max_new_tokens=6, generation_temperature=1.0),
        teachers=[teacher_for("h_kl", s_tok, t_tok, W)],
        train_dataset=rows() * 2,
        processing_class=s_tok,
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert all(r["on_policy"] == 1.0 and r["gen_tokens"] > 0 for r in logs)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kd"]) for r in logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
