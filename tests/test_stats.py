"""xtoken.stats: the verdict rule on known intervals, the bootstrap against closed-form standard errors, the MDE,
and seed-paired differences read from a tidy per-item frame."""

import numpy as np
import pandas as pd
import pytest

from xtoken.stats import combine_verdicts, compare, mde, paired_arrays, paired_bootstrap, verdict


@pytest.mark.parametrize(
    "lo,hi,sign,expected",
    [
        (0.5, 2.0, +1, "reproduced"),
        (-2.0, -0.5, -1, "reproduced"),
        (0.5, 2.0, -1, "contradicted"),
        (-2.0, -0.5, +3.8, "contradicted"),
        (-0.1, 2.0, +1, "inconclusive"),
        (-2.0, 0.0, -1, "inconclusive"),
        (0.0, 0.0, +1, "inconclusive"),
        (0.5, 2.0, None, "A higher"),
        (-2.0, -0.5, None, "B higher"),
        (-1.0, 1.0, None, "inconclusive"),
    ],
)
def test_verdict_rule(lo, hi, sign, expected):
    assert verdict(lo, hi, sign) == expected


def test_verdict_rejects_empty_interval():
    with pytest.raises(ValueError):
        verdict(1.0, -1.0, 1)


def test_combine_verdicts():
    assert combine_verdicts(["reproduced", "reproduced"]) == "reproduced"
    assert combine_verdicts(["reproduced", "inconclusive"]) == "inconclusive"
    assert combine_verdicts(["reproduced", "contradicted", "inconclusive"]) == "contradicted"
    assert combine_verdicts([]) == "inconclusive"


def test_mde_is_2_8_standard_errors():
    assert mde(1.0) == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    assert mde(0.5, power=0.5) == pytest.approx(0.5 * 1.959964, abs=1e-5)


def test_bootstrap_items_only_matches_closed_form():
    """One seed: the bootstrap SE of a mean of n values is sqrt(population variance / n)."""
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, 0.0, 1.0], p=[0.2, 0.5, 0.3], size=(1, 2000))
    r = paired_bootstrap(d, n_boot=4000, seed=3)
    se = d.std() / np.sqrt(d.size)
    assert r["estimate"] == pytest.approx(d.mean())
    assert r["se"] == pytest.approx(se, rel=0.06)
    assert r["lo"] == pytest.approx(d.mean() - 1.96 * se, abs=0.25 * se)
    assert r["hi"] == pytest.approx(d.mean() + 1.96 * se, abs=0.25 * se)
    assert r["mde"] == pytest.approx(mde(r["se"]))


def test_bootstrap_over_seeds_matches_closed_form():
    """Items identical within a seed: all the noise is between seeds, SE = sqrt(var of the seed means / n_seeds)."""
    means = np.arange(10, dtype=float)
    d = np.repeat(means[:, None], 50, axis=1)
    r = paired_bootstrap(d, n_boot=6000, seed=0)
    assert r["se"] == pytest.approx(means.std() / np.sqrt(10), rel=0.06)
    assert paired_bootstrap(d, n_boot=500, resample_seeds=False)["se"] == 0.0  # nothing left to resample


def test_bootstrap_groups_weighted_mean_and_shared_seeds():
    a = np.full((3, 100), 2.0)
    b = np.full((3, 10), -1.0)
    r = paired_bootstrap({"a": a, "b": b}, n_boot=200)
    assert r["estimate"] == pytest.approx(0.5) and r["lo"] == pytest.approx(0.5) and r["hi"] == pytest.approx(0.5)
    assert paired_bootstrap({"a": a, "b": b}, weights={"a": 3, "b": 1}, n_boot=10)["estimate"] == pytest.approx(1.25)
    with pytest.raises(ValueError):
        paired_bootstrap({"a": a, "b": np.zeros((2, 10))})
    with pytest.raises(ValueError):
        paired_bootstrap(np.array([[np.nan, 1.0]]))


def _items(p_a, p_b, n=1500, seeds=(0, 1, 2), skill="arithmetic", rng=None):
    rng = rng or np.random.default_rng(0)
    rows = []
    for s in seeds:
        for setting, p in (("A", p_a), ("B", p_b)):
            hits = rng.random(n) < p
            rows += [
                {"setting": setting, "seed": s, "skill": skill, "item": i, "exact_match": float(h)}
                for i, h in enumerate(hits)
            ]
    return pd.DataFrame(rows)


def test_compare_verdicts_on_known_effects():
    big = _items(0.6, 0.3)
    assert compare(big, "A", "B", scale=100, paper_sign=+1)["verdict"] == "reproduced"
    assert compare(big, "A", "B", scale=100, paper_sign=-1)["verdict"] == "contradicted"
    r = compare(big, "A", "B", scale=100, paper_sign=+1)
    assert 25 < r["estimate"] < 35 and r["lo"] < r["estimate"] < r["hi"] and r["n_seeds"] == 3
    same = _items(0.4, 0.4, n=200)
    assert compare(same, "A", "B", scale=100, paper_sign=+1)["verdict"] == "inconclusive"


def test_paired_arrays_pair_by_seed_and_item():
    df = pd.DataFrame(
        {
            "setting": ["A", "A", "B", "B", "B"],
            "seed": [0, 1, 1, 0, 2],
            "skill": "x",
            "item": [0, 0, 0, 0, 0],
            "v": [5.0, 7.0, 1.0, 2.0, 9.0],
        }
    )
    d = paired_arrays(df, "A", "B", "v")["x"]
    assert d.tolist() == [[3.0], [6.0]]  # seeds 0 and 1 (seed 2 ran for B only)
