"""Predictions from a checkpoint: `load_model(checkpoint)` and what `dpflow predict` runs.

The checkpoint records the model's SPEC, the builder's arguments, the data's example shape
and class count; the model is rebuilt from them and its parameters and state filled in. The
examples are normalised as the training batches were (the checkpoint keeps the transform).
One process does the work: a forward pass of a few thousand rows needs no data parallelism.
"""

import os

import numpy as np

from .checkpoint import READ_FIX, describe_model, load_checkpoint_source
from .errors import CheckpointError, UsageError
from .modelspec import build_model, spec_file

PREDICT_CHUNK = 4096  # rows per forward pass: bounds memory on large inputs


def rebuild_spec(model_meta, path):
    """The SPEC that rebuilds a checkpoint's model from here: a builder file is found where
    it was at training time (an absolute path) when its relative path does not resolve."""
    if "spec" not in model_meta and "sizes" in model_meta:
        return "mlp"  # a checkpoint older than model specs: always the MLP
    spec = model_meta.get("spec")
    if not spec:
        raise CheckpointError(
            f"the checkpoint {path} holds a model given to fit() in Python, which it cannot rebuild; "
            "build the same Model and pass it: load_model(checkpoint, model=...)")
    source = model_meta.get("source")
    if spec_file(spec) and not os.path.isfile(spec_file(spec)) and source and os.path.isfile(source):
        return f"{source}:{spec.rpartition(':')[2]}"
    return spec


def model_from_meta(model_meta, path):
    """Build the model a checkpoint's metadata describes (not yet filled)."""
    if "spec" not in model_meta and "sizes" in model_meta:
        sizes = model_meta["sizes"]
        return build_model("mlp", {"hidden": sizes[1:-1], "activation": model_meta.get("activation", "relu")},
                           (sizes[0],), sizes[-1], 0, model_meta.get("dtype", "float32"))
    return build_model(rebuild_spec(model_meta, path), model_meta.get("args") or {},
                       tuple(model_meta["input_shape"]), int(model_meta["n_classes"]), 0,
                       model_meta.get("dtype", "float32"))


def fill_model(model, arrays, path):
    """Copy the checkpoint's parameters and state into `model`'s arrays."""
    wanted = {f"param/{name}": param.value for name, param in model.params.items()}
    wanted.update({f"state/{name}": value for name, value in model.state().items()})
    for key, target in wanted.items():
        if key not in arrays or arrays[key].shape != target.shape:
            found = arrays[key].shape if key in arrays else "nothing"
            raise CheckpointError(f"the checkpoint {path} does not fit this model: {key} is {found}, "
                                  f"the model needs {target.shape}; build the model it was trained with")
        target[...] = arrays[key]


def load_model(checkpoint, model=None):
    """The model of `checkpoint` (a file, or a directory's newest valid one), trained
    parameters and state filled in, in evaluation mode: `model.predict(x)` gives logits
    without labels. Pass `model` to fill a Model built in Python instead of rebuilding it.
    The model's `normalizer` transforms raw examples as training did."""
    from .normalize import Normalizer

    if not os.path.exists(checkpoint):
        raise CheckpointError(f"{checkpoint}: no such checkpoint file or directory")
    path, arrays, meta = load_checkpoint_source(checkpoint, fix=READ_FIX)
    model_meta = meta.get("model", {})
    if model is None:
        model = model_from_meta(model_meta, path)
    fill_model(model, arrays, path)
    model.eval()
    model.checkpoint = path
    model.description = describe_model(model_meta)
    model.input_shape = tuple(model_meta.get("input_shape") or model_meta["sizes"][:1])
    model.n_classes = int(model_meta.get("n_classes") or model_meta["sizes"][-1])
    model.dtype = np.dtype(model_meta.get("dtype", "float32"))
    state = meta.get("normalizer")
    model.normalizer = Normalizer.from_state(state) if state else Normalizer()
    return model


def read_examples(path, input_shape):
    """Examples from a .npy, a .npz (x_test, x, or its only array) or an IDX file, shaped
    (rows, *input_shape): rows of pixels and images convert into each other."""
    from .idx import read_idx
    from .run import UNREADABLE

    if not os.path.isfile(path):
        raise UsageError(f"--input {path}: no such file")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                names = [name for name in ("x_test", "x", "inputs") if name in archive.files]
                if not names and len(archive.files) != 1:
                    raise UsageError(f"--input {path} holds {archive.files}; give one array, or name it x")
                x = archive[names[0] if names else archive.files[0]]
        elif path.endswith(".npy"):
            x = np.load(path, allow_pickle=False)
        else:
            x = read_idx(path)
    except UsageError:
        raise
    except UNREADABLE as error:
        raise UsageError(f"--input {path} cannot be read ({type(error).__name__}: {error}); give a .npy, .npz "
                         "or IDX file") from None
    if x.dtype.kind not in "fiu":
        raise UsageError(f"--input {path} holds {x.dtype} values; give numbers")
    per_example = int(np.prod(input_shape))
    if x.ndim < 1 or (x.ndim == len(input_shape) and x.size == per_example):
        x = x.reshape(1, *x.shape)  # a single example
    if int(np.prod(x.shape[1:])) != per_example:
        raise UsageError(f"--input {path} holds examples of shape {x.shape[1:]}; the model takes "
                         f"{tuple(input_shape)} ({per_example} values each)")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise UsageError(f"--input {path} holds {np.count_nonzero(~np.isfinite(x))} NaN or infinite values")
    return x.reshape(len(x), *input_shape)


def predict(model, x, probabilities=False):
    """Class indices (or softmax probabilities) for the raw examples `x`, normalised as in
    training, from a model `load_model` gave."""
    dtype = model.dtype
    outputs = [np.zeros((0, model.n_classes), dtype) if probabilities else np.zeros(0, np.int64)]
    for start in range(0, len(x), PREDICT_CHUNK):
        batch = np.array(x[start:start + PREDICT_CHUNK], dtype=dtype)  # a copy: normalised in place
        logits = model.predict(model.normalizer(batch))
        if probabilities:
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            outputs.append(shifted / shifted.sum(axis=1, keepdims=True))
        else:
            outputs.append(logits.argmax(axis=1))
    return np.concatenate(outputs)
