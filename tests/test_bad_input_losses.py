"""The losses, the trainer's W checks and the alignment refuse bad input loudly instead of returning wrong numbers."""

import math
from pathlib import Path

import pytest
import torch

from xtoken.align import align, align_batch
from xtoken.losses import gold_loss, h_kl_loss, kl_loss, p_kl_loss, uld_loss
from xtoken.projection import Projection, ProjectionMismatch

RESULTS = Path(__file__).resolve().parents[1] / "results"
TEXT = "The 3 cats ate 201 apples and 45 pears on 12 May 2024."
CROSS = {"p_kl": p_kl_loss, "gold": gold_loss, "h_kl": h_kl_loss}


@pytest.fixture(scope="module")
def w_qwen(llama, qwen):
    return Projection.load(RESULTS / "W_Llama-3.2-1B_to_Qwen3-4B.safetensors", llama, qwen)


@pytest.fixture(scope="module")
def w_phi(llama, phi):
    return Projection.load(RESULTS / "W_Llama-3.2-1B_to_Phi-4-mini-instruct.safetensors", llama, phi)


@pytest.fixture(scope="module")
def pair(llama, qwen):
    """Real Llama / Qwen3 ids of one text, their alignment, and random logits at the models' full widths."""
    s_ids = llama(TEXT)["input_ids"]
    t_ids = qwen(TEXT)["input_ids"]
    a = align(s_ids, t_ids, llama, qwen)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, len(s_ids), 128256, generator=g) * 2
    t = torch.randn(1, len(t_ids), 151936, generator=g) * 2
    return s, t, [a]


def _call(name, s, t, alignments, W, **kw):
    if name == "uld":
        return uld_loss(s, t, alignments, **kw)
    return CROSS[name](s, t, alignments, W, **kw)


# ---- item: W paired with the wrong tokenizers -------------------------------------------------------


def test_teacher_refuses_a_w_built_for_another_teacher(qwen, w_phi):
    from xtoken.train import Teacher

    with pytest.raises(ProjectionMismatch, match="teacher tokenizer 'microsoft/Phi-4-mini-instruct'"):
        Teacher("qwen3", None, qwen, loss="p_kl", projection=w_phi)


def test_collator_refuses_a_w_built_for_another_student(phi, qwen, w_qwen):
    from xtoken.train import DistillCollator, Teacher

    teacher = Teacher("qwen3", None, qwen, loss="h_kl", projection=w_qwen)
    with pytest.raises(ProjectionMismatch, match="student tokenizer 'meta-llama/Llama-3.2-1B'"):
        DistillCollator(phi, [teacher])


@pytest.mark.parametrize("name", list(CROSS))
def test_losses_check_w_against_the_tokenizers_given(name, llama, qwen, phi, pair, w_qwen, w_phi):
    s, t, al = pair
    CROSS[name](s, t, al, w_qwen, student_tok=llama, teacher_tok=qwen, metrics=False)
    with pytest.raises(ProjectionMismatch, match="teacher tokenizer"):
        CROSS[name](s, t, al, w_phi, student_tok=llama, teacher_tok=qwen)
    with pytest.raises(ProjectionMismatch, match="student tokenizer"):
        CROSS[name](s, t, al, w_qwen, student_tok=phi)


@pytest.mark.parametrize("name", list(CROSS))
def test_w_of_another_teacher_fails_on_width_without_tokenizers(name, pair, w_phi):
    """Phi's W has 200,064 teacher columns, Qwen3's logits 151,936: no silent narrowing to a finite loss."""
    s, t, al = pair
    with pytest.raises(ValueError, match="teacher logits have 151936 columns, narrower than W's 200064"):
        CROSS[name](s, t, al, w_phi)


def test_swapped_logits_say_so(pair, w_qwen):
    s, t, al = pair
    with pytest.raises(ValueError, match="swapped"):
        p_kl_loss(t, s, al, w_qwen)
    # the same lengths on both sides: the widths tell
    n = min(s.shape[1], t.shape[1])
    a = align(al[0].student_ids[:n], al[0].teacher_ids[:n], *_toks())
    with pytest.raises(ValueError, match=r"teacher logits have 128256 columns.*swapped"):
        p_kl_loss(t[:, :n], s[:, :n], [a], w_qwen)


