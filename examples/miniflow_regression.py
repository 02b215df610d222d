"""The MiniFlow tutorial's 2-layer sigmoid regression, unchanged but for the import line.

    python examples/miniflow_regression.py
"""

import numpy as np

from dpflow import MSE, Input, Linear, Sigmoid, forward_and_backward, sgd_update, topological_sort


def make_data(rng, n_samples=506, n_features=13):
    """Generated stand-in for the Boston housing data the tutorial used."""
    X = rng.normal(size=(n_samples, n_features))
    true_W = rng.normal(size=(n_features, 1))
    y = np.tanh(X @ true_W).ravel() * 10 + 22 + rng.normal(scale=0.5, size=n_samples)
    return X, y


def main(epochs=10, batch_size=11, n_hidden=10, seed=0, verbose=True):
    rng = np.random.default_rng(seed)
    X_, y_ = make_data(rng)
    X_ = (X_ - np.mean(X_, axis=0)) / np.std(X_, axis=0)
    n_features = X_.shape[1]
    W1_ = rng.normal(size=(n_features, n_hidden))
    b1_ = np.zeros(n_hidden)
    W2_ = rng.normal(size=(n_hidden, 1))
    b2_ = np.zeros(1)

    # Neural network
    X, y = Input(), Input()
    W1, b1 = Input(), Input()
    W2, b2 = Input(), Input()
    l1 = Linear(X, W1, b1)
    s1 = Sigmoid(l1)
    l2 = Linear(s1, W2, b2)
    cost = MSE(y, l2)

    feed_dict = {X: X_, y: y_, W1: W1_, b1: b1_, W2: W2_, b2: b2_}
    steps_per_epoch = X_.shape[0] // batch_size
    graph = topological_sort(feed_dict)
    trainables = [W1, b1, W2, b2]
    losses = []
    for epoch in range(epochs):
        loss = 0
        for _ in range(steps_per_epoch):
            batch = rng.choice(len(X_), size=batch_size)  # resample, as the tutorial does
            X.value = X_[batch]
            y.value = y_[batch]
            forward_and_backward(graph)
            sgd_update(trainables, learning_rate=1e-2)
            loss += graph[-1].value
        losses.append(loss / steps_per_epoch)
        if verbose:
            print(f"Epoch: {epoch + 1}, Loss: {losses[-1]:.3f}")
    return losses


if __name__ == "__main__":
    main()
