"""Training-time controllers of `OPDTrainer`: knob schedules, the entropy-gated length curriculum and EffOPD.

Each is a `transformers.TrainerCallback` and `transformers.ExportableState`: it changes knobs by assigning to the
trainer's `args`, logs `opd/` metrics, and resumes from a checkpoint where it stopped (see `docs/callbacks.md`).
"""

from .base import OPDCallback
from .collapse_guard import CollapseGuard
from .curriculum import EntropyGatedLengthCurriculum
from .effopd import EffOPDCallback
from .schedule import ScheduleCallback

__all__ = ["CollapseGuard", "EffOPDCallback", "EntropyGatedLengthCurriculum", "OPDCallback", "ScheduleCallback"]
