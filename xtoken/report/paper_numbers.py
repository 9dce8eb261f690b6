"""The paper's numbers (arXiv 2605.21699, Llama-3.2-1B student), in one place: Table 8's numeral coverage,
Tables 1-2's scores, the differences it headlines, and every comparison the notebooks test against them."""

from __future__ import annotations

# The paper's Table 8: Llama-3 multi-digit numerals in GOLD's common set C.
PAPER_TABLE8 = {
    "Qwen/Qwen3-4B": {"numeral_2digit": (0, 100), "numeral_3digit": (0, 1000)},
    "microsoft/Phi-4-mini-instruct": {"numeral_2digit": (100, 100), "numeral_3digit": (1000, 1000)},
}


# The paper's Tables 1-2 (arXiv 2605.21699, Llama-3.2-1B student): (label, GSM8k, average of its 5 benchmarks).
PAPER_TABLE1 = {
    "base": ("no distillation (Llama-1B base)", 5.69, 33.96),
    "ce_only": ("continued pre-training, CE only", 10.25, 36.63),
    "kd_llama": ("same-tokenizer KD (Llama-3B)", 12.89, 38.40),
    "gold_qwen3": ("GOLD (Qwen3-4B)", 2.56, 35.03),
    "pkl_qwen3": ("X-Token P-KL (Qwen3-4B)", 15.54, 38.85),
    "hkl_phi": ("X-Token H-KL (Phi-4-mini)", 19.11, 39.18),
    "phi_hkl+llama_kl@static": ("multi-teacher Phi-mini (H-KL) + Llama-3B (KL), static", 20.39, 40.48),
}


# Paired deltas the paper headlines, as (name, setting A, setting B, the paper's A - B on the average).
PAPER_DELTAS = [
    ("P-KL vs GOLD, Qwen3", "pkl_qwen3", "gold_qwen3", 3.82),
    ("H-KL vs GOLD, Phi-mini", "hkl_phi", "gold_phi", 0.52),
    ("P-KL vs H-KL, Qwen3", "pkl_qwen3", "hkl_qwen3", 3.55),
    ("H-KL vs P-KL, Phi-mini", "hkl_phi", "pkl_phi", 1.68),
]


def _paper_delta(a: str, b: str, column: int):
    """The paper's A - B from its Table 1 (``column`` 1: GSM8k, 2: the average), None unless it lists both."""
    pa, pb = PAPER_TABLE1.get(a), PAPER_TABLE1.get(b)
    return round(pa[column] - pb[column], 2) if pa and pb else None


def _paper_gsm8k(a: str, b: str):
    return _paper_delta(a, b, 1)


# The paper's multi-teacher gain on the average: Phi-mini (H-KL) + Llama-3B (KL) with static weights over its best
# single teacher (H-KL Phi-mini).
PAPER_MULTI_TEACHER_GAIN = _paper_delta("phi_hkl+llama_kl@static", "hkl_phi", 2)

# (name, setting A, setting B, the paper's A - B on its 5-benchmark average, on GSM8k or None): every comparison of
# notebook 03. The paper's numbers are its Tables 1-2 (PAPER_TABLE1 and the deltas it headlines).
SINGLE_COMPARISONS = (
    [(name, a, b, paper, _paper_gsm8k(a, b)) for name, a, b, paper in PAPER_DELTAS]
    + [
        (name, a, "ce_only", _paper_delta(a, "ce_only", 2), _paper_gsm8k(a, "ce_only"))
        for name, a in (
            ("same-tokenizer KD vs CE only", "kd_llama"),
            ("P-KL (Qwen3) vs CE only", "pkl_qwen3"),
            ("GOLD (Qwen3) vs CE only", "gold_qwen3"),
            ("H-KL (Phi-mini) vs CE only", "hkl_phi"),
        )
    ]
    + [("P-KL learned W vs fixed W, Qwen3", "pkl_learned_qwen3", "pkl_qwen3", None, None)]
)
