"""Checkpoint files: atomic, checksummed, pruned after commit, with fallback on damage."""

import os

import numpy as np
import pytest

from dpflow.checkpoint import (
    CheckpointError, checkpoint_path, encode, list_checkpoints, load_latest_valid, read_checkpoint,
    remove_temporaries, save_checkpoint,
)


def valid_meta(step):
    """Metadata as the trainer writes it, at global step `step`."""
    return {"dpflow_version": "0.1.0", "epoch": 0, "step_in_epoch": step, "global_step": step,
            "optimizer_steps": step, "samples_seen": 8 * step, "seed": 0,
            "config": {"dataset": "digits", "hidden": [2], "activation": "relu", "optimizer": "sgd",
                       "dtype": "float64", "batch_size": 8, "epochs": 3},
            "model": {"sizes": [2, 2], "activation": "relu", "dtype": "float64"}}


def save(directory, step, keep=3):
    arrays = {"param/w": np.full((2, 2), float(step))}
    return save_checkpoint(str(directory), step, arrays, valid_meta(step), keep=keep)


def test_round_trip_and_latest(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    path, arrays, meta = load_latest_valid(str(tmp_path))
    assert meta["global_step"] == 3 and np.all(arrays["param/w"] == 3)
    assert open(tmp_path / "latest").read().strip() == os.path.basename(path)


def test_keeps_only_the_newest(tmp_path):
    for step in range(1, 7):
        save(tmp_path, step, keep=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == [
        "ckpt-000000006.dpf", "ckpt-000000005.dpf"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_falls_back_to_previous_with_a_warning(tmp_path, damage):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    data = bytearray(open(newest, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-40] ^= 0x01
    open(newest, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint(newest)
    warnings = []
    path, arrays, meta = load_latest_valid(str(tmp_path), warn=warnings.append)
    assert meta["global_step"] == 1 and np.all(arrays["param/w"] == 1)
    assert len(warnings) == 1 and "ckpt-000000002.dpf is damaged" in warnings[0]


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
    only = save(tmp_path, 1)
    open(only, "r+b").truncate(10)
    with pytest.raises(CheckpointError, match="no valid checkpoint.*Start again without `resume`"):
        load_latest_valid(str(tmp_path), warn=lambda message: None)


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint \(ckpt-\*\.dpf\) in"):
        load_latest_valid(str(tmp_path))


def test_a_crash_during_a_write_leaves_the_previous_latest(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        save(tmp_path, 2)
    monkeypatch.undo()
    path, arrays, meta = load_latest_valid(str(tmp_path))
    assert meta["global_step"] == 1
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp") or name.endswith("2.dpf")]


def write_raw(directory, step, arrays, meta):
    """A checkpoint file with a valid checksum, whatever its contents."""
    path = checkpoint_path(str(directory), step)
    with open(path, "wb") as handle:
        handle.write(encode(arrays, meta))
    return path


def changed(step, **changes):
    meta = valid_meta(step)
    for key, value in changes.items():
        target = meta
        *parents, last = key.split(".")
        for parent in parents:
            target = target[parent]
        if value is REMOVE:
            del target[last]
        else:
            target[last] = value
    return meta


REMOVE = object()
IMPOSSIBLE = {
    "negative epoch": changed(2, epoch=-1),
    "string step": changed(2, global_step="2"),
    "float step": changed(2, global_step=2.0),
    "bool step": changed(2, optimizer_steps=True),
    "missing epoch": changed(2, epoch=REMOVE),
    "missing config": changed(2, config=REMOVE),
    "config not a table": changed(2, config=[1, 2]),
    "config without hidden": changed(2, **{"config.hidden": REMOVE}),
    "config hidden of words": changed(2, **{"config.hidden": "wide"}),
    "config epochs of text": changed(2, **{"config.epochs": "many"}),
    "step in epoch beyond the step": changed(2, step_in_epoch=7),
    "name and step differ": changed(2, global_step=1, step_in_epoch=1, optimizer_steps=1),
    "model sizes of text": changed(2, **{"model.sizes": "2,2"}),
    "model without dtype": changed(2, **{"model.dtype": REMOVE}),
    "metadata not a table": [1, 2, 3],
    "normaliser of an unknown kind": changed(2, normalizer={"kind": "whiten"}),
    "normaliser without its shift": changed(2, normalizer={"kind": "standardize", "scale": [1.0]}),
    "normaliser dividing by zero": changed(2, normalizer={"kind": "scale", "shift": [0.0], "scale": [0.0]}),
    "normaliser of text": changed(2, normalizer="standardize"),
}


@pytest.mark.parametrize("name", list(IMPOSSIBLE))
def test_impossible_metadata_is_damage_and_falls_back(tmp_path, name):
    save(tmp_path, 1)
    write_raw(tmp_path, 2, {"param/w": np.ones((2, 2))}, IMPOSSIBLE[name])
    with pytest.raises(CheckpointError, match="ckpt-000000002.dpf is damaged"):
        read_checkpoint(checkpoint_path(str(tmp_path), 2))
    warnings = []
    path, arrays, meta = load_latest_valid(str(tmp_path), warn=warnings.append)
    assert path.endswith("ckpt-000000001.dpf") and meta["global_step"] == 1
    assert len(warnings) == 1 and "ckpt-000000002.dpf is damaged" in warnings[0]


@pytest.mark.parametrize("arrays,message", [
    ({"param/w": np.full((2, 2), np.nan)}, "NaN or infinite"),
    ({"param/w": np.ones((2, 2), np.int64)}, "not floating point"),
    ({"param/w": np.ones((2, 2), np.float32)}, "float32 but the model is float64"),
    ({"optim/m": np.ones(3)}, "holds no parameters"),
])
def test_impossible_arrays_are_damage(tmp_path, arrays, message):
    path = write_raw(tmp_path, 2, arrays, valid_meta(2))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_a_newer_checkpoint_than_latest_is_found(tmp_path):
    """A run killed between writing a checkpoint and moving `latest` leaves the pointer behind."""
    save(tmp_path, 1)
    latest = (tmp_path / "latest").read_bytes()
    save(tmp_path, 2)
    (tmp_path / "latest").write_bytes(latest)
    path, arrays, meta = load_latest_valid(str(tmp_path))
    assert path.endswith("ckpt-000000002.dpf") and meta["global_step"] == 2


def test_temporaries_of_a_killed_write_are_removed(tmp_path):
    save(tmp_path, 1)
    (tmp_path / ".tmp-abc123.part").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("not ours")
    assert remove_temporaries(str(tmp_path)) == [".tmp-abc123.part"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000001.dpf", "latest", "notes.txt"]
    assert remove_temporaries(str(tmp_path / "missing")) == []


def test_a_checkpoint_file_gets_the_mode_open_would_give_under_the_umask_of_write_time(tmp_path):
    previous = os.umask(0o027)
    try:
        path = save(tmp_path, 1)
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o640


@pytest.mark.timeout(30)  # the read it must not make would never return
def test_a_fifo_named_like_a_checkpoint_is_skipped_not_read(tmp_path):
    """Opening a FIFO for reading waits for a writer forever: a ckpt-*.dpf that is not a
    regular file is passed over like a damaged one."""
    save(tmp_path, 1)
    os.mkfifo(tmp_path / "ckpt-000000002.dpf")
    warnings = []
    path, arrays, meta = load_latest_valid(str(tmp_path), warn=warnings.append)
    assert path.endswith("ckpt-000000001.dpf") and meta["global_step"] == 1
    assert len(warnings) == 1 and "is not a regular file" in warnings[0]
