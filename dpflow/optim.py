"""Optimizers over flat arrays: they see one parameter buffer and one gradient buffer, never
the model. Every update is a handful of vectorised in-place operations on the whole buffer,
with scratch preallocated once, so it is identical on every rank and allocates nothing.
"""

import fnmatch
import math

import numpy as np

# Biases and normalisation parameters: excluded from layer-wise adaptation and weight decay
# (You et al. 2017 and 2019): their norms are small and carry no scale to adapt to.
EXCLUDE_FROM_ADAPTATION = "*.b,*bn*"


class Optimizer:
    """`step(params, grads)` updates `params` in place; `lr` may change between steps. The
    step consumes `grads`: an optimizer may write its scratch over them."""

    def __init__(self, size, dtype, lr, weight_decay=0.0):
        self.lr = lr
        self.weight_decay = weight_decay
        self.steps = 0
        self.scratch = np.empty(size, dtype)

    def effective_grad(self, params, grads):
        """grads + weight_decay * params (L2 decay, as torch.optim.SGD does), or grads itself."""
        if not self.weight_decay:
            return grads
        np.multiply(params, self.weight_decay, out=self.scratch)
        self.scratch += grads
        return self.scratch

    def state_dict(self):
        """The optimizer's state: its live arrays (write into them to restore it) and steps."""
        return {"steps": self.steps}


