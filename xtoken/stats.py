"""Seed-paired differences with bootstrap intervals, the verdict rule and the minimum detectable effect.

A comparison "A vs B" of the miniature is a difference of per-item scores of two settings trained with the
same seeds and scored on the same test items: ``d[s, i] = score_A[s, i] - score_B[s, i]``. Its estimate is
the mean of ``d`` (over the skills of a metric: the weighted mean of the per-skill means). Two sources of
noise move it: which seeds were run and which test items were drawn. The interval comes from a bootstrap
over both at once (`paired_bootstrap`): every replicate draws the seeds with replacement and, independently
within each skill, the items with replacement, and recomputes the estimate; the 95% interval is the
2.5 / 97.5 percentiles of the replicates.

The verdict rule (`verdict`), fixed here before any result is read:
  "reproduced"    the interval excludes 0 and the difference has the paper's sign
  "contradicted"  the interval excludes 0 and the difference has the opposite sign
  "inconclusive"  the interval includes 0 (whatever the point estimate's sign)
With no paper sign (a comparison the paper makes no claim about) the rule says "A higher", "B higher" or
"inconclusive".

The minimum detectable effect (`mde`) is the true difference the same design would detect with 80% power
at the 5% two-sided level: (z_0.975 + z_0.8) * SE = 2.80 * SE, SE the bootstrap standard error. An
inconclusive comparison with a small MDE says the effect, if any, is small; one with a large MDE says the
test cannot tell.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

__all__ = ["paired_bootstrap", "mde", "verdict", "combine_verdicts", "paired_arrays", "compare", "VERDICTS"]

VERDICTS = ("reproduced", "contradicted", "inconclusive")


def mde(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a two-sided test at level ``alpha`` with ``power``: (z_{1-a/2} + z_power) * se."""
    z = NormalDist()
    return float((z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * se)


def verdict(lo: float, hi: float, paper_sign: float | None) -> str:
    """The rule above: an interval [lo, hi] of A - B against the sign of the paper's A - B (None: no claim)."""
    if not lo <= hi:
        raise ValueError(f"interval [{lo}, {hi}] is empty")
    if lo <= 0 <= hi:
        return "inconclusive"
    positive = lo > 0
    if paper_sign is None or paper_sign == 0:
        return "A higher" if positive else "B higher"
    return "reproduced" if positive == (paper_sign > 0) else "contradicted"


def combine_verdicts(verdicts) -> str:
    """A claim made of several comparisons (e.g. 'static beats every adaptive scheme'): reproduced when every
    one is reproduced, contradicted when any one is contradicted, inconclusive otherwise."""
    v = list(verdicts)
    if not v:
        return "inconclusive"
    if any(x == "contradicted" for x in v):
        return "contradicted"
    return "reproduced" if all(x == "reproduced" for x in v) else "inconclusive"


def paired_bootstrap(
    diffs, weights=None, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0, resample_seeds: bool = True
) -> dict:
    """Estimate, percentile interval, SE and MDE of a seed-paired difference.

    ``diffs``: an array [n_seeds, n_items] of per-item differences, or a dict {group: array [n_seeds, n_items_g]}
    (the skills of an average; every group has the same seeds, in the same order). ``weights``: {group: w}
    (default equal); the estimate is sum_g w_g mean(d_g) / sum_g w_g. Seeds are drawn with replacement once per
    replicate for all groups together, items within each group (``resample_seeds=False``: items only).
    Returns {estimate, lo, hi, se, mde, n_seeds, n_items, n_boot}.
    """
    if not isinstance(diffs, dict):
        diffs = {"": diffs}
    groups = {g: np.asarray(d, dtype=float) for g, d in diffs.items()}
    for g, d in groups.items():
        if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
            raise ValueError(f"group {g!r}: expected a non-empty [n_seeds, n_items] array, got shape {d.shape}")
        if not np.isfinite(d).all():
            raise ValueError(f"group {g!r}: non-finite differences")
    n_seeds = {d.shape[0] for d in groups.values()}
    if len(n_seeds) != 1:
        raise ValueError(f"groups have different numbers of seeds: {n_seeds}")
    ns = n_seeds.pop()
    w = {g: 1.0 for g in groups} if weights is None else {g: float(weights[g]) for g in groups}
    total = sum(w.values())
    rng = np.random.default_rng(seed)
    seed_counts = (
        rng.multinomial(ns, np.full(ns, 1 / ns), size=n_boot).astype(float) if resample_seeds else np.ones((n_boot, ns))
    )
    est, boot = 0.0, np.zeros(n_boot)
    for g, d in groups.items():
        ni = d.shape[1]
        est += w[g] * d.mean() / total
        item_counts = rng.multinomial(ni, np.full(ni, 1 / ni), size=n_boot).astype(float)
        # replicate b: mean over the drawn seeds and items = seed_counts[b] @ d @ item_counts[b] / (ns * ni)
        boot += w[g] / total * np.einsum("bs,si,bi->b", seed_counts, d, item_counts) / (ns * ni)
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    se = float(boot.std(ddof=1)) if n_boot > 1 else 0.0
    return {
        "estimate": float(est),
        "lo": float(lo),
        "hi": float(hi),
        "se": se,
        "mde": mde(se),
        "n_seeds": ns,
        "n_items": int(sum(d.shape[1] for d in groups.values())),
        "n_boot": n_boot,
    }


def paired_arrays(items, a: str, b: str, column: str, skills=None) -> dict:
    """{skill: [n_seeds, n_items]} of ``column``(A) - ``column``(B) from a tidy per-item frame (columns
    setting, seed, skill, item, ``column``), over the seeds both settings ran and the items both were scored on."""
    out = {}
    skills = list(dict.fromkeys(items["skill"])) if skills is None else list(skills)
    A = items[items.setting == a]
    B = items[items.setting == b]
    seeds = sorted(set(A.seed) & set(B.seed))
    for s in skills:
        pa = A[A.skill == s].pivot_table(index="seed", columns="item", values=column, aggfunc="first")
        pb = B[B.skill == s].pivot_table(index="seed", columns="item", values=column, aggfunc="first")
        cols = pa.columns.intersection(pb.columns)
        if not len(seeds) or not len(cols):
            continue
        out[s] = pa.loc[seeds, cols].to_numpy(float) - pb.loc[seeds, cols].to_numpy(float)
    return out


def compare(
    items, a: str, b: str, column: str = "exact_match", skills=None, *, paper_sign=None, scale: float = 1.0, **kw
) -> dict:
    """One comparison A - B of ``column`` (averaged over ``skills`` with equal weights), scaled by ``scale``
    (100: exact match in points), with its bootstrap interval, MDE and verdict."""
    arrays = paired_arrays(items, a, b, column, skills)
    if not arrays:
        return {
            "estimate": float("nan"),
            "lo": float("nan"),
            "hi": float("nan"),
            "se": float("nan"),
            "mde": float("nan"),
            "n_seeds": 0,
            "n_items": 0,
            "verdict": "no data",
        }
    r = paired_bootstrap({g: scale * d for g, d in arrays.items()}, **kw)
    r["verdict"] = verdict(r["lo"], r["hi"], paper_sign)
    return r
