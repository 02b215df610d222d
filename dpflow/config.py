"""The training configuration: defaults with their reasons, TOML files, and validation.

Every check here is a pure function of the flags and the file. A config file may still
differ between nodes, so the CLI shares each rank's verdict (`agree`) and then compares the
resolved settings of all ranks (`check_same_on_every_rank`).
"""

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field

from .errors import UsageError


@dataclass
class TrainConfig:
    # Data
    dataset: str = "digits"  # the bundled UCI digits: real data, trains in seconds
    samples: int = 4000  # synthetic/spirals only
    features: int = 20  # synthetic only
    classes: int = 4  # synthetic/spirals only
    # Model
    hidden: list = field(default_factory=lambda: [128, 64])  # reaches >= 97% on digits
    activation: str = "relu"
    # Optimisation
    epochs: int = 20
    batch_size: int = 64  # the GLOBAL batch, split across ranks
    lr: float = 0.05
    optimizer: str = "momentum"  # plain SGD needs several times more epochs on digits
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_scaling: str = "none"  # "linear": lr * batch_size / base_batch_size (Goyal et al.)
    base_batch_size: int = 64
    warmup_epochs: float = 0.0  # linear warmup, needed when linear scaling makes lr large
    accumulate: int = 1  # micro-batches summed before each allreduce and update
    dtype: str = "float32"  # float64 for bitwise-reproducibility studies
    seed: int = 0
    # Checkpoints and output
    checkpoint_dir: str = ""  # "" means no periodic checkpoints
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 3
    resume: bool = False
    metrics: str = ""  # JSON lines path; "" for none
    log_every: int = 0  # steps between extra metrics records; 0 for per epoch only
    save: str = ""  # final parameters as .npz
    trace: str = ""  # Chrome trace JSON of every rank's phases; "" for none (costs < 1% of a step)
    quiet: bool = False
    progress: str = "auto"  # "bar" on a terminal, "plain" lines otherwise
    # Safety
    consistency_every: int = 50  # steps between cross-rank parameter checksums; 0 disables
    stall_timeout: float = 300.0  # seconds without progress before the job is aborted; 0 disables
    on_nonfinite: str = "stop"  # or "skip" the step
    # Communication
    reducer: str = "flat"  # one fused allreduce; "naive": one per parameter (the reference)
    bucket_mb: float = 0.0  # >0: overlap allreduces of buckets this big with backward; see BENCHMARKS.md


CHOICES = {
    "activation": ("relu", "tanh", "sigmoid"),
    "optimizer": ("sgd", "momentum", "adam"),
    "lr_scaling": ("none", "linear"),
    "dtype": ("float32", "float64"),
    "progress": ("auto", "bar", "plain"),
    "on_nonfinite": ("stop", "skip"),
    "reducer": ("flat", "naive"),
}
POSITIVE = ("epochs", "batch_size", "lr", "base_batch_size", "accumulate", "checkpoint_every",
            "keep_checkpoints", "samples", "features")
NON_NEGATIVE = ("momentum", "weight_decay", "warmup_epochs", "log_every", "consistency_every",
                "stall_timeout", "bucket_mb")
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag(name):
    return "--" + name.replace("_", "-")


def parse_hidden(value):
    """`128,64` or [128, 64] -> [128, 64]; `""` or [] -> no hidden layer."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        sizes = [int(part) for part in parts]
    except (TypeError, ValueError):
        raise UsageError(f"--hidden must be comma-separated integers like 128,64, got {value!r}") from None
    if any(size <= 0 for size in sizes):
        raise UsageError(f"--hidden sizes must be positive, got {value!r}")
    return sizes


def coerce(name, value):
    """Convert a TOML or flag value to the field's type, or say what was expected."""
    default = FIELDS[name].default if FIELDS[name].default is not dataclasses.MISSING else None
    if name == "hidden":
        return parse_hidden(value)
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{name} must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UsageError(f"{flag(name)} must be a number, got {value!r}")
        try:
            number = kind(value) if not (kind is int and isinstance(value, float)) else value
        except ValueError:
            raise UsageError(f"{flag(name)} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if kind is int and (isinstance(number, float) and not number.is_integer()):
            raise UsageError(f"{flag(name)} must be an integer, got {value!r}")
        return kind(number)
    if not isinstance(value, str):
        raise UsageError(f"{flag(name)} must be a string, got {value!r}")
    return value


def load_toml(path):
    """The keys of a TOML config file (flag names with - or _; an optional [train] table)."""
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file; check the path") from None
    except OSError as error:
        raise UsageError(f"--config {path}: cannot read it ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config {path} is not valid TOML: {error}") from None
    if set(table) == {"train"} and isinstance(table["train"], dict):
        table = table["train"]
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            close = [other for other in FIELDS if other.startswith(name[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(
                f"--config {path}: unknown key {key!r}{hint}; valid keys are the `dpflow train` "
                "flag names without the leading dashes"
            )
        values[name] = coerce(name, value)
    return values


def build_config(file_values, flag_values):
    """Defaults, overridden by the config file, overridden by flags; then validated."""
    config = TrainConfig(**{**file_values, **flag_values})
    validate(config)
    return config


def validate(config):
    for name, allowed in CHOICES.items():
        value = getattr(config, name)
        if value not in allowed:
            raise UsageError(f"{flag(name)} must be one of {', '.join(allowed)}, got {value!r}")
    for name in POSITIVE + NON_NEGATIVE:
        value = getattr(config, name)
        if not math.isfinite(value):
            raise UsageError(f"{flag(name)} must be a finite number, got {value!r}")
    for name in POSITIVE:
        value = getattr(config, name)
        if not value > 0:
            raise UsageError(f"{flag(name)} must be > 0, got {value!r}")
    for name in NON_NEGATIVE:
        value = getattr(config, name)
        if not value >= 0:
            raise UsageError(f"{flag(name)} must be >= 0, got {value!r}")
    if config.momentum >= 1:
        raise UsageError(f"--momentum must be below 1 (0.9 is usual), got {config.momentum}")
    if config.classes < 2:
        raise UsageError(f"--classes must be >= 2, got {config.classes}")
    if config.resume and not config.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir DIR, the directory to resume from")


def config_dict(config):
    return dataclasses.asdict(config)