class SGD(Optimizer):
    """p -= lr * g; with momentum mu: v = mu * v + g, p -= lr * v (PyTorch's form)."""

    def __init__(self, size, dtype, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(size, dtype, lr, weight_decay)
        self.momentum = momentum
        self.velocity = np.zeros(size, dtype) if momentum else None

    def step(self, params, grads):
        grad = self.effective_grad(params, grads)
        if self.velocity is not None:
            self.velocity *= self.momentum
            self.velocity += grad
            grad = self.velocity
        # The scaled step is written over the spent gradient, not into a third buffer: the
        # update's working set is then two buffers, not three (2.1 MB float32 after a cache
        # flush: 161 against 216 us), and the bits are the same.
        np.multiply(grad, self.lr, out=grads)
        params -= grads
        self.steps += 1

    def state_dict(self):
        state = super().state_dict()
        if self.velocity is not None:
            state["velocity"] = self.velocity
        return state



class Adam(Optimizer):
    """Kingma and Ba: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr m_hat / (sqrt(v_hat) + eps)."""

    def __init__(self, size, dtype, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(size, dtype, lr, weight_decay)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m = np.zeros(size, dtype)
        self.v = np.zeros(size, dtype)
        self.denominator = np.empty(size, dtype)

    def step(self, params, grads):
        direction = self.direction(self.effective_grad(params, grads))
        direction *= self.lr / (1 - self.beta1 ** self.steps)
        params -= direction

    def direction(self, grad):
        """Count the step, update the moments, return m / (sqrt(v_hat) + eps) in scratch:
        the Adam update before the lr and the first moment's bias correction."""
        self.steps += 1
        self.m *= self.beta1
        np.multiply(grad, 1 - self.beta1, out=self.denominator)
        self.m += self.denominator
        np.multiply(grad, grad, out=self.denominator)
        self.denominator *= 1 - self.beta2
        self.v *= self.beta2
        self.v += self.denominator
        bias2 = 1 - self.beta2 ** self.steps
        np.sqrt(self.v, out=self.denominator)
        self.denominator /= np.sqrt(bias2)
        self.denominator += self.eps
        np.divide(self.m, self.denominator, out=self.scratch)
        return self.scratch

    def state_dict(self):
        return {**super().state_dict(), "m": self.m, "v": self.v}



def adapted_parameters(slices, exclude=EXCLUDE_FROM_ADAPTATION):
    """[(slice, adapt)] in packing order: adapt is False for names matching a pattern of
    `exclude` (comma-separated shell patterns, e.g. `*.b,*bn*`)."""
    patterns = [pattern.strip() for pattern in exclude.split(",") if pattern.strip()]
    return [(where, not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))
            for name, where in slices.items()]


def norm(x, scratch):
    """||x||, as float, through `scratch` (same shape): numpy's pairwise sum, no BLAS, so
    every rank and every thread count gets the same bits."""
    np.multiply(x, x, out=scratch)
    return math.sqrt(float(np.add.reduce(scratch)))


def trust_ratio(eta, w_norm, update_norm):
    """eta * ||w|| / ||update||, or 1 where either norm is zero (a fresh zero-initialised
    layer, a vanishing gradient): as the reference implementations do."""
    if w_norm > 0 and update_norm > 0:
        return eta * w_norm / update_norm
    return 1.0


class LARS(Optimizer):
    """You et al. 2017, per parameter p not excluded from adaptation:

        local_lr = lr * eta * ||p|| / (||g|| + wd * ||p||)
        v = momentum * v + local_lr * (g + wd * p);  p -= v

    Excluded parameters (biases, normalisation) take local_lr = lr and no decay. The lr sits
    inside the velocity, as in the paper's Algorithm 1.
    """

    def __init__(self, size, dtype, lr, slices, momentum=0.9, weight_decay=0.0,
                 trust_coefficient=0.001, exclude=EXCLUDE_FROM_ADAPTATION):
        super().__init__(size, dtype, lr, weight_decay)
        self.momentum, self.trust_coefficient = momentum, trust_coefficient
        self.parameters = adapted_parameters(slices, exclude)
        self.velocity = np.zeros(size, dtype)
        self.ratios = np.ones(len(self.parameters))  # the last step's trust ratios, to inspect

    def step(self, params, grads):
        wd, scratch = self.weight_decay, self.scratch
        for index, (where, adapt) in enumerate(self.parameters):
            p, g, update, v = params[where], grads[where], scratch[where], self.velocity[where]
            if adapt:
                w_norm, g_norm = norm(p, update), norm(g, update)
                ratio = trust_ratio(self.trust_coefficient, w_norm, g_norm + wd * w_norm) if g_norm > 0 else 1.0
                np.multiply(p, wd, out=update)
                update += g
            else:
                ratio = 1.0
                np.copyto(update, g)
            self.ratios[index] = ratio
            update *= self.lr * ratio
            v *= self.momentum
            v += update
            p -= v
        self.steps += 1

    def state_dict(self):
        return {**super().state_dict(), "velocity": self.velocity}


class LAMB(Adam):
    """You et al. 2019, per parameter p not excluded from adaptation:

        r = m_hat / (sqrt(v_hat) + eps)         (Adam's update, moments as in Adam)
        u = r + wd * p                          (decoupled weight decay)
        p -= lr * eta * ||p|| / ||u|| * u

    Excluded parameters take the plain Adam step r, without decay.
    """

    def __init__(self, size, dtype, lr, slices, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0,
                 trust_coefficient=1.0, exclude=EXCLUDE_FROM_ADAPTATION):
        super().__init__(size, dtype, lr, beta1, beta2, eps, weight_decay)
        self.trust_coefficient = trust_coefficient
        self.parameters = adapted_parameters(slices, exclude)
        self.ratios = np.ones(len(self.parameters))

    def step(self, params, grads):
        direction = self.direction(grads)  # decay is decoupled: never added to the gradient
        direction *= 1 / (1 - self.beta1 ** self.steps)
        wd, work = self.weight_decay, self.denominator
        for index, (where, adapt) in enumerate(self.parameters):
            p, u, scratch = params[where], direction[where], work[where]
            if adapt:
                if wd:
                    np.multiply(p, wd, out=scratch)
                    u += scratch
                ratio = trust_ratio(self.trust_coefficient, norm(p, scratch), norm(u, scratch))
            else:
                ratio = 1.0
            self.ratios[index] = ratio
            u *= self.lr * ratio
            p -= u


OPTIMIZERS = ("sgd", "momentum", "adam", "lars", "lamb")


def create_optimizer(name, size, dtype, lr, momentum=0.9, weight_decay=0.0, slices=None,
                     trust_coefficient=None, exclude=EXCLUDE_FROM_ADAPTATION):
    """`sgd`, `momentum` (SGD with momentum), `adam`, `lars` or `lamb`.

    The layer-wise ones need `slices` (name -> slice of the flat buffers, as in
    FlatParameters.slices); `trust_coefficient` None takes each paper's default
    (0.001 for LARS, 1 for LAMB).
    """
    if name == "sgd":
        return SGD(size, dtype, lr, weight_decay=weight_decay)
    if name == "momentum":
        return SGD(size, dtype, lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return Adam(size, dtype, lr, weight_decay=weight_decay)
    if name in ("lars", "lamb"):
        if slices is None:
            raise ValueError(f"optimizer {name} needs the parameter slices of the flat buffer")
        if name == "lars":
            eta = 0.001 if trust_coefficient is None else trust_coefficient
            return LARS(size, dtype, lr, slices, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=eta, exclude=exclude)
        eta = 1.0 if trust_coefficient is None else trust_coefficient
        return LAMB(size, dtype, lr, slices, weight_decay=weight_decay, trust_coefficient=eta,
                    exclude=exclude)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
