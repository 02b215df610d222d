"""Dropout and BatchNorm: gradient checks, evaluation mode, 0-row batches, and the property
that makes them data-parallel: a row's mask and the batch statistics do not depend on how the
global batch is split between ranks (simulated here with shards in one process)."""

import threading

import numpy as np
import pytest

from test_layers import check_gradients
from dpflow import (
    MSE, BatchNorm, Conv2D, Dropout, Flatten, GraphError, Input, Linear, forward_and_backward, forward_pass,
    sort_layers,
)
from dpflow.dropout import keep_mask

# Uneven shards of a global batch of 7 rows, one of them empty (a short last batch).
SPLITS = [[(0, 7)], [(0, 4), (4, 7)], [(0, 3), (3, 3), (3, 7)], [(0, 2), (2, 4), (4, 6), (6, 7)]]


def rng():
    return np.random.default_rng(3)


# --- Dropout --------------------------------------------------------------------------------

def test_dropout_gradient_with_a_fixed_mask():
    r = rng()
    X, y = Input(r.normal(size=(6, 10))), Input(r.normal(size=(6, 10)))
    drop = Dropout(X, 0.4, seed=5)
    drop.set_batch_position(step=3, first_row=0)  # the same mask at every forward pass
    check_gradients(MSE(y, drop), [X, y])
    kept = drop.value != 0
    assert 0 < np.count_nonzero(kept) < kept.size
    assert np.allclose(drop.value[kept], X.value[kept] / 0.6)


@pytest.mark.parametrize("shape", [(7, 13), (7, 3, 4, 5)])
@pytest.mark.parametrize("split", SPLITS)
def test_a_rows_mask_does_not_depend_on_the_rank_that_holds_it(shape, split):
    x = np.ones(shape)
    whole = Dropout(Input(x), 0.5, seed=11)
    whole.set_batch_position(step=42, first_row=0)
    whole.forward()
    for start, stop in split:
        shard = Dropout(Input(x[start:stop]), 0.5, seed=11)
        shard.set_batch_position(step=42, first_row=start)
        shard.forward()
        assert np.array_equal(shard.value, whole.value[start:stop])


def test_masks_change_with_the_step_the_seed_and_the_row():
    masks = {(seed, step): keep_mask(seed, step, 0, 4, 300, 0.5) for seed in (0, 1) for step in (0, 1)}
    assert len({m.tobytes() for m in masks.values()}) == 4
    rows = masks[(0, 0)]
    assert not any(np.array_equal(rows[i], rows[j]) for i in range(4) for j in range(i))
    big = keep_mask(7, 0, 0, 200, 500, 0.8)
    assert abs(big.mean() - 0.8) < 0.01  # 100,000 draws: the standard deviation is 0.0013


def test_dropout_is_the_identity_in_evaluation_and_at_rate_zero():
    x = rng().normal(size=(5, 4))
    drop = Dropout(Input(x), 0.5)
    drop.training = False
    drop.forward()
    assert drop.value is x
    zero = Dropout(Input(x), 0.0)
    zero.forward()
    assert zero.value is x


def test_dropout_without_a_trainer_draws_a_new_mask_every_pass():
    drop = Dropout(Input(np.ones((4, 50))), 0.5)
    drop.forward()
    first = drop.value.copy()
    drop.forward()
    assert not np.array_equal(first, drop.value)


def test_dropout_takes_zero_rows_and_refuses_a_bad_rate():
    drop = Dropout(Input(np.ones((0, 3, 2, 2))), 0.5)
    drop.set_batch_position(0, 5)
    y = Input(np.zeros((0, 3, 2, 2)))
    MSE(y, drop).normaliser = 4
    forward_and_backward(sort_layers([drop.inbound_layers[0], y]))
    assert drop.value.shape == (0, 3, 2, 2)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\), got 1.0"):
        Dropout(Input(), 1.0)


# --- BatchNorm ------------------------------------------------------------------------------

def batchnorm_net(x, gamma, beta, y, training=True):
    """x -> BatchNorm -> Linear -> MSE; returns (X, params, loss, bn)."""
    r = np.random.default_rng(1)
    X = Input(x)
    g, b = Input(gamma.copy(), name="gamma"), Input(beta.copy(), name="beta")
    bn = BatchNorm(X, g, b, name="bn")
    bn.training = training
    features = int(np.prod(x.shape[1:]))
    W, c = Input(r.normal(size=(features, 3)), name="W"), Input(r.normal(size=3), name="c")
    flat = bn if x.ndim == 2 else Flatten(bn)
    loss = MSE(Input(y), Linear(flat, W, c))
    return X, [g, b, W, c], loss, bn


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 2, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients(shape, training):
    r = rng()
    x = r.normal(size=shape) * 2 + 1
    channels = shape[1]
    X, params, loss, bn = batchnorm_net(x, r.normal(size=channels), r.normal(size=channels),
                                        r.normal(size=(shape[0], 3)), training)
    bn.running_mean[:] = r.normal(size=channels)
    bn.running_var[:] = r.uniform(0.5, 2, size=channels)
    check_gradients(loss, [X, *params])


