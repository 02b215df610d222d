"""Ranks that agree: every rank computes a value, compares it with rank 0's, and all of them
name the rank that differs.

A config file, a dataset copy or a checkpoint may differ between nodes; a rank that went its
own way would hang the job in the next collective or train on other rows. Each check here
is collective and ends on every rank together, with the same message.
"""

from .errors import UsageError


def ranks_that_differ(comm, value):
    """(rank 0's value, {rank: its value} for every rank whose value differs). Collective;
    pickles, so for start-up and periodic checks, not for every step."""
    values = comm.allgather_object(value)
    return values[0], {rank: other for rank, other in enumerate(values) if other != values[0]}


def agree(comm, action):
    """Run `action` on every rank; if it fails with bad input anywhere, fail everywhere.

    A file may exist on one node and not another: each rank's own verdict is shared, so all
    ranks stop together with the same message instead of some waiting forever. Collective.
    """
    try:
        result, verdict = action(), None
    except UsageError as error:
        result, verdict = None, (type(error), str(error))
    root, differ = ranks_that_differ(comm, verdict)
    if root is None and not differ:
        return result
    rank = 0 if root is not None else min(differ)
    kind, message = root if root is not None else differ[rank]
    raise kind(message if rank == 0 else f"on rank {rank}: {message}")


def run_summary(config_values, data):
    """What every rank must share to train the same run: the resolved settings and the
    dataset's identity (a checksum of its labels, and its shapes)."""
    from .data import fingerprint

    return {**config_values, "dataset (labels checksum/rows/features/classes)": fingerprint(data)}


def check_same_run(comm, config_values, data):
    """Every rank must train the same run (a stale config file or dataset copy on one node
    would otherwise hang the job, or train on rows shuffled differently). Collective."""
    summary = run_summary(config_values, data)
    root, differ = ranks_that_differ(comm, summary)
    if differ:
        rank = min(differ)
        other = differ[rank]
        named = [f"`{key}`" if key in config_values else key for key in summary]
        described = [f"{name} {other[key]!r} (rank 0: {root[key]!r})"
                     for name, key in zip(named, summary) if other[key] != root[key]]
        raise UsageError(
            f"rank {rank} was given a different run: {'; '.join(described[:3])}; every rank needs "
            "the same flags, config file and dataset")


def check_same_model(comm, spec, model):
    """Every rank must build the same graph: the same layers in the same order, the same
    parameter names and shapes. A builder that reads the rank, the host or its own random
    state would otherwise train N different models. Collective."""
    from .modelspec import describe

    root, differ = ranks_that_differ(comm, describe(model))
    if differ:
        rank = min(differ)
        other = differ[rank]
        parts = [f"{part}: {other[part]!r:.200} (rank 0: {root[part]!r:.200})" for part in root
                 if other[part] != root[part]]
        raise UsageError(
            f"`model` {spec or '(given in Python)'} builds a different graph on rank {rank} than on rank 0 "
            f"({'; '.join(parts[:2])}); the builder must depend only on its arguments (use the `rng` "
            "it is given, never the rank or a global random state)")
