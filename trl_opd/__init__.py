"""trl-opd: on-policy distillation for TRL with the prefix source and the token-level divergence as separate knobs."""

from .callbacks import CollapseGuard, EffOPDCallback, EntropyGatedLengthCurriculum, OPDCallback, ScheduleCallback
from .config import OPDConfig
from .trainer import OPDTrainer

__all__ = [
    "CollapseGuard",
    "EffOPDCallback",
    "EntropyGatedLengthCurriculum",
    "OPDCallback",
    "OPDConfig",
    "OPDTrainer",
    "ScheduleCallback",
]
__version__ = "0.1.0"
