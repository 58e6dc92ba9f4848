from .build import build_lr_scheduler, build_optimizer
from .lr_scheduler import LRSchedulerWithWarmup

__all__ = ["build_optimizer", "build_lr_scheduler", "LRSchedulerWithWarmup"]
