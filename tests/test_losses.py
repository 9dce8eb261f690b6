"""Losses (xtoken.losses): brute force on a tiny vocabulary, gradcheck, Proposition 1, real W, TRL parity."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xtoken.align import Alignment, align
from xtoken.losses import (
    dynamic_kd_scale,
    generalized_kl,
    gold_loss,
    h_kl_loss,
    hybrid_divergence,
    kl_loss,
    p_kl_divergence,
    p_kl_loss,
    project_to_teacher,
    sorted_l1,
    uld_loss,
    w_plan,
)
from xtoken.projection import EMPTY, EXACT, MULTI, Projection, build_projection

# ---- a tiny W: student a, b, ab, c, <empty>; teacher a, b, c, d ---------------------------------
G = 0.1
W_AB = tuple(float(np.float32(x)) for x in (0.9 / 0.99, 0.09 / 0.99))  # 'ab' -> 'a','b' (W stores float32)


def tiny_projection():
    idx = torch.tensor([[0, -1], [1, -1], [0, 1], [2, -1], [-1, -1]])
    w = torch.tensor([[1.0, 0], [1.0, 0], [W_AB[0], W_AB[1]], [1.0, 0], [0, 0]])
    kind = torch.tensor([EXACT, EXACT, MULTI, EXACT, EMPTY], dtype=torch.uint8)
    return Projection(idx, w, kind, 4, {"beta": 0.9, "gamma": G})


W_DENSE = np.zeros((5, 4))
W_DENSE[0, 0] = W_DENSE[1, 1] = W_DENSE[3, 2] = 1
W_DENSE[2, 0], W_DENSE[2, 1] = W_AB


def manual_alignment(s_ids, t_ids, s_spans, t_spans):
    """An Alignment built by hand: positions not in a span are unpaired."""
    s_cov = {p for a, b in s_spans for p in range(a, b)}
    t_cov = {p for a, b in t_spans for p in range(a, b)}
    return Alignment(
        np.array(s_spans, dtype=np.int64),
        np.array(t_spans, dtype=np.int64),
        np.array([p for p in range(len(s_ids)) if p not in s_cov], dtype=np.int64),
        np.array([p for p in range(len(t_ids)) if p not in t_cov], dtype=np.int64),
        np.array(s_ids),
        np.array(t_ids),
        (0, len(s_ids)),
        (0, len(t_ids)),
        np.zeros(len(s_spans), dtype=bool),
    )


# chunks of length 1-3 on each side; position 0 unpaired (no predicting logit)
S_IDS, T_IDS = [4, 2, 3, 0, 1, 3, 0], [3, 0, 1, 2, 0, 1, 2, 1]
S_SPANS, T_SPANS = [(1, 2), (2, 4), (4, 7)], [(1, 3), (3, 5), (5, 8)]


def tiny_inputs(dtype=torch.float64, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, len(S_IDS), 5 + 1, generator=g, dtype=dtype)  # one padded column
    t = torch.randn(batch, len(T_IDS), 4 + 2, generator=g, dtype=dtype)  # two padded columns
    aligns = [manual_alignment(S_IDS, T_IDS, S_SPANS, T_SPANS)] * batch
    return s, t, aligns


def softmax(x, T):
    e = np.exp(x / T - (x / T).max())
    return e / e.sum()


def brute_chunks(s, t, T, merge):
    """Chunk distributions by explicit loops over the definitions (C1), (C2)."""
    out = []
    for b in range(s.shape[0]):
        for (a, e), (c, d) in zip(S_SPANS, T_SPANS):
            p = [softmax(s[b, j - 1, :5], T) for j in range(a, e)]
            q_s = p[0] * np.prod([p[i][S_IDS[a + i]] for i in range(1, e - a)])
            pt = [softmax(t[b, j - 1, :4], T) for j in range(c, d)]
            if merge == "w":
                om = np.array([0.9 * G**i for i in range(d - c)])
                q_t = sum(w * x for w, x in zip(om / om.sum(), pt))
            else:  # chain
                q_t = pt[0] * np.prod([pt[i][T_IDS[c + i]] for i in range(1, d - c)])
            out.append((q_s, q_t))
    return out


def gen_kl(q, r):
    """(D), with the documented clamp of zero right-hand entries at EPS = 1e-12."""
    return sum(qi * math.log(qi / max(ri, 1e-12)) for qi, ri in zip(q, r) if qi > 0) - sum(q) + sum(r)


def brute_l1(a, b):
    a, b = sorted(a, reverse=True), sorted(b, reverse=True)
    n = max(len(a), len(b))
    a, b = a + [0] * (n - len(a)), b + [0] * (n - len(b))
    return sum(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["p_kl", "gold", "h_kl"])
def test_metrics_brute_force(name):
    """Every logged metric against the full chunk distributions (the losses read them from the slices
    they exponentiate, or from the mass and the logits, never from a full-width exp)."""
    s, t, aligns = tiny_inputs(seed=3)
    s[0, 2, 1] = 4.0  # a confident chunk: a clear argmax
    W = tiny_projection()
    fn = {"p_kl": p_kl_loss, "gold": gold_loss, "h_kl": h_kl_loss}[name]
    _, m = fn(s, t, aligns, W, student_vocab_size=5, teacher_vocab_size=4)
    chunks = brute_chunks(s.numpy(), t.numpy(), 1.0, "w" if name == "p_kl" else "chain")
    pair = {"gold": W.exact_pairs(), "h_kl": W.top1()}.get(name)
    want = {
        k: []
        for k in (
            "student_chunk_mass",
            "teacher_chunk_mass",
            "mass_lost_empty_rows",
            "top1_agreement",
            "student_common_mass",
            "teacher_common_mass",
        )
    }
    for q_s, q_t in chunks:
        want["student_chunk_mass"].append(q_s.sum())
        want["teacher_chunk_mass"].append(q_t.sum())
        want["mass_lost_empty_rows"].append(q_s[4])
        if name == "p_kl":
            r = q_s @ W_DENSE
            want["top1_agreement"].append(float(r.argmax() == q_t.argmax()))
            want["student_common_mass"].append(r.sum())
            want["teacher_common_mass"].append(q_t[W_DENSE.sum(0) > 0].sum())
        else:
            common = pair.numpy()[:5] >= 0
            want["top1_agreement"].append(float(pair[int(q_s.argmax())] == q_t.argmax()))
            want["student_common_mass"].append(q_s[common].sum())
            want["teacher_common_mass"].append(q_t[np.unique(pair.numpy()[:5][common])].sum())
    for k, v in want.items():
        assert m[k] == pytest.approx(np.mean(v), rel=1e-10, abs=1e-12), k


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_p_kl_brute_force(T, direction):
    s, t, aligns = tiny_inputs()
    loss, m = p_kl_loss(
        s, t, aligns, tiny_projection(), temperature=T, direction=direction, student_vocab_size=5, teacher_vocab_size=4
    )
    ref = []
    for q_s, q_t in brute_chunks(s.numpy(), t.numpy(), T, "w"):
        r = q_s @ W_DENSE
        ref.append(gen_kl(q_t, r) if direction == "forward" else gen_kl(r, q_t))
    assert loss.item() == pytest.approx(np.mean(ref), rel=1e-10)
    assert m["n_chunks"] == 6
    empty = np.mean([q_s[4] for q_s, _ in brute_chunks(s.numpy(), t.numpy(), T, "w")])
    assert m["mass_lost_empty_rows"] == pytest.approx(empty, rel=1e-10)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gold_and_h_kl_brute_force(direction):
    s, t, aligns = tiny_inputs(seed=1)
    kw = dict(temperature=1.5, direction=direction, student_vocab_size=5, teacher_vocab_size=4)
    gold, _ = gold_loss(s, t, aligns, tiny_projection(), **kw)
    hkl, _ = h_kl_loss(s, t, aligns, tiny_projection(), **kw)
    ref_gold, ref_hkl = [], []

    def kl_terms(pairs):
        if direction == "forward":
            return sum(x * math.log(x / y) for x, y in pairs)
        return sum(y * math.log(y / x) for x, y in pairs)

    for q_s, q_t in brute_chunks(s.numpy(), t.numpy(), 1.5, "chain"):
        # GOLD: C = {(a,a), (b,b), (c,c)}; uncommon student {ab, <empty>}, teacher {d}
        ref_gold.append(
            kl_terms([(q_t[0], q_s[0]), (q_t[1], q_s[1]), (q_t[2], q_s[3])]) + brute_l1([q_s[2], q_s[4]], [q_t[3]])
        )
        # H-KL: 'a' and 'ab' share top-1 'a' -> group sum; uncommon student {<empty>}, teacher {d}
        ref_hkl.append(
            kl_terms([(q_t[0], q_s[0] + q_s[2]), (q_t[1], q_s[1]), (q_t[2], q_s[3])]) + brute_l1([q_s[4]], [q_t[3]])
        )
    assert gold.item() == pytest.approx(np.mean(ref_gold), rel=1e-10)
    assert hkl.item() == pytest.approx(np.mean(ref_hkl), rel=1e-10)


def test_uld_brute_force():
    s, t, aligns = tiny_inputs(seed=2)
    loss, _ = uld_loss(s, t, aligns, student_vocab_size=5, teacher_vocab_size=4)
    ref = [brute_l1(list(q_s), list(q_t)) for q_s, q_t in brute_chunks(s.numpy(), t.numpy(), 1.0, "chain")]
    assert loss.item() == pytest.approx(np.mean(ref), rel=1e-10)


def test_kl_loss_brute_force_and_mask():
    g = torch.Generator().manual_seed(3)
    s, t = (
        torch.randn(2, 3, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 7, generator=g, dtype=torch.float64),
    )
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    for direction in ("forward", "reverse"):
        loss, m = kl_loss(s, t, mask, temperature=2.0, direction=direction, vocab_size=5)
        ref = []
        for b, p in mask.nonzero().tolist():
            ps, pt = softmax(s[b, p, :5].numpy(), 2.0), softmax(t[b, p, :5].numpy(), 2.0)
            ref.append(gen_kl(pt, ps) if direction == "forward" else gen_kl(ps, pt))
        assert loss.item() == pytest.approx(np.mean(ref), rel=1e-10) and m["n_positions"] == 4


def test_w_consistent_merge_gives_zero_for_perfect_pair():
    """Student delta on 'ab' (2 teacher tokens 'a','b'), teacher deltas on 'a' then 'b': P-KL = 0.
    Taking the teacher's first position only (merge='first') leaves a positive loss."""
    s = torch.full((1, 3, 5), -60.0, dtype=torch.float64)
    t = torch.full((1, 4, 4), -60.0, dtype=torch.float64)
    s[0, 0, 2] = 0  # logit 0 predicts student token 1 = 'ab'
    t[0, 0, 0] = 0  # teacher logit 0 predicts 'a', logit 1 predicts 'b'
    t[0, 1, 1] = 0
    a = manual_alignment([4, 2, 3], [3, 0, 1, 2], [(1, 2)], [(1, 3)])
    loss, _ = p_kl_loss(s, t, [a], tiny_projection())
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    first, _ = p_kl_loss(s, t, [a], tiny_projection(), merge="first")
    assert first.item() > 0.05


