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
from .optim import EXCLUDE_FROM_ADAPTATION, OPTIMIZERS
from .schedule import SCALINGS, SCHEDULES, scaled_lr


@dataclass
class TrainConfig:
    # Data
    dataset: str = "digits"  # the bundled UCI digits: real data, trains in seconds
    samples: int = 4000  # synthetic/spirals only
    features: int = 20  # synthetic only
    classes: int = 0  # 0: max label + 1 (synthetic/spirals make 4); more only for classes absent from the data
    normalize: str = "auto"  # images scaled to [0, 1] as torchvision's ToTensor does; rows of features untouched
    validation_split: float = 0.0  # fraction of the training rows held out, the same rows on every rank
    # Model
    model: str = "mlp"  # a built-in (mlp, cnn), path/to/file.py:function or package.module:function
    model_args: dict = field(default_factory=dict)  # keyword arguments of the model's builder
    hidden: list = field(default_factory=lambda: [128, 64])  # mlp only; reaches >= 97% on digits
    activation: str = "relu"  # mlp only
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
    lr_schedule: str = "constant"  # after warmup; cosine and poly reach min_lr at the last epoch
    lr_decay_epochs: list = field(default_factory=list)  # step: e.g. [30, 60] (Goyal et al.: 30, 60, 80)
    lr_decay_factor: float = 0.1  # step: the lr is multiplied by this at each decay epoch
    lr_power: float = 2.0  # poly: (1 - progress) ** power, 2 as in You et al.'s LARS runs
    min_lr: float = 0.0  # the floor of every decay
    trust_coefficient: float = None  # lars/lamb; None: each paper's, 0.001 for LARS, 1 for LAMB
    exclude_from_adaptation: str = EXCLUDE_FROM_ADAPTATION  # lars/lamb: plain steps, no decay
    noise_scale: str = "auto"  # auto: measured when it is free, i.e. two batch sizes exist
    accumulate: int = 1  # micro-batches summed before each allreduce and update
    dtype: str = "float32"  # float64 for bitwise-reproducibility studies
    seed: int = 0
    # Checkpoints and output
    checkpoint_dir: str = ""  # "" means no periodic checkpoints
    checkpoint_every: int = 1  # epochs
    checkpoint_every_steps: int = 0  # also every N steps; 0: off
    checkpoint_every_seconds: float = 0.0  # also when this long has passed (rank 0's clock); 0: off
    keep_checkpoints: int = 3
    keep_best: str = ""  # also keep best.dpf, the best epoch by this metric (never pruned); "" off
    early_stop: int = 0  # stop when the watched metric has not improved for this many epochs; 0 off
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
    "optimizer": OPTIMIZERS,
    "lr_scaling": SCALINGS,
    "lr_schedule": SCHEDULES,
    "noise_scale": ("auto", "on", "off"),
    "dtype": ("float32", "float64"),
    "progress": ("auto", "bar", "plain"),
    "on_nonfinite": ("stop", "skip"),
    "reducer": ("flat", "naive"),
    "normalize": ("auto", "none", "scale", "standardize"),
    "keep_best": ("", "val_accuracy", "val_loss", "test_accuracy", "test_loss"),
}
POSITIVE = ("epochs", "batch_size", "lr", "base_batch_size", "accumulate", "checkpoint_every",
            "keep_checkpoints", "samples", "features")
# Counts beyond this are typing mistakes, and would overflow the arrays they size.
MAX_COUNT = 2**31 - 1
NON_NEGATIVE = ("seed", "momentum", "weight_decay", "warmup_epochs", "log_every", "consistency_every",
                "checkpoint_every_steps", "checkpoint_every_seconds",
                "stall_timeout", "bucket_mb", "min_lr", "classes", "validation_split", "early_stop")
# Settings whose default is None ("not set"): the type a given value must have.
OPTIONAL_TYPES = {"trust_coefficient": float}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag(name):
    if name == "model_args":  # one argument per flag: --model-arg KEY=VALUE
        return "--model-arg"
    return "--" + name.replace("_", "-")


