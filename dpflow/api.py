"""`dpflow.fit`: the whole trainer for a script of one's own, run as `mpirun -n 4 python my_script.py`.

    model = build(input_shape=(64,), n_classes=10, rng=np.random.default_rng(0), dtype=np.float32)
    history = dpflow.fit(model, "digits", epochs=5, checkpoint_dir="ckpt")

The settings are `dpflow train`'s, by their Python names (`batch_size=64`, `lr=0.02`, ...),
and so are the safety nets: an exception on one rank ends every rank at once, the watchdog
ends a job whose steps stopped, SIGINT/SIGTERM stop every rank at the same step with a
checkpoint, and the model is checked against the data and across ranks before training.
Errors every rank agrees on (bad settings, bad data, a diverged run) are raised on every
rank, so the script may catch them; anything else aborts the job, so it never hangs.
"""

from .errors import DpflowError, UsageError


def fit(model, dataset="digits", **settings):
    """Train `model` (a Model, or a builder function(input_shape, n_classes, rng, dtype,
    **model_args), or a SPEC such as "cnn") on `dataset` (a name or path as for `dpflow
    train --dataset`, or a `dpflow.data.Dataset`) with `dpflow train`'s settings. Every rank
    must call it. Returns the per-epoch history; the Model's parameters are the trained ones."""
    from .run import train
    from .comm import create_communicator
    from .config import FIELDS, build_config, coerce
    from .failure import SafetyNet, crash

    comm = create_communicator()
    try:
        with SafetyNet(comm) as safety:
            unknown = sorted(set(settings) - set(FIELDS) - {"model", "dataset"})
            if unknown:
                raise UsageError(f"fit() got unknown settings {', '.join(unknown)}; the settings are "
                                 f"`dpflow train`'s flags in Python spelling: {', '.join(FIELDS)}")
            values = {name: coerce(name, value) for name, value in settings.items()}
            data = None
            if isinstance(dataset, str):
                values["dataset"] = dataset
            else:
                data, values["dataset"] = dataset, getattr(dataset, "name", "arrays")
            instance = None
            if isinstance(model, str):
                values["model"] = model
            elif callable(model) and not hasattr(model, "graph"):
                # Called directly, never re-imported here; the SPEC lets checkpoints rebuild it
                # (a script should keep its training under `if __name__ == "__main__":`).
                values["model"], instance = builder_spec(model), model
            else:
                values["model"] = ""  # a Model object: there is no SPEC that rebuilds it
                instance = model
            config = build_config({}, values)
            trainer, _ = train(config, comm, safety, data=data, model=instance)
            return trainer.history
    except DpflowError as error:
        if error.agreed:
            raise  # every rank raises it together: the script may handle it
        crash(comm, error)
        raise
    except BaseException as error:  # noqa: BLE001 - one rank's failure must end every rank
        if isinstance(error, KeyboardInterrupt) or comm.size == 1:
            raise  # (a sys.exit() in the model's code, on one rank, ends every rank below)
        crash(comm, error)
        raise


def builder_spec(function):
    """`path/to/file.py:name` for a builder defined at the top of a file, so that checkpoints
    can rebuild its model (`dpflow eval`, `predict`, `load_model`)."""
    import inspect

    path = inspect.getsourcefile(function)
    name = getattr(function, "__name__", "")
    if not path or not name.isidentifier() or getattr(inspect.getmodule(function), name, None) is not function:
        raise UsageError(f"fit() was given {function!r}; give a builder defined at the top level of "
                         "a file, a Model, or a SPEC string")
    return f"{path}:{name}"

