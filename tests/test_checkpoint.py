"""Checkpoint files: atomic, checksummed, pruned after commit, with fallback on damage."""

import os

import numpy as np
import pytest

from dpflow.checkpoint import (
    CheckpointError, list_checkpoints, load_latest_valid, read_checkpoint, save_checkpoint,
)


def save(directory, step, keep=3):
    arrays = {"param/w": np.full((2, 2), float(step))}
    return save_checkpoint(str(directory), step, arrays, {"step": step}, keep=keep)


def test_round_trip_and_latest(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    path, arrays, meta = load_latest_valid(str(tmp_path))
    assert meta == {"step": 3} and np.all(arrays["param/w"] == 3)
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
    assert meta == {"step": 1} and np.all(arrays["param/w"] == 1)
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
    assert meta == {"step": 1}
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp") or name.endswith("2.dpf")]
