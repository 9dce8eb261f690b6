"""The grid's settings: `Setting` (teachers, losses, weights, weighting scheme), the single-teacher catalogue
and the multi-teacher pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

TEACHERS = ("llama", "qwen3", "phi")


# How the KD term is weighted against CE (the paper's dynamic scaling against three static weightings):
# name -> (ce_weight, kd_weight, dynamic). Static weightings are ratios (Adam is invariant to the loss's overall
# scale); "dynamic" rescales KD each step to CE's value through a stop-gradient ratio, KD * stopgrad(CE / KD).
# "default" takes the config's kd_weight and dynamic_kd_scale (mini: 1 CE + 1 KD, static; paper: dynamic).
KD_SCALINGS = {
    "default": None,
    "kd_heavy": (1.0, 4.0, False),
    "balanced": (1.0, 1.0, False),
    "ce_heavy": (1.0, 0.25, False),
    "dynamic": (1.0, 1.0, True),
    "kd_only": (0.0, 1.0, False),  # no CE term (GKD's on-policy loss: the divergence alone)
}

# The rows a setting trains on. Miniature: the whole training split, or its arithmetic rows with their question as
# the prompt (``prompt`` = question + newline; the row's ``text`` stays what off-policy batches train on). Paper
# scale: the packed pre-training stream, or GSM8k's training questions and answers (`PaperConfig.prompt_dataset`).
DATA = {
    "corpus": "the whole training split (mini) / the packed pre-training stream (paper)",
    "arithmetic_prompts": "arithmetic questions, each the prompt an on-policy batch continues (mini: the arithmetic "
    "rows; paper: PaperConfig.prompt_dataset, GSM8k's training split)",
}

TEACHER_LABEL = {"llama": "Llama-3.2-3B (tiny)", "qwen3": "Qwen3-4B (tiny)", "phi": "Phi-4-mini (tiny)"}


def _model_name(teacher: str, family_only: bool = False) -> str:
    """The paper's name of a teacher ("Qwen3-4B"), or its family alone ("Qwen3"), for labels."""
    name = TEACHER_LABEL[teacher].split(" (")[0]
    return name.split("-")[0] if family_only else name