def split_list(value):
    """`a,b` or [a, b] or a single value -> a list of the parts ('' and [] -> [])."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def parse_hidden(value):
    """`128,64` or [128, 64] -> [128, 64]; `""` or [] -> no hidden layer."""
    try:
        sizes = [int(part) for part in split_list(value)]
    except (TypeError, ValueError):
        raise UsageError(f"--hidden must be comma-separated integers like 128,64, got {value!r}") from None
    if any(size <= 0 for size in sizes):
        raise UsageError(f"--hidden sizes must be positive, got {value!r}")
    return sizes


def parse_epochs(value):
    """`30,60` or [30, 60] -> [30.0, 60.0] (fractional epochs allowed)."""
    parts = split_list(value)
    try:
        if any(isinstance(part, bool) for part in parts):
            raise ValueError
        return [float(part) for part in parts]
    except (TypeError, ValueError):
        raise UsageError(f"--lr-decay-epochs must be comma-separated epochs like 30,60, got {value!r}") from None


def coerce(name, value):
    """Convert a TOML or flag value to the field's type, or say what was expected."""
    default = FIELDS[name].default if FIELDS[name].default is not dataclasses.MISSING else None
    if name == "hidden":
        return parse_hidden(value)
    if name == "lr_decay_epochs":
        return parse_epochs(value)
    if name == "model_args":
        if not isinstance(value, dict):
            raise UsageError(f"the model's arguments must be a table of KEY = VALUE, got {value!r}")
        return dict(value)
    kind = OPTIONAL_TYPES.get(name, type(default))
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


MAX_TEXT_FILE = 1 << 20  # a config file or hostfile larger than this is not one


def read_text_file(path, what, limit=MAX_TEXT_FILE):
    """The text of a small UTF-8 file a user names (`what` is how they named it, e.g.
    `--config c.toml`): a device, a FIFO, a huge or binary file is refused, never read."""
    import os
    import stat

    try:
        # Checked before opening: opening a FIFO waits for a writer, forever.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UsageError(f"{what} is not a regular file; give the path of a text file")
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if info.st_size > limit:
                raise UsageError(f"{what} is {info.st_size:,} bytes, more than a text file of "
                                 f"settings can be ({limit:,}); check the path")
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise UsageError(f"{what}: no such file; check the path") from None
    except OSError as error:
        raise UsageError(f"{what}: cannot read it ({error.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{what} is not UTF-8 text (byte {error.start}); give a text file") from None


def load_toml(path):
    """The keys of a TOML config file (flag names with - or _; an optional [train] table)."""
    text = read_text_file(path, f"--config {path}")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config {path} is not valid TOML: {error}") from None
    if set(table) == {"train"} and isinstance(table["train"], dict):
        table = table["train"]
    values = {}
    if isinstance(table.get("model"), dict):  # [model]: the builder's arguments, and its spec
        arguments = dict(table.pop("model"))
        if "spec" in arguments:
            table["model"] = arguments.pop("spec")
        table["model_args"] = arguments
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
        if isinstance(value, float) and not math.isfinite(value):  # (an int is finite, however long)
            raise UsageError(f"{flag(name)} must be a finite number, got {value!r}")
    for name in POSITIVE:
        value = getattr(config, name)
        if not value > 0:
            raise UsageError(f"{flag(name)} must be > 0, got {value!r}")
    for name, spec in FIELDS.items():
        value = getattr(config, name)
        if spec.type in (int, "int") and not isinstance(value, bool) and isinstance(value, int) and value > MAX_COUNT:
            raise UsageError(f"{flag(name)} must be at most {MAX_COUNT}, got {value}")
    if any(size > MAX_COUNT for size in config.hidden):
        raise UsageError(f"--hidden sizes must be at most {MAX_COUNT}, got {config.hidden}")
    for name in NON_NEGATIVE:
        value = getattr(config, name)
        if not value >= 0:
            raise UsageError(f"{flag(name)} must be >= 0, got {value!r}")
    if config.momentum >= 1:
        raise UsageError(f"--momentum must be below 1 (0.9 is usual), got {config.momentum}")
    if config.classes == 1:
        raise UsageError("--classes must be 0 (count them from the labels) or >= 2, got 1")
    if config.validation_split >= 1:
        raise UsageError(f"--validation-split is the fraction of training rows held out, in [0, 1) "
                         f"(0.1 is usual), got {config.validation_split}")
    watched = early_stop_metric(config)
    if watched.startswith("val_") and not config.validation_split:
        used = f"--keep-best {config.keep_best}" if config.keep_best else f"--early-stop {config.early_stop} (it watches val_loss)"
        raise UsageError(f"{used} needs validation rows: add --validation-split 0.1, or watch a test metric "
                         "with --keep-best test_loss")
    if config.keep_best and not config.checkpoint_dir:
        raise UsageError(f"--keep-best {config.keep_best} needs --checkpoint-dir DIR, where best.dpf is written")
    if config.resume and not config.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir DIR, the directory to resume from")
    validate_schedule(config)
    validate_layerwise(config)


