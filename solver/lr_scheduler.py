"""Learning-rate schedule with warmup (as the original IRRA ``solver/lr_scheduler.py``).

The schedule is evaluated per *epoch* (``sched.step()`` once per epoch). During the first
``warmup_epochs`` epochs the lr is ``base_lr * factor`` with ``factor`` either constant
(``warmup_factor``) or linearly ramped from ``warmup_factor`` to 1. Afterwards one of five modes applies.
"""
from bisect import bisect_right
from math import cos, pi
from typing import List, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import _LRScheduler

from utils.choices import LR_SCHEDULERS, WARMUP_METHODS



class LRSchedulerWithWarmup(_LRScheduler):
    """Warmup followed by step / exp / poly / cosine / linear decay.

    Args:
        optimizer: wrapped optimizer (each param group keeps its own ``base_lr``).
        milestones: sorted epochs at which ``step`` mode multiplies the lr by ``gamma``.
        gamma: decay factor of ``step`` mode.
        mode: one of ``utils.choices.LR_SCHEDULERS``.
        warmup_factor: lr multiplier at epoch 0 of the warmup.
        warmup_epochs: number of warmup epochs.
        warmup_method: ``"constant"`` or ``"linear"``.
        total_epochs: epochs of the whole run (``epoch_ratio`` reaches 1 there).
        target_lr: final lr of ``poly`` / ``cosine``.
        power: base of ``exp`` and ``poly``.
        last_epoch: index of the last epoch (-1 to start fresh).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        mode: str = "step",
        warmup_factor: float = 1.0 / 3,
        warmup_epochs: int = 10,
        warmup_method: str = "linear",
        total_epochs: int = 100,
        target_lr: float = 0.0,
        power: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones should be a list of increasing integers, got {milestones!r}")
        if mode not in LR_SCHEDULERS:
            raise ValueError(f"unknown lr scheduler mode {mode!r}; valid modes: {', '.join(LR_SCHEDULERS)}")
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(
                f"unknown warmup_method {warmup_method!r}; valid methods: {', '.join(WARMUP_METHODS)}"
            )
        self.milestones = list(milestones)
        self.mode = mode
        self.gamma = gamma
        self.warmup_factor = warmup_factor
        self.warmup_epochs = warmup_epochs
        self.warmup_method = warmup_method
        self.total_epochs = total_epochs
        self.target_lr = target_lr
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        """Learning rate of every param group at ``self.last_epoch``."""
        if self.last_epoch < self.warmup_epochs:
            if self.warmup_method == "constant":
                warmup_factor = self.warmup_factor
            else:  # linear
                alpha = self.last_epoch / self.warmup_epochs
                warmup_factor = self.warmup_factor * (1 - alpha) + alpha
            return [base_lr * warmup_factor for base_lr in self.base_lrs]

        if self.mode == "step":
            return [base_lr * self.gamma ** bisect_right(self.milestones, self.last_epoch) for base_lr in self.base_lrs]

        decay_epochs = self.total_epochs - self.warmup_epochs
        # The original divides by zero when total_epochs == warmup_epochs (e.g. a 5-epoch demo with the default
        # 5 warmup epochs, whose final sched.step() lands at epoch 5); we treat that as fully decayed instead.
        epoch_ratio = (self.last_epoch - self.warmup_epochs) / decay_epochs if decay_epochs > 0 else 1.0
        if self.mode == "exp":
            return [base_lr * self.power ** epoch_ratio for base_lr in self.base_lrs]
        if self.mode == "linear":
            return [base_lr * (1 - epoch_ratio) for base_lr in self.base_lrs]
        if self.mode == "poly":
            return [
                self.target_lr + (base_lr - self.target_lr) * self.power ** (1 - epoch_ratio)
                for base_lr in self.base_lrs
            ]
        # cosine
        return [
            self.target_lr + (base_lr - self.target_lr) * 0.5 * (1 + cos(pi * epoch_ratio))
            for base_lr in self.base_lrs
        ]
