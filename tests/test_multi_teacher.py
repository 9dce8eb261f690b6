"""Multi-teacher weighting and aggregation (xtoken.multi_teacher)."""

import pytest
import torch

from xtoken.losses import kl_loss
from xtoken.multi_teacher import aggregate, teacher_stats, teacher_weights


def test_static_passes_through_normalized():
    w = teacher_weights("static", alphas=[0.7, 0.3])
    assert w.tolist() == pytest.approx([0.7, 0.3])
    assert teacher_weights("static", alphas=[2, 6]).tolist() == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError):
        teacher_weights("static")


@pytest.mark.parametrize("scheme", ["ce", "entropy", "max_prob"])
def test_adaptive_favours_the_confident_teacher(scheme):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 20, (3, 6), generator=g)
    sharp = torch.full((3, 6, 20), -5.0)
    sharp[:, :-1].scatter_(-1, labels[:, 1:].unsqueeze(-1), 5.0)  # confident and right
    vague = torch.randn(3, 6, 20, generator=g) * 0.1  # nearly uniform
    stats = [teacher_stats(vague, labels), teacher_stats(sharp, labels)]
    w = teacher_weights(scheme, stats)
    assert w.sum().item() == pytest.approx(1.0) and w[1] > 0.6
    ws = teacher_weights(scheme, stats, per="sample")
    assert ws.shape == (2, 3)
    assert torch.allclose(ws.sum(0), torch.ones(3)) and (ws[1] > ws[0]).all()


def test_ce_weights_are_softmax_of_negative_ce():
    w = teacher_weights("ce", [1.0, 2.0, 4.0])
    ref = torch.softmax(-torch.tensor([1.0, 2.0, 4.0]), 0)
    assert torch.allclose(w, ref) and w.argmax() == 0


def test_aggregate_static_same_tokenizer_kl_and_per_sample():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    t1, t2 = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    l1, _ = kl_loss(s, t1)  # a same-tokenizer teacher uses plain KL
    l2, _ = kl_loss(s, t2, direction="reverse")
    total = aggregate([l1, l2], teacher_weights("static", alphas=[0.75, 0.25]))
    assert total.item() == pytest.approx(0.75 * l1.item() + 0.25 * l2.item(), rel=1e-6)
    total.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    per_sample = [torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])]
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # sample 0 -> teacher 0, 1 -> 1
    assert aggregate(per_sample, w).item() == pytest.approx((1.0 + 2.0) / 2)


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_teacher_stats_blocks_equal_the_direct_computation(chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 13, generator=g) * 3
    labels = torch.randint(0, 11, (3, 9), generator=g)
    labels[1, 5:] = -100
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[2, :2] = False
    got = teacher_stats(logits, labels, mask, vocab_size=11, chunk_size=chunk_size)
    logp = torch.log_softmax(logits[..., :11], -1)
    keep = mask.float()
    ent = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(got["entropy"], (ent * keep).sum(1) / keep.sum(1), atol=1e-6)
    assert torch.allclose(got["max_prob"], (logp.exp().max(-1).values * keep).sum(1) / keep.sum(1), atol=1e-6)
    tgt = labels[:, 1:]
    nll = -logp[:, :-1].gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (tgt != -100)
    assert torch.allclose(got["ce"], nll.sum(1) / (tgt != -100).sum(1), atol=1e-6)