@dataclass
class Setting:
    """One grid setting: a list of (teacher, loss, weight) and how the teachers' terms are weighted.

    ``teachers=[]`` is CE only (continued pre-training). Same-tokenizer teachers (llama) use ``kl``;
    cross-tokenizer ones ``gold`` | ``p_kl`` | ``h_kl`` | ``uld`` through the restricted W.
    ``learn_projection``: the P-KL teachers' W is fine-tuned with the student (``cfg.projection_lr``).
    ``kd_scaling``: a name of `KD_SCALINGS` (how KD is weighted against CE); "default" uses the config's.
    ``lmbda``: the probability that a batch is on-policy (the student continues the rows' prompts, GKD's convention;
    `xtoken.hf.onpolicy`), generating at most ``cfg.max_gen_toks`` tokens. ``data``: the rows trained on: `DATA`.
    ``on_policy_ce``: on-policy batches also train CE on the student's own sample (`XTokenConfig.on_policy_ce`).
    """

    name: str
    teachers: list = field(default_factory=list)  # [(teacher name, loss, weight), ...]
    weighting: str = "static"  # static | ce | entropy | max_prob
    label: str = ""
    learn_projection: bool = False
    kd_scaling: str = "default"
    lmbda: float = 0.0
    data: str = "corpus"
    on_policy_ce: bool = False

    def __post_init__(self):
        if self.kd_scaling not in KD_SCALINGS:
            raise ValueError(f"kd_scaling {self.kd_scaling!r}: one of {sorted(KD_SCALINGS)}")
        if self.data not in DATA:
            raise ValueError(f"data {self.data!r}: one of {sorted(DATA)}")
        if not 0.0 <= float(self.lmbda) <= 1.0:
            raise ValueError(f"lmbda {self.lmbda!r} is not a probability in [0, 1]")

    def loss_weights(self, cfg) -> tuple[float, float, bool]:
        """(ce_weight, kd_weight, dynamic) of this setting's runs under ``cfg`` (a `MiniConfig` or a `PaperConfig`:
        "default" takes its ``kd_weight``, 1 when it has none, and its ``dynamic_kd_scale``)."""
        w = KD_SCALINGS[self.kd_scaling]
        return (1.0, float(getattr(cfg, "kd_weight", 1.0)), bool(cfg.dynamic_kd_scale)) if w is None else w

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "teachers": [list(t) for t in self.teachers],
            "weighting": self.weighting,
            "label": self.label or self.name,
            "learn_projection": self.learn_projection,
            "kd_scaling": self.kd_scaling,
            "lmbda": self.lmbda,
            "data": self.data,
            "on_policy_ce": self.on_policy_ce,
        }

    def relative_cost(self) -> float:
        """A run's wall time relative to a CE-only run (measured on the miniature: CE 20 s, KL teacher +4 s,
        a cross-tokenizer teacher +8-14 s, adaptive weights and learned W +1-2 s). Pools start the costliest
        runs first, so no long run is left alone at the end while the other worker idles."""
        cost = 1.0 + sum(0.2 if loss == "kl" else 0.55 for _, loss, _ in self.teachers)
        cost += 0.05 * (self.weighting != "static") + 0.1 * self.learn_projection
        return cost + 3.0 * self.lmbda  # on-policy: generation and live teachers (measured ~4x an off-policy step)

    @classmethod
    def from_dict(cls, d) -> "Setting":
        return cls(
            d["name"],
            [tuple(t) for t in d["teachers"]],
            d.get("weighting", "static"),
            d.get("label", ""),
            bool(d.get("learn_projection", False)),
            d.get("kd_scaling", "default"),
            float(d.get("lmbda", 0.0)),
            d.get("data", "corpus"),
            bool(d.get("on_policy_ce", False)),
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


def kd_scaling_settings(
    cfg, bases=("pkl_qwen3", "kd_llama"), statics=("kd_heavy", "balanced", "ce_heavy")
) -> tuple[list, list]:
    """The KD/CE scaling sweep: each base setting (its teachers and loss) with the dynamic scaling and each static
    weighting, named ``<base>@<scaling>``; a weighting equal to the config's own (mini: "balanced") is the base
    row itself, not run twice.

    Returns ``(settings, comparisons)``: the settings to run besides the base rows, and the comparisons "dynamic vs
    <static>" as ``(name, setting A, setting B, paper's sign on the average, on arithmetic)`` tuples, the format
    of `xtoken.report.SINGLE_COMPARISONS` (the paper: dynamic beats all three static weightings; no number)."""
    by_name = {s.name: s for s in SINGLE_TEACHER_SETTINGS}
    default = Setting("default").loss_weights(cfg)
    settings, comparisons = [], []
    for base in bases:
        b = by_name[base]
        names = {}
        for k in ("dynamic",) + tuple(statics):
            if KD_SCALINGS[k] == default:
                names[k] = base
                continue
            ce, kd, dyn = KD_SCALINGS[k]
            how = "KD * stopgrad(CE / KD)" if dyn else f"{ce:g} CE + {kd:g} KD"
            settings.append(Setting(f"{base}@{k}", list(b.teachers), label=f"{b.label}, {k} ({how})", kd_scaling=k))
            names[k] = settings[-1].name
        teacher = b.label.split("(")[-1].rstrip(")")
        for k in statics:
            comparisons.append((f"dynamic vs {k} KD/CE, {teacher}", names["dynamic"], names[k], "> 0", None))
    return settings, comparisons


def on_policy_settings(teacher: str = "qwen3", lmbda: float = 1.0) -> list:
    """The on-policy experiment on the arithmetic rows, as fixed before its first run (docs/miniature.md): CE only
    and P-KL off-policy, then on-policy P-KL, GOLD and H-KL with ``teacher`` (every batch on-policy at
    ``lmbda=1``, CE also on the student's own sample), each on the same rows, seeds and steps."""
    label = _model_name(teacher)
    out = [
        Setting("ce_only@arith", [], label="CE only, off-policy, arithmetic rows", data="arithmetic_prompts"),
        Setting(
            f"pkl_{teacher}@arith",
            [(teacher, "p_kl", 1.0)],
            label=f"P-KL ({label}), off-policy, arithmetic rows",
            data="arithmetic_prompts",
        ),
    ]
    for loss, name in (("p_kl", "P-KL"), ("gold", "GOLD"), ("h_kl", "H-KL")):
        out.append(
            Setting(
                f"{loss.replace('_', '')}_{teacher}@on_policy",
                [(teacher, loss, 1.0)],
                label=f"{name} ({label}), on-policy (lmbda {lmbda:g}), arithmetic rows",
                lmbda=lmbda,
                data="arithmetic_prompts",
                on_policy_ce=True,
            )
        )
    return out


def on_policy_followup_settings(teacher: str = "qwen3") -> list:
    """Runs added after the on-policy experiment's first results (docs/miniature.md, "Follow-up"): is CE on the
    student's own samples what hurt, and does on-policy training hurt without it, with the same tokenizer, or mixed
    with off-policy batches? On the arithmetic rows, same seeds and steps."""
    label, A = _model_name(teacher), "arithmetic_prompts"
    pkl = [(teacher, "p_kl", 1.0)]
    return [
        Setting(
            "ce_only@on_policy",
            [],
            label="CE on the student's own samples only (lmbda 1)",
            lmbda=1.0,
            data=A,
            on_policy_ce=True,
        ),
        Setting(f"pkl_{teacher}@on_policy_no_ce", pkl, label=f"P-KL ({label}), on-policy, KD alone", lmbda=1.0, data=A),
        Setting(
            f"pkl_{teacher}@mixed",
            pkl,
            label=f"P-KL ({label}), lmbda 0.5 (on-policy batches KD alone)",
            lmbda=0.5,
            data=A,
        ),
        Setting(
            "kd_llama@arith", [("llama", "kl", 1.0)], label="KL (Llama-3.2-3B), off-policy, arithmetic rows", data=A
        ),
        Setting(
            "kd_llama@on_policy_no_ce",
            [("llama", "kl", 1.0)],
            label="KL (Llama-3.2-3B), on-policy, KD alone",
            lmbda=1.0,
            data=A,
        ),
    ]


def on_policy_followup_comparisons(teacher: str = "qwen3") -> list:
    """The follow-up's comparisons, in the format of `on_policy_comparisons`."""
    label = _model_name(teacher, family_only=True)
    p = f"pkl_{teacher}"
    pairs = [
        ("CE on own samples vs CE only off-policy", "ce_only@on_policy", "ce_only@arith"),
        (f"on-policy P-KL ({label}), KD alone vs with CE on own samples", f"{p}@on_policy_no_ce", f"{p}@on_policy"),
        (f"on-policy P-KL ({label}), KD alone vs off-policy P-KL", f"{p}@on_policy_no_ce", f"{p}@arith"),
        (f"P-KL ({label}) lmbda 0.5 vs off-policy P-KL", f"{p}@mixed", f"{p}@arith"),
        ("on-policy KL (Llama), KD alone vs off-policy KL (Llama)", "kd_llama@on_policy_no_ce", "kd_llama@arith"),
    ]
    return [(name, a, b, None, None) for name, a, b in pairs]


def on_policy_comparisons(teacher: str = "qwen3") -> list:
    """The on-policy experiment's comparisons A - B (docs/miniature.md), in the format of
    `xtoken.report.SINGLE_COMPARISONS` with no paper claim (a finding beyond the paper: 'A higher', 'B higher' or
    'inconclusive'): ``(name, setting A, setting B, None, None)``."""
    label = _model_name(teacher, family_only=True)
    on, off, ce = "@on_policy", f"pkl_{teacher}@arith", "ce_only@arith"
    pairs = [
        (f"on-policy vs off-policy P-KL ({label})", f"pkl_{teacher}{on}", off),
        (f"on-policy GOLD vs on-policy P-KL ({label})", f"gold_{teacher}{on}", f"pkl_{teacher}{on}"),
        (f"on-policy H-KL vs on-policy P-KL ({label})", f"hkl_{teacher}{on}", f"pkl_{teacher}{on}"),
        (f"off-policy P-KL ({label}) vs CE only, arithmetic rows", off, ce),
        (f"on-policy P-KL ({label}) vs CE only, arithmetic rows", f"pkl_{teacher}{on}", ce),
    ]
    return [(name, a, b, None, None) for name, a, b in pairs]
