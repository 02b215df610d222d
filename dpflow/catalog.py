"""Datasets known by name (`--dataset fashion-mnist`, `--dataset mnist`): where to find their
files on this machine, and what to tell a user who has not got them. Nothing is downloaded.

A name is looked up in `$DPFLOW_DATA/<name>/`, then in the directories Debian's dataset
packages install into (`/usr/share/datasets/<name>/`; `DPFLOW_SYSTEM_DATA` replaces that
list, colon-separated, and an empty value hides it, as the tests do).
"""

import os

from .errors import DataError

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SYSTEM_DATA = "/usr/share/datasets"

# name -> the Debian package that installs it under SYSTEM_DATA/<name>, if there is one.
NAMED = {
    "fashion-mnist": "dataset-fashion-mnist",
    "mnist": None,  # Debian packages no MNIST: a directory of the four IDX files is needed
}


def search_paths(name):
    paths = []
    if os.environ.get("DPFLOW_DATA"):
        paths.append(os.path.join(os.environ["DPFLOW_DATA"], name))
    system = os.environ.get("DPFLOW_SYSTEM_DATA", SYSTEM_DATA)
    paths += [os.path.join(root, name) for root in system.split(":") if root]
    return paths


def locate(name):
    """The first searched directory that holds the dataset's files."""
    for path in search_paths(name):
        if os.path.isdir(path) and os.listdir(path):
            return path
    tried = search_paths(name)
    where = ", ".join(tried) if tried else "nowhere (DPFLOW_DATA is unset and DPFLOW_SYSTEM_DATA is empty)"
    package = NAMED[name]
    install = f"install it with `apt-get install {package}`, or " if package else ""
    unset = "" if os.environ.get("DPFLOW_DATA") or not tried else " (DPFLOW_DATA is not set)"
    raise DataError(
        f"`dataset` {name}: not found; looked in {where}{unset}. To get it, {install}put the four "
        f"IDX files ({', '.join(IDX_FILES)}; each may be .gz) in a directory DIR/{name}/ and set "
        f"DPFLOW_DATA=DIR, or pass `dataset` DIR/{name} itself. dpflow downloads nothing."
    )
