"""The Hugging Face integration: distil teachers into a student with `transformers.Trainer` (`XTokenTrainer`),
its settings (`XTokenConfig`), teachers (`Teacher`), batches (`DistillCollator`) and cached teacher outputs
(`TeacherCache`). It builds on the library (`xtoken.losses`, `xtoken.align`, `xtoken.projection`,
`xtoken.multi_teacher`) and never on the reproduction (`xtoken.mini`, `xtoken.paper`)."""

from .cache import TeacherCache
from .collator import DistillCollator, normal_forms
from .config import LOSSES, NONFINITE_POLICIES, WEIGHTINGS, XTokenConfig
from .teacher import Teacher
from .trainer import LossCurveCallback, NonFiniteError, XTokenTrainer, teacher_kd_loss

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
