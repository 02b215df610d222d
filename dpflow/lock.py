"""One run per checkpoint directory: an `fcntl` lock on a file in it, held by rank 0.

Two runs writing one directory prune each other's checkpoints, and a `--resume` would pick
up the other run's parameters. Rank 0 takes the lock at start-up and holds it for the whole
run; the kernel releases it when the process ends, however it ends, so a lock left by a
dead run never blocks a resume (a file named `.lock` may remain: its content is only a
note of who held it). The lock is a POSIX record lock (`lockf`), which network filesystems
such as NFS pass between nodes; there a dead node's lock lasts until its lease ends.
"""

import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".lock"


class DirectoryBusy(Exception):
    """Another live process holds the directory's lock."""

    def __init__(self, directory, holder):
        super().__init__(
            f"{directory} is in use by another run ({holder}); wait for it to end "
            "or stop it, or give this run another directory")
        self.holder = holder


def describe(note):
    try:
        info = json.loads(note)
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no note of itself"


class DirectoryLock:
    """Held from `acquire()` until `release()` or the end of the process."""

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd = None

    def acquire(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                note = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                raise DirectoryBusy(self.directory, describe(note)) from None
            # The previous holder may have removed the file between our open and our lock:
            # then we hold a lock on a name nobody else can find. Try again on the new file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode() + b"\n", 0)
        self.fd = fd
        return self

    def release(self):
        """Remove the file, then drop the lock: a clean exit leaves the directory as it was."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing releases the lock
        self.fd = None


def lock_holder(directory):
    """Who holds the directory now ('pid N on HOST, since ...'), or None. For another process
    than the holder: a POSIX lock is dropped when its process closes any descriptor of the
    file, so the holder itself must never call this."""
    path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return describe(os.pread(fd, 4096, 0).decode(errors="replace"))
    finally:
        os.close(fd)
    return None
