"""Distillation losses: same-tokenizer KL, ULD, GOLD (baseline), X-Token's P-KL and H-KL (arXiv 2605.21699,
Sec. 3.3-3.5).

Plain tensors in, ``(loss, metrics)`` out. Every cross-tokenizer loss works on *chunk pairs* from `xtoken.align`
(spans of both tokenizations that decode to the same bytes) and on chunk-level distributions, (C1) and (C2) in
`xtoken.losses.chunks`.

    kl_loss     D(p_T || p_S) per position, positions 1:1 (one tokenizer)                       kl.py
    p_kl_loss   D(q_T || W^T q_S), no partition of the vocabularies                             projected.py
    gold_loss   KL on strict 1-to-1 pairs + ULD's sorted L1 on the rest (baseline)              hybrid.py
    h_kl_loss   the same with C = W's top-1 pairs, shared teacher ids comparing group sums      hybrid.py
    uld_loss    sorted L1 between the chunk distributions                                       hybrid.py

The package: `engine` (blocks, eager per-block gradients, CPU-fast row ops), `plan` (typed plan: W's entries and
pairing, chunk token tables, the validated call), `checks` (input checks), `chunks` ((C1), (C2), merges), one file
per loss family, `reference` (the dense forms the tests compare against).

Divergence. On sub-distributions (mass <= 1) the generalized KL

    D(q || r) = sum_v q(v) log(q(v) / r(v)) - sum_v q(v) + sum_v r(v)                        (D)

is non-negative and zero iff q = r. ``direction="forward"`` is D(teacher || student), ``"reverse"`` is
D(student || teacher). Zero probabilities on the right are clamped at `EPS` (their term is then constant, with
zero gradient). Each loss is the mean over the batch's predictable chunk pairs (positions for `kl_loss`). The
temperature divides every logit on every path; no tau^2 factor is applied; teacher logits are constants.

Metrics (floats, means over chunk pairs unless a count): n_chunks, unpaired_student / unpaired_teacher (token
counts), teacher_common_mass (GOLD / H-KL: teacher mass on C; P-KL: teacher mass on W's image, the teacher ids
some student row reaches), student_common_mass (GOLD / H-KL: student mass on C; P-KL: mass of W^T q_S),
mass_lost_empty_rows (student mass on empty W rows), top1_agreement (teacher argmax == the student argmax mapped
through the pairing, or argmax of W^T q_S for P-KL), student_chunk_mass / teacher_chunk_mass, loss.
``metrics=False`` skips all but loss and the counts: a trainer needs them only on the steps it logs.

Precision: every loss computes in float32 whatever the logits' dtypes (float64 when either side is float64); a
block's rows are converted as they are gathered and the gradient is returned in the student logits' dtype.
float16 arithmetic would lose the probabilities below 6e-8 that KD compares, and turns `EPS` into 0.

Padded vocabulary columns (Qwen3: 151,669 tokens, 151,936 logits) have zero probability on every path: they are
dropped when a block's rows are gathered. Which columns are padding comes from W's ``meta["teacher_tokens"]``
(the teacher tokenizer's size, recorded by `xtoken.projection.build_projection`), else from ``teacher_tok``, else
from ``teacher_vocab_size`` / ``vocab_size``. ``student_tok`` / ``teacher_tok`` are also checked against W's
recorded tokenizers (`xtoken.projection.Projection.check_tokenizers`).

Bad input fails loudly: a temperature that is not a finite number > 0, logits narrower than W (or the student's
and teacher's logits swapped), alignments that do not fit the logits' batch or length each raise a ValueError
saying which side is wrong. Teacher logits of -inf (a top-k masked teacher) are probabilities of 0.
"""

from .chunks import chain_rule_log_q, teacher_merge
from .engine import EPS
from .hybrid import gold_loss, h_kl_loss, hybrid_divergence, sorted_l1, uld_loss
from .kl import dynamic_kd_scale, kl_loss
from .plan import WPlan, w_plan
from .projected import p_kl_divergence, p_kl_loss
from .reference import generalized_kl, project_to_teacher

__all__ = [
    "kl_loss",
    "uld_loss",
    "gold_loss",
    "p_kl_loss",
    "h_kl_loss",
    "dynamic_kd_scale",
    "chain_rule_log_q",
    "teacher_merge",
    "project_to_teacher",
    "generalized_kl",
    "sorted_l1",
    "p_kl_divergence",
    "hybrid_divergence",
    "w_plan",
    "WPlan",
    "EPS",
]