def _toks():
    from xtoken import load_tokenizer

    return load_tokenizer("meta-llama/Llama-3.2-1B"), load_tokenizer("Qwen/Qwen3-4B")


def test_alignments_must_fit_the_batch(pair, w_qwen):
    s, t, al = pair
    with pytest.raises(ValueError, match="2 alignments for student logits of batch size 1"):
        p_kl_loss(s, t, al * 2, w_qwen)
    with pytest.raises(ValueError, match="student logits must be"):
        p_kl_loss(s[0], t, al, w_qwen)


# ---- item: dtypes, temperature, -inf teachers -------------------------------------------------------


@pytest.mark.parametrize("name", ["p_kl", "h_kl", "gold", "uld"])
def test_half_precision_inputs_compute_in_float32(name, pair, w_qwen):
    s, t, al = pair
    ref = _call(name, s, t, al, w_qwen)[0]
    for s_dt, t_dt in (
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float16),
    ):
        x = s.detach().to(s_dt).clone().requires_grad_(True)
        loss, _ = _call(name, x, t.to(t_dt), al, w_qwen)
        assert loss.dtype == torch.float32 and math.isfinite(float(loss.detach()))
        # the inputs' rounding only: bf16 keeps 8 bits of mantissa
        assert float(loss.detach()) == pytest.approx(float(ref), rel=2e-2, abs=2e-3)
        loss.backward()
        assert x.grad.dtype == s_dt and bool(x.grad.isfinite().all()) and bool(x.grad.abs().sum() > 0)


def test_kl_half_precision(pair):
    s, _, _ = pair
    t = torch.randn(s.shape, generator=torch.Generator().manual_seed(1))
    ref = kl_loss(s, t)[0]
    x = s.half().requires_grad_(True)
    loss = kl_loss(x, t.bfloat16())[0]
    assert float(loss) == pytest.approx(float(ref), rel=2e-2)
    loss.backward()
    assert x.grad.dtype == torch.float16 and bool(x.grad.isfinite().all())


@pytest.mark.parametrize("temperature", [0, -1, float("nan"), float("inf"), "hot"])
@pytest.mark.parametrize("name", ["kl", "p_kl", "gold", "h_kl", "uld"])
def test_temperature_must_be_finite_and_positive(name, temperature, pair, w_qwen):
    s, t, al = pair
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        if name == "kl":
            kl_loss(s, s.detach(), temperature=temperature)
        else:
            _call(name, s, t, al, w_qwen, temperature=temperature)


def _top_k_masked(x, k):
    """Logits with everything but each row's k largest set to -inf (a top-k teacher)."""
    kth = x.topk(k, -1).values[..., -1:]
    return x.masked_fill(x < kth, float("-inf"))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_with_a_top_k_masked_teacher(direction, pair):
    s, _, _ = pair
    t = _top_k_masked(torch.randn(s.shape, generator=torch.Generator().manual_seed(2)) * 3, 50)
    x = s.clone().requires_grad_(True)
    loss, _ = kl_loss(x, t, direction=direction)
    loss.backward()
    assert math.isfinite(float(loss)) and bool(x.grad.isfinite().all())
    lp_s, lp_t = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    if direction == "forward":  # sum over the teacher's support only (0 log 0 = 0)
        ref = torch.where(lp_t > -math.inf, lp_t.exp() * (lp_t - lp_s), 0.0).sum(-1).mean()
    else:  # the teacher's zeros clamped at EPS on the right
        ref = (lp_s.exp() * (lp_s - lp_t.clamp_min(math.log(1e-12)))).sum(-1).mean()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize(
    "name,merge",
    [
        ("p_kl", "w"),
        ("p_kl", "chain"),
        ("p_kl", "first"),
        ("p_kl", "mean"),
        ("gold", None),
        ("h_kl", None),
        ("uld", None),
    ],
)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_cross_tokenizer_losses_with_a_top_k_masked_teacher(name, merge, direction, pair, w_qwen):
    s, t, al = pair
    t = _top_k_masked(t, 50)
    x = s.clone().requires_grad_(True)
    kw = {"direction": direction} if name != "uld" else {}
    if merge:
        kw["merge"] = merge
    loss, metrics = _call(name, x, t, al, w_qwen, **kw)
    loss.backward()
    assert math.isfinite(float(loss)) and bool(x.grad.isfinite().all())
    assert all(math.isfinite(v) for v in metrics.values())


