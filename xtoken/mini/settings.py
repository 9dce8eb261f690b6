"""The grid's settings: `Setting` (teachers, losses, weights, weighting scheme), the single-teacher catalogue
and the multi-teacher pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

TEACHERS = ("llama", "qwen3", "phi")


TEACHER_LABEL = {"llama": "Llama-3.2-3B (tiny)", "qwen3": "Qwen3-4B (tiny)", "phi": "Phi-4-mini (tiny)"}


@dataclass
class Setting:
    """One grid setting: a list of (teacher, loss, weight) and how the teachers' terms are weighted.

    ``teachers=[]`` is CE only (continued pre-training). Same-tokenizer teachers (llama) use ``kl``;
    cross-tokenizer ones ``gold`` | ``p_kl`` | ``h_kl`` | ``uld`` through the restricted W.
    ``learn_projection``: the P-KL teachers' W is fine-tuned with the student (``cfg.projection_lr``).
    """

    name: str
    teachers: list = field(default_factory=list)  # [(teacher name, loss, weight), ...]
    weighting: str = "static"  # static | ce | entropy | max_prob
    label: str = ""
    learn_projection: bool = False

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "teachers": [list(t) for t in self.teachers],
            "weighting": self.weighting,
            "label": self.label or self.name,
            "learn_projection": self.learn_projection,
        }

    def relative_cost(self) -> float:
        """A run's wall time relative to a CE-only run (measured on the miniature: CE 20 s, KL teacher +4 s,
        a cross-tokenizer teacher +8-14 s, adaptive weights and learned W +1-2 s). Pools start the costliest
        runs first, so no long run is left alone at the end while the other worker idles."""
        cost = 1.0 + sum(0.2 if loss == "kl" else 0.55 for _, loss, _ in self.teachers)
        return cost + 0.05 * (self.weighting != "static") + 0.1 * self.learn_projection

    @classmethod
    def from_dict(cls, d) -> "Setting":
        return cls(
            d["name"],
            [tuple(t) for t in d["teachers"]],
            d.get("weighting", "static"),
            d.get("label", ""),
            bool(d.get("learn_projection", False)),
        )


SINGLE_TEACHER_SETTINGS = [
    Setting("ce_only", [], label="continued pre-training, CE only"),
    Setting("kd_llama", [("llama", "kl", 1.0)], label="same-tokenizer KD (Llama-3B)"),
    Setting("gold_qwen3", [("qwen3", "gold", 1.0)], label="GOLD (Qwen3)"),
    Setting("pkl_qwen3", [("qwen3", "p_kl", 1.0)], label="X-Token P-KL (Qwen3)"),
    Setting(
        "pkl_learned_qwen3", [("qwen3", "p_kl", 1.0)], label="X-Token P-KL, learned W (Qwen3)", learn_projection=True
    ),
    Setting("hkl_qwen3", [("qwen3", "h_kl", 1.0)], label="X-Token H-KL (Qwen3)"),
    Setting("gold_phi", [("phi", "gold", 1.0)], label="GOLD (Phi-mini)"),
    Setting("pkl_phi", [("phi", "p_kl", 1.0)], label="X-Token P-KL (Phi-mini)"),
    Setting("hkl_phi", [("phi", "h_kl", 1.0)], label="X-Token H-KL (Phi-mini)"),
]


def multi_teacher_settings(weightings=("static", "ce", "entropy", "max_prob"), teacher_scores=None) -> list:
    """The multi-teacher grid: pairs of teachers x weighting schemes.

    Phi (H-KL) + Llama (KL) is the paper's best; Phi + Qwen3 (two reasoning-heavy teachers) the
    paper's worse pair; Qwen3 (P-KL) + Llama (KL) completes the triangle; all three together last.

    Weightings: "static" = equal weights; "static_tuned" = static weights set a priori, before any
    multi-teacher run, proportional to each teacher's own held-out exact match averaged over the skills
    (``teacher_scores``: the teachers table of `prepare`, columns teacher / arithmetic / knowledge);
    "ce" | "entropy" | "max_prob" = confidence-adaptive per batch (`xtoken.multi_teacher`).
    """
    pairs = {
        "phi_hkl+llama_kl": [("phi", "h_kl", 0.5), ("llama", "kl", 0.5)],
        "phi_hkl+qwen3_pkl": [("phi", "h_kl", 0.5), ("qwen3", "p_kl", 0.5)],
        "qwen3_pkl+llama_kl": [("qwen3", "p_kl", 0.5), ("llama", "kl", 0.5)],
        "phi_hkl+qwen3_pkl+llama_kl": [("phi", "h_kl", 1 / 3), ("qwen3", "p_kl", 1 / 3), ("llama", "kl", 1 / 3)],
        "phi_gold+qwen3_gold": [("phi", "gold", 0.5), ("qwen3", "gold", 0.5)],
    }
    out = []
    for name, teachers in pairs.items():
        for w in weightings:
            if w == "static_tuned":
                if teacher_scores is None:
                    raise ValueError("static_tuned weights need teacher_scores (prepare(...)['teachers'])")
                acc = {
                    r["teacher"]: (float(r["arithmetic"]) + float(r["knowledge"])) / 2
                    for r in teacher_scores.to_dict(orient="records")
                }
                total = sum(acc[t] for t, _, _ in teachers)
                tuned = [
                    (t, loss, round(acc[t] / total if total > 0 else 1 / len(teachers), 4))  # untrained
                    for t, loss, _ in teachers
                ]  # teachers: equal
                out.append(
                    Setting(
                        f"{name}@static_tuned",
                        tuned,
                        weighting="static",
                        label=f"{name} (static weights {'/'.join(str(x[2]) for x in tuned)}, set a priori)",
                    )
                )
            else:
                out.append(Setting(f"{name}@{w}", teachers, weighting=w, label=f"{name} ({w} weights)"))
    return out


def single_teacher_settings(teachers=("qwen3", "phi"), losses=("gold", "p_kl", "h_kl"), learned_w=False) -> list:
    """The single-teacher rows for some cross-tokenizer teachers and losses, with CE only and
    same-tokenizer KD (Llama "3B") always included as the references; ``learned_w`` adds the
    "P-KL, learned W" rows (Qwen3) when P-KL is among the losses."""
    keep = []
    for s in SINGLE_TEACHER_SETTINGS:
        if not s.teachers or s.teachers[0][0] == "llama":
            keep.append(s)
        elif s.teachers[0][0] in teachers and s.teachers[0][1] in losses and (learned_w or not s.learn_projection):
            keep.append(s)
    return keep
