"""Training with the Hugging Face `Trainer`: the names of `xtoken.hf`, importable from here as well."""

from .hf import (
    LOSSES,
    NONFINITE_POLICIES,
    WEIGHTINGS,
    DistillCollator,
    LossCurveCallback,
    NonFiniteError,
    Teacher,
    TeacherCache,
    XTokenConfig,
    XTokenTrainer,
    normal_forms,
    teacher_kd_loss,
)

__all__ = [
    "XTokenConfig",
    "Teacher",
    "TeacherCache",
    "DistillCollator",
    "XTokenTrainer",
    "LossCurveCallback",
    "NonFiniteError",
    "teacher_kd_loss",
    "normal_forms",
    "LOSSES",
    "WEIGHTINGS",
    "NONFINITE_POLICIES",
]
