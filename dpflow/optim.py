"""Optimizers over flat arrays: they see one parameter buffer and one gradient buffer, never
the model. Every update is a handful of vectorised in-place operations on the whole buffer,
with scratch preallocated once, so it is identical on every rank and allocates nothing.
"""

import numpy as np


class Optimizer:
    """`step(params, grads)` updates `params` in place; `lr` may change between steps."""

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
        np.multiply(grad, self.lr, out=self.scratch)
        params -= self.scratch
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
        grad = self.effective_grad(params, grads)
        self.steps += 1
        self.m *= self.beta1
        np.multiply(grad, 1 - self.beta1, out=self.denominator)
        self.m += self.denominator
        np.multiply(grad, grad, out=self.denominator)
        self.denominator *= 1 - self.beta2
        self.v *= self.beta2
        self.v += self.denominator
        bias1 = 1 - self.beta1 ** self.steps
        bias2 = 1 - self.beta2 ** self.steps
        np.sqrt(self.v, out=self.denominator)
        self.denominator /= np.sqrt(bias2)
        self.denominator += self.eps
        np.divide(self.m, self.denominator, out=self.scratch)
        self.scratch *= self.lr / bias1
        params -= self.scratch

    def state_dict(self):
        return {**super().state_dict(), "m": self.m, "v": self.v}



def create_optimizer(name, size, dtype, lr, momentum=0.9, weight_decay=0.0):
    """`sgd`, `momentum` (SGD with momentum) or `adam`."""
    if name == "sgd":
        return SGD(size, dtype, lr, weight_decay=weight_decay)
    if name == "momentum":
        return SGD(size, dtype, lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return Adam(size, dtype, lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be sgd, momentum or adam, got {name!r}")
