"""trl-opd: on-policy distillation for TRL with the prefix source and the token-level divergence as separate knobs."""

from .config import OPDConfig
from .trainer import OPDTrainer

__all__ = ["OPDConfig", "OPDTrainer"]
__version__ = "0.1.0"