@pytest.mark.parametrize(
    "name",
    ["p_kl_w", "p_kl_chain", "p_kl_mean", "p_kl_rev", "gold", "gold_rev", "h_kl", "h_kl_rev", "uld", "kl", "kl_rev"],
)
def test_gradcheck(name):
    s, t, aligns = tiny_inputs(batch=1, seed=4)
    s.requires_grad_(True)
    proj = tiny_projection()
    kw = dict(temperature=1.3, chunk_size=2)  # several blocks: the eager per-block gradient path
    other = s.detach().clone()  # gradcheck perturbs s in place: the teacher must not alias it
    fns = {
        "p_kl_w": lambda x: p_kl_loss(x, t, aligns, proj, **kw)[0],
        "p_kl_chain": lambda x: p_kl_loss(x, t, aligns, proj, merge="chain", **kw)[0],
        "p_kl_mean": lambda x: p_kl_loss(x, t, aligns, proj, merge="mean", **kw)[0],
        "p_kl_rev": lambda x: p_kl_loss(x, t, aligns, proj, direction="reverse", **kw)[0],
        "gold": lambda x: gold_loss(x, t, aligns, proj, **kw)[0],
        "gold_rev": lambda x: gold_loss(x, t, aligns, proj, direction="reverse", **kw)[0],
        "h_kl": lambda x: h_kl_loss(x, t, aligns, proj, **kw)[0],
        "h_kl_rev": lambda x: h_kl_loss(x, t, aligns, proj, direction="reverse", **kw)[0],
        "uld": lambda x: uld_loss(x, t, aligns, **kw)[0],
        "kl": lambda x: kl_loss(x, other[:, :, [1, 0, 2, 3, 5, 4]] * 0.7, temperature=1.3, chunk_size=3)[0],
        "kl_rev": lambda x: kl_loss(x, other * 0.5, direction="reverse", chunk_size=3)[0],
    }
    assert torch.autograd.gradcheck(fns[name], (s,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_blocks_do_not_change_value_or_gradient():
    s, t, aligns = tiny_inputs(batch=3, seed=5)
    outs = []
    for cs in (1, 4, 1000):
        x = s.clone().requires_grad_(True)
        loss, _ = p_kl_loss(x, t, aligns, tiny_projection(), chunk_size=cs)
        loss.backward()
        outs.append((loss.item(), x.grad.clone()))
    for v, g in outs[1:]:
        assert v == pytest.approx(outs[0][0], rel=1e-12) and torch.allclose(g, outs[0][1])


def test_dynamic_kd_scale():
    ce = torch.tensor(2.0, requires_grad=True)
    kd = torch.tensor(0.05, requires_grad=True)
    out = dynamic_kd_scale(ce, kd)
    out.backward()
    assert out.item() == pytest.approx(2.0) and ce.grad is None and kd.grad.item() == pytest.approx(40.0)


# ---- real W ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w_llama_qwen(llama, qwen):
    return build_projection(llama, qwen)


def test_projected_mass_is_one_minus_empty_rows(w_llama_qwen):
    W = w_llama_qwen
    p = torch.softmax(torch.randn(2, W.student_vocab_size, generator=torch.Generator().manual_seed(0)) * 3, -1)
    plan = w_plan(W, W.student_vocab_size, W.teacher_vocab_size, "cpu")
    r = project_to_teacher(p, plan.rows, plan.cols, plan.w, W.teacher_vocab_size)
    empty = p[:, W.row_kind == EMPTY].sum(-1)
    assert (W.row_kind == EMPTY).any()
    assert torch.allclose(r.sum(-1), 1 - empty, atol=1e-5)
    assert (r >= 0).all()


def _numeral_subset(llama, qwen, W):
    lv, qv = llama.get_vocab(), qwen.get_vocab()
    words = ["the", "Ġthe", "Ġcat", "+", "=", "Ġ"]
    s_tokens = [str(i) for i in range(1000)] + words
    t_tokens = [str(i) for i in range(10)] + words
    s_ids = [lv[x] for x in s_tokens if x in lv]
    t_ids = [qv[x] for x in t_tokens if x in qv]
    return W.restrict(s_ids, t_ids), [x for x in s_tokens if x in lv], [x for x in t_tokens if x in qv]


def test_proposition_1(llama, qwen, w_llama_qwen):
    """GOLD's common term pushes every uncommon logit down by exactly p_S[j] M_C(T); P-KL does not."""
    Wr, s_tok, t_tok = _numeral_subset(llama, qwen, w_llama_qwen)
    v_s, v_t = Wr.student_vocab_size, Wr.teacher_vocab_size
    assert v_s >= 1000 and v_t >= 10
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, v_s, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(1, v_t, generator=g, dtype=torch.float64)
    t_logits[0, t_tok.index("2")] += 4
    t_logits[0, t_tok.index("0")] += 2
    q_t = torch.softmax(t_logits, -1)

    plan = w_plan(Wr, v_s, v_t, "cpu", "exact")
    uncommon = plan.pairing.s_uncommon
    multi_digit = torch.tensor([i for i, x in enumerate(s_tok) if x.isdigit() and len(x) > 1])
    assert set(multi_digit.tolist()) <= set(uncommon.tolist())  # Table 8: no multi-digit numeral in C
    d, *_ = hybrid_divergence(torch.log_softmax(z, -1), q_t, plan, uld_weight=0.0)
    (grad,) = torch.autograd.grad(d.sum(), z)
    p = torch.softmax(z, -1).detach()
    m_c = q_t[0, plan.pairing.t_common].sum()
    ratio = grad[0, uncommon] / (p[0, uncommon] * m_c)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-10)
    assert (grad[0, uncommon] > 0).all()

    prep_p = w_plan(Wr, v_s, v_t, "cpu")
    d, *_ = p_kl_divergence(torch.log_softmax(z, -1), q_t, prep_p)
    (grad,) = torch.autograd.grad(d.sum(), z)
    pushed_up = grad[0, multi_digit] < 0
    assert pushed_up.any() and not pushed_up.all()
    assert grad[0, s_tok.index("20")] < 0  # '20' -> '2','0': the teacher's favourites


def test_p_kl_with_real_alignment_and_padded_teacher_vocab(llama, qwen, w_llama_qwen):
    """End to end on real tokenizers: Qwen's 267 padded logit columns carry no probability."""
    text = "In 2024 we sold 1,234 apples."
    s_ids, t_ids = llama(text)["input_ids"], qwen(text)["input_ids"]
    a = align(s_ids, t_ids, llama, qwen)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, len(s_ids), 128256, generator=g)
    t = torch.randn(1, len(t_ids), 151936, generator=g)
    base, m = p_kl_loss(s, t, [a], w_llama_qwen, teacher_vocab_size=len(qwen))
    t[:, :, len(qwen) :] = 1e4  # padded columns: must be ignored
    again, _ = p_kl_loss(s, t, [a], w_llama_qwen, teacher_vocab_size=len(qwen))
    assert again.item() == pytest.approx(base.item(), rel=1e-6)
    assert m["n_chunks"] == a.predictable.sum() and 0 < m["teacher_chunk_mass"] <= 1