# ---- item: padded teacher columns ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name,merge",
    [
        ("p_kl", None),
        ("p_kl", "chain"),
        ("p_kl", "first"),
        ("p_kl", "mean"),
        ("gold", None),
        ("h_kl", None),
        ("uld", None),
    ],
)
def test_padded_teacher_columns_have_zero_probability(name, merge, qwen, pair, w_qwen):
    """Qwen3: 151,669 tokens, 151,936 logits. High logits on the 267 padded columns change nothing."""
    s, t, al = pair
    high = t.clone()
    high[..., 151669:] = 30.0
    kw = {"merge": merge} if merge else {}
    if name == "uld":
        kw["teacher_tok"] = qwen  # no W: the tokenizer tells where the padding starts
    ref = _call(name, s, t[..., :151669], al, w_qwen.with_teacher_width(151669), **kw)[0]
    assert float(_call(name, s, high, al, w_qwen, **kw)[0]) == float(ref)
    # a W file from before teacher_tokens, loaded without the tokenizer: the loss's teacher_tok tells instead
    old = Projection.load(RESULTS / "W_Llama-3.2-1B_to_Qwen3-4B.safetensors")
    if name != "uld":
        assert float(_call(name, s, high, al, old, teacher_tok=qwen, **kw)[0]) == float(ref)


def test_padded_columns_in_kl_with_the_tokenizer(qwen):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(1, 4, 151936, generator=g), torch.randn(1, 4, 151936, generator=g)
    ref = kl_loss(s[..., :151669], t[..., :151669])[0]
    t[..., 151669:] = 30.0
    assert float(kl_loss(s, t, teacher_tok=qwen)[0]) == float(ref)


def test_kl_shapes(pair):
    s, _, _ = pair
    with pytest.raises(ValueError, match=r"differ in \[batch, length\]"):
        kl_loss(s, s[:, :-1].detach())
    with pytest.raises(ValueError, match="mask has shape"):
        kl_loss(s, s.detach(), torch.ones(1, 3))


# ---- item: alignment ids and shapes --------------------------------------------------------------------


def test_align_refuses_ignore_index_ids(llama, qwen):
    s_ids, t_ids = llama(TEXT)["input_ids"], qwen(TEXT)["input_ids"]
    with pytest.raises(ValueError, match=r"student id -100 at position 0 .*valid ids are 0\.\.128255.*-100"):
        align([-100] + s_ids[1:], t_ids, llama, qwen)
    with pytest.raises(ValueError, match="teacher id 151936 at position 2 is not an id of 'Qwen/Qwen3-4B'"):
        align(s_ids, t_ids[:2] + [151936] + t_ids[3:], llama, qwen)
    # padding outside the mask may hold anything (labels' -100 included)
    a = align(s_ids + [-100, -100], t_ids, llama, qwen, student_mask=[1] * len(s_ids) + [0, 0])
    assert len(a) == len(align(s_ids, t_ids, llama, qwen))


def test_align_shape_mistakes(llama, qwen):
    s_ids, t_ids = llama(TEXT)["input_ids"], qwen(TEXT)["input_ids"]
    with pytest.raises(ValueError, match="use align_batch"):
        align([s_ids], [t_ids], llama, qwen)
    with pytest.raises(ValueError, match="student_mask has shape"):
        align(s_ids, t_ids, llama, qwen, student_mask=[1] * (len(s_ids) - 1))
    with pytest.raises(ValueError, match="teacher_ids has 1 rows, student_ids 2"):
        align_batch([s_ids, s_ids], [t_ids], llama, qwen)
    a = align(s_ids, t_ids, llama, qwen)
    with pytest.raises(ValueError, match="side must be 'student' or 'teacher'"):
        a.token_table("Student")
    with pytest.raises(IndexError, match=f"chunk {len(a)} out of range"):
        a.chunk_bytes(len(a), llama, qwen)
