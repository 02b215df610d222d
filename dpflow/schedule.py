"""Learning-rate schedules: linear warmup, then constant, cosine, step or polynomial decay.

Pure functions of the position in training (fractional epochs, computed from the integer
step), so a resumed run continues the very same sequence of rates. numpy-free.

    peak   ...........____
          /               \\___        cosine, poly: from the peak at the end of warmup
         /                     \\__    down to min_lr at the last epoch;
    start                        min  step: x factor at each decay epoch.
          |warmup|
"""

import bisect
import math
from dataclasses import dataclass

SCHEDULES = ("constant", "cosine", "step", "poly")
SCALINGS = ("none", "linear", "sqrt")


def scaled_lr(lr, scaling, batch, base_batch):
    """The lr for a global batch (rows per update) from the lr tuned at `base_batch`:
    linear (Goyal et al.) or square-root (Krizhevsky; You et al. with LAMB) scaling."""
    if scaling == "linear":
        return lr * batch / base_batch
    if scaling == "sqrt":
        return lr * math.sqrt(batch / base_batch)
    if scaling == "none":
        return lr
    raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")


@dataclass(frozen=True)
class Schedule:
    peak: float  # the lr after warmup (already scaled for the batch)
    epochs: float  # the run's length: cosine and poly reach min_lr there
    steps_per_epoch: int
    kind: str = "constant"
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0  # the lr warmup starts from (the unscaled lr under linear scaling)
    decay_epochs: tuple = ()  # step: the epochs where the lr is multiplied by decay_factor
    decay_factor: float = 0.1
    power: float = 2.0  # poly: (1 - progress) ** power
    min_lr: float = 0.0  # the floor of every decay

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")

    def lr_at(self, epochs_done):
        """The learning rate of the step taken after `epochs_done` (fractional) epochs."""
        warmup = self.warmup_epochs
        if warmup > 0 and epochs_done < warmup:
            # The first step already moves (1/steps of an epoch done at its end), as Goyal et al.
            progress = min(1.0, (epochs_done + 1.0 / max(self.steps_per_epoch, 1)) / warmup)
            return self.warmup_start + (self.peak - self.warmup_start) * progress
        return self.decayed(epochs_done)

    def decayed(self, epochs_done):
        """The rate after warmup: the peak, decayed according to `kind`."""
        if self.kind == "constant":
            return self.peak
        if self.kind == "step":
            # Decay epoch e applies from the first step of epoch e (bisect_right: e itself decays).
            times = bisect.bisect_right(self.decay_epochs, epochs_done)
            return max(self.peak * self.decay_factor ** times, self.min_lr)
        span = self.epochs - self.warmup_epochs
        progress = min(max((epochs_done - self.warmup_epochs) / span, 0.0), 1.0) if span > 0 else 1.0
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # poly
            shape = (1.0 - progress) ** self.power
        return self.min_lr + (self.peak - self.min_lr) * shape

