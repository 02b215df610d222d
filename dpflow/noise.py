"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training"), from the two batch sizes data parallelism already computes. numpy-free.

A mean gradient over b rows has E|G_b|^2 = |G|^2 + tr(Sigma) / b, where G is the true
gradient and Sigma the covariance of one row's gradient. Each rank holds its local mean
gradient (b_r rows) before the allreduce and the global one (B rows) after it; with
A = the mean of |G_{b_r}|^2 over the ranks that hold rows, h = the mean of their 1/b_r and
C = |G_B|^2, the two equations

    A = |G|^2 + tr(Sigma) h,    C = |G|^2 + tr(Sigma) / B

give unbiased estimates of |G|^2 and tr(Sigma) (for equal shards b, the paper's formulas).
Both are averaged over many steps before dividing: B_simple = tr(Sigma) / |G|^2, the batch
above which a larger batch buys little progress per step.
"""


def estimate(local_mean_sq, local_mean_inverse_batch, global_sq, global_batch):
    """One step's unbiased (|G|^2, tr(Sigma)), or None when the batch sizes coincide.

    local_mean_sq: mean over the ranks holding rows of |G_{b_r}|^2 (each rank's mean gradient)
    local_mean_inverse_batch: mean of 1/b_r over the same ranks
    global_sq: |G_B|^2 of the global mean gradient; global_batch: B
    """
    gap = local_mean_inverse_batch - 1.0 / global_batch
    if not gap > 1e-12 * local_mean_inverse_batch:  # one rank held every row: one batch size
        return None
    trace = (local_mean_sq - global_sq) / gap
    return global_sq - trace / global_batch, trace


class NoiseScale:
    """Sums of the per-step estimates since the last reset (an epoch): their ratio is the
    smoothed B_simple (the ratio of means, not the mean of ratios, which a near-zero |G|^2
    estimate would ruin)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.gradient_sq = self.trace = 0.0
        self.steps = 0

    def add(self, gradient_sq, trace):
        self.gradient_sq += gradient_sq
        self.trace += trace
        self.steps += 1

    def value(self):
        """B_simple = tr(Sigma) / |G|^2 over the steps since reset; None if not measurable
        (no steps, or |G|^2 not yet resolved from the noise)."""
        if not self.steps or not self.gradient_sq > 0:
            return None
        return self.trace / self.gradient_sq

    def state(self):
        return {"gradient_sq": self.gradient_sq, "trace": self.trace, "steps": self.steps}

    def load_state(self, state):
        self.gradient_sq, self.trace = float(state["gradient_sq"]), float(state["trace"])
        self.steps = int(state["steps"])


def local_term(local_grad_sq, local_rows, global_rows):
    """What one rank adds to the noise slot of the allreduce: |G_{b_r}|^2 of its mean gradient.

    `local_grad_sq` is the squared norm of its gradient of the loss normalised by the global
    row count, which is b_r / B times its mean gradient. A rank without rows adds 0.
    """
    if local_rows == 0:
        return 0.0
    return local_grad_sq * (global_rows / local_rows) ** 2


def step_estimate(slot_sum, rows_per_rank, global_sq, global_rows):
    """(|G|^2, tr(Sigma)) of one step from the reduced slot and the rows each rank held
    (known to every rank without communication), or None if not measurable."""
    held = [rows for rows in rows_per_rank if rows > 0]
    if len(held) < 2:
        return None
    return estimate(slot_sum / len(held), sum(1.0 / rows for rows in held) / len(held),
                    global_sq, global_rows)