def validate_schedule(config):
    """The decay settings must describe a schedule that decays, inside the run."""
    if not (math.isfinite(config.lr_decay_factor) and 0 < config.lr_decay_factor <= 1):
        raise UsageError(f"--lr-decay-factor must be in (0, 1] (0.1 is usual), got {config.lr_decay_factor!r}")
    if not (math.isfinite(config.lr_power) and config.lr_power > 0):
        raise UsageError(f"--lr-power must be > 0 (2 is usual), got {config.lr_power!r}")
    peak = scaled_lr(config.lr, config.lr_scaling, config.batch_size * config.accumulate, config.base_batch_size)
    if config.lr_schedule != "constant" and config.min_lr >= peak:
        raise UsageError(f"--min-lr {config.min_lr:g} must be below the lr after scaling ({peak:g}); "
                         "lower it or raise --lr")
    epochs = config.lr_decay_epochs
    if config.lr_schedule != "step":
        if epochs:
            raise UsageError(f"--lr-decay-epochs applies to --lr-schedule step only (now {config.lr_schedule}); "
                             "add --lr-schedule step or drop --lr-decay-epochs")
        return
    if not epochs:
        raise UsageError("--lr-schedule step needs --lr-decay-epochs, the epochs where the lr drops, e.g. 30,60")
    if any(not math.isfinite(e) for e in epochs) or any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise UsageError(f"--lr-decay-epochs must increase, e.g. 30,60, got {','.join(f'{e:g}' for e in epochs)}")
    if epochs[0] <= config.warmup_epochs or epochs[-1] >= config.epochs:
        raise UsageError(
            f"--lr-decay-epochs {','.join(f'{e:g}' for e in epochs)} must lie after the warmup "
            f"({config.warmup_epochs:g} epochs) and before the end ({config.epochs} epochs)"
        )


def validate_layerwise(config):
    """LARS and LAMB settings: a positive trust coefficient, for those optimizers only."""
    eta = config.trust_coefficient
    if eta is None:
        return
    if config.optimizer not in ("lars", "lamb"):
        raise UsageError(f"--trust-coefficient applies to --optimizer lars or lamb, not {config.optimizer}")
    if not (math.isfinite(eta) and eta > 0):
        raise UsageError(f"--trust-coefficient must be > 0 (0.001 is LARS's, 1 LAMB's), got {eta!r}")


def early_stop_metric(config):
    """The metric that --keep-best and --early-stop watch: --keep-best's, else val_loss."""
    return config.keep_best or ("val_loss" if config.early_stop else "")


def config_dict(config):
    return dataclasses.asdict(config)
