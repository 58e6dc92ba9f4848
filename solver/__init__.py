"""The optimizer and its parameter groups (build.py) and the warm-up learning-rate schedules (lr_scheduler.py)."""
from .build import build_lr_scheduler, build_optimizer
from .lr_scheduler import LRSchedulerWithWarmup

__all__ = ["build_optimizer", "build_lr_scheduler", "LRSchedulerWithWarmup"]
