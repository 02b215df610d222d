"""A model defined in this file, trained by the whole trainer through `dpflow.fit`:

    mpirun -n 4 python examples/fit_own_model.py --epochs 10

`build` is a model builder like `dpflow train --model examples/fit_own_model.py:build` takes:
a residual MLP with batch norm and dropout. `fit` brings everything `dpflow train` has: exact
sharding of the global batch, one allreduce per step, checkpoints (`--checkpoint-dir`, and
`--resume` after a stop), the watchdog, an agreed stop on SIGINT/SIGTERM, and an abort of
every rank when one fails. Keep the training under `if __name__ == "__main__":`, so that
`dpflow eval` and `dpflow.load_model` can import the builder from this file without training.
"""

import argparse

import numpy as np

import dpflow
from dpflow import Add, BatchNorm, Dropout, Input, Linear, Model, ReLU, SoftmaxCrossEntropy


def build(input_shape, n_classes, rng, dtype, width=64, dropout=0.1):
    """inputs -> Linear -> BatchNorm -> ReLU -> (+ Linear -> ReLU -> Dropout) -> Linear -> loss."""
    n_in = int(np.prod(input_shape))
    params = {}

    def param(name, value):
        params[name] = Input(np.asarray(value, dtype), name=name)
        return params[name]

    x, labels = Input(name="x"), Input(name="labels")
    h = Linear(x, param("in.W", rng.normal(0, np.sqrt(2 / n_in), (n_in, width))), param("in.b", np.zeros(width)))
    h = ReLU(BatchNorm(h, param("bn.gamma", np.ones(width)), param("bn.beta", np.zeros(width)), name="bn"))
    branch = Linear(h, param("res.W", rng.normal(0, np.sqrt(2 / width), (width, width))), param("res.b", np.zeros(width)))
    h = Add(h, Dropout(ReLU(branch), dropout, seed=int(rng.integers(2**63))))
    logits = Linear(h, param("out.W", rng.normal(0, np.sqrt(1 / width), (width, n_classes))),
                    param("out.b", np.zeros(n_classes)))
    return Model(x, labels, logits, SoftmaxCrossEntropy(labels, logits), params)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--save", default="", help="write the trained parameters to this .npz")
    parser.add_argument("--checkpoint-dir", default="")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    history = dpflow.fit(build, "digits", epochs=args.epochs, batch_size=64, lr=0.05, dtype=args.dtype,
                         save=args.save, checkpoint_dir=args.checkpoint_dir, resume=args.resume)