def test_batchnorm_normalises_with_the_batch_and_evaluates_with_running_statistics():
    r = rng()
    x = r.normal(size=(50, 3)) * [1, 2, 3] + [4, 5, 6]
    X, g, b = Input(x), Input(np.ones(3)), Input(np.zeros(3))
    bn = BatchNorm(X, g, b, momentum=1.0)
    bn.forward()
    assert np.allclose(bn.value.mean(axis=0), 0, atol=1e-12)
    assert np.allclose(bn.value.var(axis=0), 1, atol=1e-3)
    assert np.allclose(bn.running_mean, x.mean(axis=0))
    assert np.allclose(bn.running_var, x.var(axis=0, ddof=1))  # unbiased, as in PyTorch
    bn.training = False
    X.value = x[:5]
    bn.forward()
    assert np.allclose(bn.value, (x[:5] - x.mean(axis=0)) / np.sqrt(x.var(axis=0, ddof=1) + 1e-5))


def test_batchnorm_over_images_is_per_channel():
    r = rng()
    X = Input(r.normal(size=(2, 1, 5, 5)))
    conv = Conv2D(X, Input(r.normal(size=(3, 3, 1, 4))), Input(r.normal(size=4) * 3))
    bn = BatchNorm(conv, Input(np.ones(4)), Input(np.zeros(4)))
    forward_pass(sort_layers([X, *conv.inbound_layers[1:], *bn.inbound_layers[1:]]))
    assert bn.value.shape == (2, 4, 3, 3)
    assert np.allclose(bn.value.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    assert np.allclose(bn.value.var(axis=(0, 2, 3)), 1, atol=1e-3)


class ShardedSum:
    """Shards in threads of one process, summing arrays as an allreduce over ranks would."""

    def __init__(self, shards):
        self.barrier = threading.Barrier(shards)
        self.slots = [None] * shards
        self.calls = 0

    def for_shard(self, index):
        def reduce_sum(array):
            self.slots[index] = array.copy()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].copy())  # the same order on every shard
            self.barrier.wait()
            array[...] = total
            if index == 0:
                self.calls += 1
            return array
        return reduce_sum


@pytest.mark.parametrize("shape", [(7, 4), (7, 3, 2, 2)])
@pytest.mark.parametrize("split", SPLITS[1:])
def test_batchnorm_over_shards_equals_the_whole_batch(shape, split):
    r = rng()
    x, y = r.normal(size=shape) * 3 + 2, r.normal(size=(shape[0], 3))
    gamma, beta = r.normal(size=shape[1]), r.normal(size=shape[1])
    X, params, loss, bn = batchnorm_net(x, gamma, beta, y)
    forward_and_backward(sort_layers([X, *params, loss.inbound_layers[0]]))
    expected = {"value": bn.value, "dX": X.gradients[X],
                "grads": [p.gradients[p].copy() for p in params[:2]],
                "running": (bn.running_mean.copy(), bn.running_var.copy())}

    reduction = ShardedSum(len(split))
    shards = []
    for index, (start, stop) in enumerate(split):
        Xs, ps, ls, bns = batchnorm_net(x[start:stop], gamma, beta, y[start:stop])
        bns.reduce_sum = reduction.for_shard(index)
        ls.normaliser = len(x)  # the global row count, as the trainer sets it
        shards.append((Xs, ps, ls, bns))
    errors = []

    def run(shard):
        try:
            Xs, ps, ls, _ = shard
            forward_and_backward(sort_layers([Xs, *ps, ls.inbound_layers[0]]))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
            reduction.barrier.abort()

    threads = [threading.Thread(target=run, args=(shard,)) for shard in shards]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    assert reduction.calls == 2  # one sum in forward, one in backward
    values = np.concatenate([s[3].value for s in shards])
    dX = np.concatenate([s[0].gradients[s[0]] for s in shards])
    assert np.max(np.abs(values - expected["value"])) < 1e-12
    assert np.max(np.abs(dX - expected["dX"])) < 1e-12
    for i in range(2):  # gamma and beta: each shard's share, summed by the trainer's allreduce
        total = sum(s[1][i].gradients[s[1][i]] for s in shards)
        assert np.max(np.abs(total - expected["grads"][i])) < 1e-12
    for s in shards:  # running statistics: the same on every rank, and the whole batch's
        assert np.array_equal(s[3].running_mean, shards[0][3].running_mean)
        assert np.allclose(s[3].running_mean, expected["running"][0], atol=1e-14)
        assert np.allclose(s[3].running_var, expected["running"][1], atol=1e-14)


def test_batchnorm_shape_errors_name_the_layer():
    X = Input(np.ones((4, 3)))
    BatchNorm(X, Input(np.ones(2)), Input(np.zeros(2)), name="bn0")
    with pytest.raises(GraphError, match=r"'bn0'.*\(4, 3\).*gamma \(2,\).*\(features,\) or \(channels,\)"):
        forward_pass(sort_layers([X]))
    with pytest.raises(ValueError, match="momentum must be in"):
        BatchNorm(X, Input(np.ones(3)), Input(np.zeros(3)), momentum=2)
