"""One run per checkpoint directory: the lock is held while its process lives, never after."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dpflow.lock import LOCK_NAME, DirectoryBusy, DirectoryLock, lock_holder

HOLD = """
import sys, time
from dpflow.lock import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def hold_in_another_process(directory):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_holder_is_refused_naming_the_first_then_a_dead_holder_never_blocks(tmp_path):
    first = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(DirectoryBusy) as refused:
            DirectoryLock(str(tmp_path)).acquire()
        message = str(refused.value)
        assert f"pid {first.pid} on {socket.gethostname()}" in message and str(tmp_path) in message
        assert lock_holder(str(tmp_path)).startswith(f"pid {first.pid} on ")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert os.path.exists(tmp_path / LOCK_NAME)  # the killed holder's note stays behind...
    assert lock_holder(str(tmp_path)) is None  # ...but holds nothing
    lock = DirectoryLock(str(tmp_path)).acquire()
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_NAME).read_text()
    lock.release()
    assert not os.path.exists(tmp_path / LOCK_NAME)  # a clean exit leaves the directory as it was


def test_release_then_acquire_again(tmp_path):
    DirectoryLock(str(tmp_path)).acquire().release()
    lock = DirectoryLock(str(tmp_path)).acquire()
    assert lock.fd is not None
    lock.release()
    assert lock_holder(str(tmp_path)) is None
