"""The MiniFlow regression, data-parallel: the five lines marked `# dp` do it; the
parameters are also named, batches come from one seeded permutation shared by every rank,
and the epoch loss is summed over the ranks.

    mpirun -n 4 python examples/data_parallel_regression.py

Every rank builds the same graph; `DataParallel` packs the parameters into one buffer and
copies rank 0's values to all; each rank back-propagates its block of every global batch
and one allreduce sums the gradients. The printed losses equal a one-process run's.
"""

import numpy as np

from dpflow import MSE, Input, Linear, Sigmoid, forward_and_backward, sgd_update, topological_sort
from dpflow.parallel import DataParallel  # dp


def main(epochs=10, batch_size=32, n_hidden=10, seed=0, verbose=True, comm=None):
    rng = np.random.default_rng(seed)  # the same seed on every rank: the same data and batches
    X_ = rng.normal(size=(512, 13))
    y_ = np.tanh(X_ @ rng.normal(size=(13, 1))).ravel() * 10 + 22
    X_ = (X_ - X_.mean(axis=0)) / X_.std(axis=0)

    X, y = Input(), Input()
    W1, b1 = Input(rng.normal(size=(13, n_hidden)), name="W1"), Input(np.zeros(n_hidden), name="b1")
    W2, b2 = Input(rng.normal(size=(n_hidden, 1)), name="W2"), Input(np.zeros(1), name="b2")
    cost = MSE(y, Linear(Sigmoid(Linear(X, W1, b1)), W2, b2))
    graph = topological_sort({X: X_, y: y_})
    trainables = [W1, b1, W2, b2]
    dp = DataParallel({t.name: t for t in trainables}, comm=comm)  # dp

    losses = []
    for epoch in range(epochs):
        order = rng.permutation(len(X_))
        total = 0.0
        for start in range(0, len(X_), batch_size):
            batch = order[start:start + batch_size]
            X.value, y.value = dp.shard(X_[batch]), dp.shard(y_[batch])  # dp
            cost.normaliser = len(batch)  # dp: divide by the GLOBAL row count
            forward_and_backward(graph)
            total += cost.loss_sum
            dp.allreduce_gradients()  # dp
            sgd_update(trainables, learning_rate=0.05)
        summed = np.array([total])
        dp.comm.allreduce_sum(summed)
        losses.append(summed[0] / len(X_))
        if verbose and dp.is_root:
            print(f"Epoch: {epoch + 1}, Loss: {losses[-1]:.4f}")
    return losses, {t.name: t.value.copy() for t in trainables}


if __name__ == "__main__":
    main()