# ---- parity with TRL 1.16.0's GOLD hybrid loss ------------------------------------------------------


def test_gold_matches_trl_on_one_to_one_alignment(llama, qwen, w_llama_qwen, tmp_path):
    """Where the definitions agree (1:1 alignment, string-identical tokens, forward KL on the matched set
    with full-softmax probabilities, unit weights, sorted L1 on the rest), the values agree."""
    trl_gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    from trl.experimental.gold.gold_config import GOLDConfig

    text = "The cat sat on the mat and the dog ran in the park"
    s_ids, t_ids = llama(text, add_special_tokens=False)["input_ids"], qwen(text)["input_ids"]
    assert llama.convert_ids_to_tokens(s_ids) == qwen.convert_ids_to_tokens(t_ids)
    cfg = GOLDConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        use_uld_loss=True,
        use_extended_uld=False,
        uld_use_hybrid_loss=True,
        uld_hybrid_matched_weight=1.0,
        uld_hybrid_unmatched_weight=1.0,
        beta=0.0,
        uld_token_merge_strategy="bayesian",
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
    )
    uld = trl_gold.ULDLoss(cfg, student_tokenizer=llama, teacher_tokenizer=qwen)
    n = len(s_ids)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, n, 128256, generator=g)
    t = torch.randn(1, n, 151936, generator=g)
    t[:, :, len(qwen) :] = -float("inf")  # Qwen's padded columns
    # specials: TRL matches by token string (Llama/Qwen specials differ), we by role; make them negligible
    s[:, :, 128000:] = -40
    t[:, :, 151643 : len(qwen)] = -40
    labels = torch.tensor([[-100] + s_ids[1:]])
    ref = uld(s, t, labels, labels, torch.tensor([s_ids]), torch.tensor([t_ids]))
    a = manual_alignment(s_ids, t_ids, [(i, i + 1) for i in range(n)], [(i, i + 1) for i in range(n)])
    ours, m = gold_loss(s, t, [a], w_llama_qwen, teacher_vocab_size=len(qwen))
    assert m["n_chunks"] == n - 1
    assert ours.item() == pytest.approx(ref.item(), rel=2e-4)


# ---- fast paths against plain autograd references ---------------------------------------------------


def _random_projection(v_s, v_t, k, seed):
    """Random W pattern with empty rows, one-entry rows and columns, shared columns, and teacher ids no
    row reaches (off W's image)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v_t - 3, (v_s, k), generator=g)  # the last 3 teacher ids: off the image
    n_entries = torch.randint(0, k + 1, (v_s,), generator=g)
    idx[torch.arange(k).unsqueeze(0) >= n_entries.unsqueeze(1)] = -1
    w = torch.rand(v_s, k, generator=g, dtype=torch.float64) * (idx >= 0)
    kind = torch.where(n_entries == 0, EMPTY, torch.where(n_entries == 1, EXACT, MULTI))
    return Projection(idx, w.float(), kind, v_t, {"beta": 0.9, "gamma": G})


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("v_t,k", [(30, 5), (400, 2)])
def test_projected_kl_fast_path_matches_autograd_reference(direction, seed, v_t, k):
    """_ProjectedKL (image-only r, gather + small scatter, hand-written backward) == project_to_teacher +
    generalized_kl under autograd: value, gradient on log q and on the W entries. Two W patterns: many
    entries per teacher column (30 ids: mostly scatter-add) and mostly one (400 ids: mostly gather)."""
    v_s = 40
    W = _random_projection(v_s, v_t, k, seed)
    plan = w_plan(W, v_s, v_t, "cpu")
    g = torch.Generator().manual_seed(seed + 10)
    z = (torch.randn(5, v_s, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    q_t = torch.softmax(torch.randn(5, v_t, generator=g, dtype=torch.float64) * 3, -1) * 0.9
    q_t[0, :4] = 0  # zero teacher entries
    w = plan.w.double().requires_grad_(True)
    d, r, image, _ = p_kl_divergence(torch.log_softmax(z, -1), q_t, plan, direction, w)
    scale = torch.rand(5, generator=g, dtype=torch.float64)
    gz, gw = torch.autograd.grad((d * scale).sum(), (z, w))

    r_ref = project_to_teacher(torch.softmax(z, -1), plan.rows, plan.cols, w, v_t)
    d_ref = generalized_kl(q_t, r_ref) if direction == "forward" else generalized_kl(r_ref, q_t)
    gz_ref, gw_ref = torch.autograd.grad((d_ref * scale).sum(), (z, w))
    assert torch.allclose(d, d_ref, atol=1e-10, rtol=1e-10)
    assert torch.allclose(r, r_ref[:, image], atol=1e-12) and (r_ref[:, ~plan.image] == 0).all()
    assert torch.allclose(gz, gz_ref, atol=1e-9, rtol=1e-8)
    assert torch.allclose(gw, gw_ref, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("n_a,n_b", [(7, 30), (30, 7), (12, 12), (0, 5), (5, 0), (1, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sorted_l1_partitioned_matches_full_sort(n_a, n_b, dtype):
    """_SortedL1 (partition, sort the k largest only, numpy) == full descending sorts under autograd."""
    g = torch.Generator().manual_seed(n_a * 100 + n_b)
    a = torch.softmax(torch.randn(4, n_a, generator=g, dtype=dtype) * 3, -1) if n_a else torch.zeros(4, 0, dtype=dtype)
    b = (
        torch.softmax(torch.randn(4, n_b, generator=g, dtype=dtype) * 3, -1) * 0.8
        if n_b
        else torch.zeros(4, 0, dtype=dtype)
    )
    if n_a > 2:
        a[0, :2] = 0  # zeros in the student's tail
    a.requires_grad_(True)
    k_max = max(n_a, n_b)
    ref = (
        (
            F.pad(a.sort(-1, descending=True).values, (0, k_max - n_a))
            - F.pad(b.sort(-1, descending=True).values, (0, k_max - n_b))
        )
        .abs()
        .sum(-1)
    )
    out = sorted_l1(a, b)
    scale = torch.rand(4, generator=g, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(out, ref, atol=tol)
    if n_a:
        (g_out,) = torch.autograd.grad((out * scale).sum(), a)
        (g_ref,) = torch.autograd.grad((ref * scale).sum(), a)
        assert torch.equal(g_out, g_ref)
        assert torch.allclose(sorted_l1(b, a), out.detach(), atol=tol)  # teacher first: same value


@pytest.mark.parametrize("name", ["p_kl", "gold", "h_kl", "kl"])
def test_metrics_off_changes_nothing_but_the_metrics(name):
    s, t, aligns = tiny_inputs()
    fn = {"p_kl": p_kl_loss, "gold": gold_loss, "h_kl": h_kl_loss}.get(name)
    outs = []
    for metrics in (True, False):
        x = s.clone().requires_grad_(True)
        if fn is None:
            loss, m = kl_loss(x, s.detach().flip(0), metrics=metrics)
        else:
            loss, m = fn(x, t, aligns, tiny_projection(), metrics=metrics)
        loss.backward()
        outs.append((loss.detach(), x.grad, m))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert "top1_agreement" in outs[0][2] and "top1_agreement" not in outs[1][2]
    assert outs[1][2]["loss"] == outs[0][2]["loss"]


def test_default_blocks_follow_the_vocabulary_width():
    """chunk_size=None: 64 chunks at Qwen3's width (256 positions for kl at Llama's), all of a small
    batch at narrow vocabularies; same value and gradient as explicit blocks; bad sizes refused."""
    from xtoken.losses.engine import BLOCK_ELEMENTS, KL_BLOCK_ELEMENTS
    from xtoken.losses.engine import block_size as _block_size

    assert _block_size(None, 151_936, BLOCK_ELEMENTS, 64) == 64
    assert _block_size(None, 128_256, KL_BLOCK_ELEMENTS, 256) == 256
    assert _block_size(None, 1_362, BLOCK_ELEMENTS, 64) == 7_139  # the miniature: one block per batch
    assert _block_size(None, 10**9, BLOCK_ELEMENTS, 64) == 64  # never below the floor
    assert _block_size(5, 372, BLOCK_ELEMENTS, 64) == 5
    with pytest.raises(ValueError):
        _block_size(0, 372, BLOCK_ELEMENTS, 64)
    s, t, aligns = tiny_inputs(batch=3, seed=6)
    outs = []
    for cs in (None, 2):
        x = s.clone().requires_grad_(True)
        loss, _ = h_kl_loss(x, t, aligns, tiny_projection(), chunk_size=cs)
        loss.backward()
        outs.append((loss.item(), x.grad.clone()))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-12) and torch.allclose(outs[0][1], outs[1][1])


def test_cpu_blocks_keep_every_side_within_the_budget(monkeypatch):
    """On CPU the default blocks hold at most budget // width token rows on *each* side (the teacher's
    multi-token chunks count), cover the chunks in order, give a wider-than-budget chunk a block of its own,
    and change nothing but the summation order."""
    from xtoken.losses import engine as losses

    s_starts = np.array([0, 1, 2, 3, 4, 5, 6, 7])  # 7 chunks, one student token each
    t_starts = np.array([0, 2, 3, 8, 9, 10, 12, 13])  # teacher: 2, 1, 5, 1, 1, 2, 1 tokens
    bounds = losses.block_bounds(7, None, [s_starts, t_starts], [10, 10], budget=30)  # 3 rows per side
    assert bounds == [(0, 2), (2, 3), (3, 5), (5, 7)]  # chunk 2 (5 teacher rows) alone
    for lo, hi in bounds:
        assert hi - lo >= 1 and (t_starts[hi] - t_starts[lo] <= 3 or hi - lo == 1)
    assert losses.block_bounds(7, 3, [s_starts, t_starts], [10, 10], budget=30) == [(0, 3), (3, 6), (6, 7)]
    s, t, aligns = tiny_inputs(batch=3, seed=7)
    outs = {}
    for budget in (losses.CPU_BLOCK_ELEMENTS, 6):  # one block; one or two rows per block
        monkeypatch.setattr(losses, "CPU_BLOCK_ELEMENTS", budget)
        for name, fn in (("kl", None), ("p_kl", p_kl_loss), ("h_kl", h_kl_loss)):
            x = s.clone().requires_grad_(True)
            loss = kl_loss(x, s.detach().flip(0))[0] if fn is None else fn(x, t, aligns, tiny_projection())[0]
            loss.backward()
            outs.setdefault(name, []).append((loss.item(), x.grad))
    for name, (one, many) in outs.items():
        assert one[0] == pytest.approx(many[0], rel=1e-12), name
        assert torch.allclose(one[1], many[1], rtol=1e-10, atol=1e-14), name
        if name != "kl":  # the padded student column: no gradient
            assert one[1][..., -1].abs().max() == 0 and many[1][..., -1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fast_argmax_is_torchs(dtype):
    """numpy's argmax on CPU: the same index as torch's, first maximum on ties."""
    from xtoken.losses.engine import argmax as _argmax

    x = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[1, 10] = x[1, 500] = x[1].max() + 1  # a tie: the first wins
    x[2] = 0
    assert torch.equal(_argmax(x), x.argmax(-1)) and _argmax(x)[1] == 10 and _argmax(x)[2] == 0


@pytest.mark.parametrize("width", [5, 372, 8192, 20_000])
def test_rowdot_narrow_and_wide_paths(width):
    from xtoken.losses.engine import rowdot as _rowdot

    g = torch.Generator().manual_seed(width)
    x, y = (
        torch.rand(7, width, generator=g, dtype=torch.float64),
        torch.rand(7, width, generator=g, dtype=torch.float64),
    )
    assert torch.allclose(_rowdot(x, y), (x * y).sum(-1), rtol=1e-12)
    assert _rowdot(x[:0], y[:0]).shape == (0,)


def test_w_plan_is_cached_per_projection_and_bounded():
    """`w_plan` builds W's flat entries once per (projection, pairing, widths, device) and returns the cached
    plan afterwards: the cache must neither rebuild every call (1 ms per loss call at mini vocabularies) nor
    grow with the number of calls (a leak of W-sized tensors per training step: a cache key that changes at
    every call would do that), and it holds at most PLAN_CACHE_SIZE plans."""
    from xtoken.losses import plan as P

    W = _random_projection(40, 30, 3, 0)
    first = P.w_plan(W, 40, 30, "cpu", "top1")
    n = len(P._PLANS)
    for _ in range(5):
        assert P.w_plan(W, 40, 30, "cpu", "top1") is first
    assert len(P._PLANS) == n
    assert P.w_plan(W, 40, 30, "cpu") is not first  # another loss: another entry
    for width in range(P.PLAN_CACHE_SIZE + 3):  # more plans than the bound
        P.w_plan(W, 40, 30 - width % 10, "cpu", None if width % 2 else "exact")
        assert len(P._PLANS) <= P.PLAN_CACHE_SIZE


def test_chunk_tables_are_the_rows_token_tables_stacked(llama, qwen):
    """The batched `chunk_tables` equals `Alignment.token_table` row by row, chunk indices running on across
    rows (rows of different lengths and padding, one row without predictable chunks)."""
    from xtoken.align import align
    from xtoken.losses.plan import chunk_tables

    texts = ["Tom has 201 apples and 35 pears.", "Hello", "Zürich's 1999 budget: 12,345.67 francs."]
    aligns = []
    for i, t in enumerate(texts):
        s, q = llama.encode(t, add_special_tokens=False), qwen.encode(t, add_special_tokens=False)
        pad = [0] * i  # left padding, masks say so
        aligns.append(align(pad + s, q, llama, qwen, student_mask=[0] * i + [1] * len(s)))
    tables = chunk_tables(aligns, "cpu")
    n = tables.n_chunks
    assert n == sum(int(a.predictable.sum()) for a in aligns)
    for side in ("student", "teacher"):
        base, want = 0, [[] for _ in range(5)]
        for b, a in enumerate(aligns):
            chunk, pos, ids, off = a.token_table(side)
            for lst, x in zip(want, (np.full(len(pos), b), pos, ids, off, chunk + base)):
                lst.append(x)
            base += int(a.predictable.sum())
        table = getattr(tables, side)
        for got, parts in zip((table.row, table.pos, table.ids, table.offset, table.chunk), want):
            assert got.tolist() == np.concatenate(parts).tolist()


@pytest.mark.parametrize("kind", ["gold", "hkl"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("neg_inf", [False, True])
def test_hybrid_from_teacher_log_probs_matches_probabilities(kind, direction, neg_inf):
    """hybrid_divergence given log q_T (no full q_T: the losses' fast path) == given q_T (xlogy path): value,
    gradient and common mass; also when the teacher has -inf logits (0 log 0 = 0, no NaN)."""
    v_s, v_t = 40, 30
    W = _random_projection(v_s, v_t, 3, 1)
    plan = w_plan(W, v_s, v_t, "cpu", {"gold": "exact", "hkl": "top1"}[kind])
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(6, v_s, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.randn(6, v_t, generator=g, dtype=torch.float64) * 3
    if neg_inf:
        t[:, plan.pairing.t_common[:3]] = -torch.inf
    log_q_t = torch.log_softmax(t, -1)
    out = {}
    for name, args in (("q", (log_q_t.exp(), None)), ("log", (None, log_q_t))):
        d, gm, q_t_c = hybrid_divergence(torch.log_softmax(z, -1), args[0], plan, direction, log_q_t=args[1])
        out[name] = (d.detach(), torch.autograd.grad(d.sum(), z)[0], gm, q_t_c)
    assert torch.isfinite(out["log"][0]).all()
    for a, b in zip(out["q"], out["log"]):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("t_spans", [T_SPANS, [(1, 2), (2, 5), (5, 6)]])  # every chunk longer; one-token chunks too
def test_w_merge_image_is_the_full_merge_read_on_the_image(t_spans):
    """P-KL's teacher side (`w_merge_image`: first and continuation rows gathered apart, (C2) formed at full
    width for the longer chunks only) == `teacher_merge(..., "w")` read on W's image: q_T there, sum q_T log q_T,
    the mass off the image and argmax q_T."""
    from xtoken.losses.chunks import split_rows, teacher_merge, w_merge_image
    from xtoken.losses.plan import chunk_tables

    s, t, _ = tiny_inputs()
    aligns = [manual_alignment(S_IDS, T_IDS, S_SPANS, t_spans)] * 2
    plan = w_plan(tiny_projection(), 5, 4, "cpu")
    tables = chunk_tables(aligns, "cpu")
    n = tables.n_chunks
    table = tables.teacher.block(0, n)
    q_ti, neg_ent, off, top = w_merge_image(split_rows(t, table, 4, 2.0), table, n, G, plan)
    b, p, ids, offset, chunk = table.row, table.pos, table.ids, table.offset, table.chunk
    q = teacher_merge(torch.log_softmax(t[b, p, :4] / 2.0, -1), chunk, ids, offset, n, "w", G)
    assert plan.off_image_ids.tolist() == [3]  # no student row reaches teacher id 3
    assert torch.allclose(q_ti, q[:, plan.image_ids], atol=1e-12)
    assert torch.allclose(neg_ent, torch.xlogy(q, q).sum(-1), atol=1e-12)
    assert torch.allclose(off, q[:, 3], atol=1e-12)
    assert torch.equal(top, q.argmax(-1))
