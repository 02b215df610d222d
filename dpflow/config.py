"""The training settings, each defined once: default (and why), help, valid values.

`TrainConfig`'s fields are the one table of options. The command line's flags, the TOML
config file's keys, `--help`, the README's table of flags and `dpflow bench`'s flags all
derive from it; choices come from the registries of the modules that implement them.

To add a setting, add one field with `option(...)` below (and read it where it acts).

Every check here is a pure function of the flags and the file. A config file may still
differ between nodes, so the CLI shares each rank's verdict and then compares the resolved
settings of all ranks (see `agreement`).
"""

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field

from .errors import UsageError, spell_settings
from .optim import EXCLUDE_FROM_ADAPTATION, OPTIMIZERS
from .schedule import SCALINGS, SCHEDULES, scaled_lr


def option(default, help, *, choices=None, above=None, at_least=None, below=None, at_most=None,
           hint="", parse=None, metavar=None):
    """A setting's default and its description: `help` (text, or a function returning it;
    setting names in backquotes become flags on the command line), `choices` (a tuple, or a
    function returning the registry's names; "" among them means "off"), bounds (`above` <
    value, `at_least` <= value, value < `below`, value <= `at_most`; a None value, "not
    set", is not checked) with a `hint` for their messages, `parse` (a function from the
    flag's string or the TOML value; by default the field's type) and the flag's `metavar`."""
    metadata = dict(help=help, choices=choices, above=above, at_least=at_least, below=below,
                    at_most=at_most, hint=hint, parse=parse, metavar=metavar)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


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
        raise UsageError(f"`hidden` must be comma-separated integers like 128,64, got {value!r}") from None
    if any(size <= 0 for size in sizes):
        raise UsageError(f"`hidden` sizes must be positive, got {value!r}")
    return sizes


def parse_epochs(value):
    """`30,60` or [30, 60] -> [30.0, 60.0] (fractional epochs allowed)."""
    parts = split_list(value)
    try:
        if any(isinstance(part, bool) for part in parts):
            raise ValueError
        return [float(part) for part in parts]
    except (TypeError, ValueError):
        raise UsageError(f"`lr_decay_epochs` must be comma-separated epochs like 30,60, got {value!r}") from None


def parse_model_args(value):
    """A table {key: value} (TOML's [model], or fit()'s dict) or the flags' ["KEY=VALUE", ...]."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        from .modelspec import parse_model_args as parse_items

        return parse_items(value)
    raise UsageError(f"`model_args`, the model's arguments, must be a table of KEY = VALUE, got {value!r}")


def dataset_help():
    from .catalog import NAMED
    from .data import BUILTIN

    return (f"{BUILTIN[0]} (bundled UCI handwritten digits: real data, trains in seconds), "
            f"{', '.join(BUILTIN[1:])} (sized by `samples`, `features`, `classes`), "
            f"{' or '.join(NAMED)} (found in $DPFLOW_DATA/NAME or where Debian's dataset packages "
            "put them), a .npz with x_train/y_train/x_test/y_test, or a directory of .npy or MNIST IDX files")


def model_help():
    from .zoo import BUILDERS

    return (f"{', '.join(BUILDERS)}, or a builder of your own: path/to/file.py:function or "
            "package.module:function, called as function(input_shape, n_classes, rng, dtype, **args)")


def normalize_kinds():
    from .normalize import KINDS

    return KINDS


def activations():
    from .model import ACTIVATIONS

    return tuple(ACTIVATIONS)


def best_metrics():
    from .trainer import BEST_METRICS

    return ("", *BEST_METRICS)  # "": off


# Counts beyond this are typing mistakes, and would overflow the arrays they size.
MAX_COUNT = 2**31 - 1


@dataclass
class TrainConfig:
    # Data
    dataset: str = option("digits", dataset_help, metavar="NAME|PATH")
    samples: int = option(4000, "rows of the spirals/synthetic dataset", above=0)
    features: int = option(20, "features of the synthetic dataset", above=0)
    classes: int = option(  # 0: max label + 1 (synthetic/spirals make 4)
        0, "class count: spirals/synthetic make this many (default 4); for other data 0 (default) "
        "counts max label + 1, more allows classes absent from the labels", at_least=0)
    normalize: str = option(  # images scaled to [0, 1] as torchvision's ToTensor does; rows untouched
        "auto", "auto: scale images to [0, 1], leave rows of features; scale: divide by the largest "
        "|x|; standardize: training-set mean and std per channel (images) or per feature; none",
        choices=normalize_kinds)
    validation_split: float = option(  # off: the test set is the held-out data unless asked
        0.0, "fraction of the training rows held out for validation, the same rows on every rank "
        "(from `seed`); 0 off", at_least=0, below=1,
        hint="the fraction of training rows held out, in [0, 1); 0.1 is usual")
    # Model
    model: str = option("mlp", model_help, metavar="SPEC")
    model_args: dict = option(  # the builder's own defaults unless given
        {}, "a keyword argument of the model's builder, e.g. dropout=0.25 or channels=[16,32]; "
        "repeatable; a [model] table in the config file",
        parse=parse_model_args, metavar="KEY=VALUE")
    hidden: list = option(  # >= 97% on digits, >= 88% on Fashion-MNIST with the lr below
        [256, 128], "mlp: hidden layer sizes, comma-separated; '' for none", parse=parse_hidden)
    activation: str = option("relu", "mlp: hidden activation", choices=activations)
    # Optimisation
    epochs: int = option(20, "passes over the training set", above=0)
    batch_size: int = option(64, "GLOBAL batch, split across ranks", above=0)
    # With momentum 0.9 and the 256-128 mlp, Fashion-MNIST's 20 epochs ended at 88.62% with
    # 0.02 and at 88.18% with 0.05 (whose epochs swung by up to a point).
    lr: float = option(
        0.02, "learning rate before scaling", above=0)
    optimizer: str = option(  # plain SGD needs several times more epochs on digits
        "momentum", "update rule", choices=lambda: OPTIMIZERS)
    momentum: float = option(0.9, "momentum coefficient (`optimizer` momentum or lars)", at_least=0, below=1,
                             hint="0.9 is usual")
    weight_decay: float = option(0.0, "L2 penalty added to the gradient", at_least=0)
    lr_scaling: str = option(  # Goyal et al.: the lr grows with the global batch
        "none", "linear: lr x global batch x `accumulate` / `base_batch_size` (Goyal et al.); "
        "sqrt: x the square root of that ratio (LAMB's rule)", choices=lambda: SCALINGS)
    base_batch_size: int = option(64, "the batch the lr was tuned for, with `lr_scaling` linear", above=0)
    warmup_epochs: float = option(  # needed when linear scaling makes the lr large
        0.0, "epochs of linear lr warmup, fractional allowed", at_least=0)
    lr_schedule: str = option(  # cosine and poly reach min_lr at the last epoch
        "constant", "after warmup: constant, cosine or poly decay to `min_lr` at the last epoch, "
        "or step: x `lr_decay_factor` at each of `lr_decay_epochs`", choices=lambda: SCHEDULES)
    lr_decay_epochs: list = option(  # Goyal et al.: 30, 60, 80
        [], "epochs where `lr_schedule` step multiplies the lr by `lr_decay_factor`, e.g. 30,60",
        parse=parse_epochs, metavar="EPOCHS")
    lr_decay_factor: float = option(0.1, "the step schedule's factor", above=0, at_most=1, hint="0.1 is usual")
    lr_power: float = option(  # 2 as in You et al.'s LARS runs
        2.0, "the poly schedule's power: lr x (1 - progress)^power", above=0, hint="2 is usual")
    min_lr: float = option(0.0, "the lr every decay ends at or stays above", at_least=0)
    trust_coefficient: float = option(  # None: each paper's own
        None, "lars/lamb: eta in eta x ||w|| / ||update|| (default 0.001 for lars, 1 for lamb)", above=0,
        hint="0.001 is LARS's, 1 LAMB's")
    exclude_from_adaptation: str = option(  # biases and normalisation, as in the papers
        EXCLUDE_FROM_ADAPTATION, "lars/lamb: comma-separated name patterns of the parameters that keep "
        "plain steps and no weight decay", metavar="PATTERNS")
    noise_scale: str = option(  # auto: measured when it is free, i.e. two batch sizes exist
        "auto", "measure the gradient noise scale per epoch (metrics key noise_scale); auto: when there "
        "are >= 2 ranks or micro-batches and no `bucket_mb`", choices=("auto", "on", "off"))
    accumulate: int = option(1, "micro-batches summed before each allreduce and update", above=0)
    dtype: str = option(  # float64 for bitwise-reproducibility studies
        "float32", "parameter and activation dtype", choices=("float32", "float64"))
    seed: int = option(0, "initialisation and shuffling seed", at_least=0)
    # Checkpoints and output
    checkpoint_dir: str = option("", "directory for checkpoints (none by default)", metavar="DIR")
    checkpoint_every: int = option(1, "epochs between checkpoints", above=0)
    checkpoint_every_steps: int = option(0, "also a checkpoint every N steps; 0 off", at_least=0)
    checkpoint_every_seconds: float = option(  # rank 0's clock decides, for every rank
        0.0, "also a checkpoint when this many seconds passed since the last one (a preempted run "
        "loses at most this much); 0 off", at_least=0)
    keep_checkpoints: int = option(3, "checkpoints kept in the directory", above=0)
    keep_best: str = option(
        "", "also keep DIR/best.dpf, the epoch best by this metric, never pruned (off by default)",
        choices=best_metrics)
    early_stop: int = option(
        0, "stop every rank after this many epochs without improvement of `keep_best`'s metric "
        "(val_loss without it); 0 off", at_least=0)
    resume: bool = option(False, "continue from the newest valid checkpoint in `checkpoint_dir`")
    metrics: str = option("", "write JSON lines of metrics to this file", metavar="PATH")
    log_every: int = option(0, "also log a metrics record every N steps (default: per epoch only)", at_least=0)
    save: str = option("", "write the final parameters to this .npz (one array per parameter name)",
                       metavar="PATH")
    trace: str = option(  # costs < 1% of a step when on, nothing when off
        "", "write a timeline of every rank's phases to this JSON file (Chrome trace format: open it "
        "in ui.perfetto.dev or chrome://tracing)", metavar="PATH")
    quiet: bool = option(False, "print nothing but warnings and errors")
    progress: str = option("auto", "bar (tqdm), plain lines, or auto: a bar on a terminal",
                           choices=("auto", "bar", "plain"))
    # Safety
    consistency_every: int = option(  # a checksum allgather: cheap every 50 steps
        50, "steps between checks that all ranks hold identical parameters; 0 off", at_least=0)
    stall_timeout: float = option(  # far above any step or checkpoint write seen here
        300.0, "abort the job when no step finishes for this many seconds (a dead rank, a cut link); 0 off",
        at_least=0)
    on_nonfinite: str = option("stop", "on a NaN/inf loss or gradient: stop with an error, or skip the step",
                               choices=("stop", "skip"))
    # Communication
    reducer: str = option(
        "flat", "flat: one fused sum of all gradients (through the node's shared memory when every rank "
        "is on one node); mpi: one fused MPI_Allreduce; naive: one sum per parameter",
        choices=("flat", "mpi", "naive"))
    bucket_mb: float = option(  # off: no gain measured on 2 cores (BENCHMARKS.md)
        0.0, "overlap communication with backward: allreduce buckets of this many MB as soon as backward "
        "finishes them; 0 waits for the whole backward", at_least=0, at_most=2**20,
        hint="MB per bucket; PyTorch DDP's default is 25, and one larger than the gradients is one bucket")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag(name):
    if name == "model_args":  # one argument per flag: --model-arg KEY=VALUE
        return "--model-arg"
    return "--" + name.replace("_", "-")


def spell_flag(name):
    """A setting's name as the command line spells it (`batch_size` -> --batch-size)."""
    return flag(name) if name in FIELDS else None


def choices(name):
    """The valid values of a setting, or None for any."""
    allowed = FIELDS[name].metadata["choices"]
    return tuple(allowed()) if callable(allowed) else allowed


def shown_default(value):
    if isinstance(value, (list, dict)):
        return ",".join(map(str, value))
    return value


def default_of(name):
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def help_text(name, default=None, spell=spell_flag, text=None):
    """The help of a setting (or `text`), its default appended unless the text speaks of it
    or it is empty."""
    default = default_of(name) if default is None else default
    text = FIELDS[name].metadata["help"] if text is None else text
    text = spell_settings(text() if callable(text) else text, spell)
    if "default" not in text and default is not False and shown_default(default) != "":
        text += f" (default {shown_default(default)})"
    return text


def add_setting_arguments(parser, names=None, defaults=None, helps=None):
    """One flag per setting (all of them, or `names`), from the table. Flags default to None,
    "not given", so that a config file or `defaults` can fill them (see `given_settings`);
    `defaults` and `helps` override the table's for this parser (e.g. `dpflow bench`'s)."""
    defaults, helps = defaults or {}, helps or {}
    for name in names or FIELDS:
        f = FIELDS[name]
        text = help_text(name, defaults.get(name), text=helps.get(name)).replace("%", "%%")
        if f.type in (bool, "bool"):
            parser.add_argument(flag(name), action="store_const", const=True, default=None, help=text)
        elif f.type in (dict, "dict"):  # one KEY=VALUE per flag
            parser.add_argument(flag(name), action="append", dest=name, metavar=f.metadata["metavar"], help=text)
        else:
            allowed = tuple(choice for choice in choices(name) or () if choice) or None  # "" is "off"
            metavar = f.metadata["metavar"] or (None if allowed else name.upper())  # choices show as {a,b}
            parser.add_argument(flag(name), default=None, metavar=metavar, choices=allowed, help=text)


def given_settings(args, names=None):
    """{name: typed value} of the settings given as flags."""
    return {name: coerce(name, getattr(args, name)) for name in names or FIELDS
            if getattr(args, name, None) is not None}


def coerce(name, value):
    """Convert a TOML or flag value to the setting's type, or say what was expected."""
    parse = FIELDS[name].metadata["parse"]
    if parse:
        return parse(value)
    kind = FIELDS[name].type
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"`{name}` must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UsageError(f"`{name}` must be a number, got {value!r}")
        try:
            number = kind(value) if not (kind is int and isinstance(value, float)) else value
        except ValueError:
            raise UsageError(f"`{name}` must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if kind is int and (isinstance(number, float) and not number.is_integer()):
            raise UsageError(f"`{name}` must be an integer, got {value!r}")
        return kind(number)
    if not isinstance(value, str):
        raise UsageError(f"`{name}` must be a string, got {value!r}")
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
    if not path:  # `--config $RUN_TOML` with the variable unset
        raise UsageError("--config is empty; give the path of a TOML file, or leave --config out")
    text = read_text_file(path, f"--config {path}")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config {path} is not valid TOML: {error}") from None
    if isinstance(table.get("train"), dict):  # [train] holds the settings; a [model] table may sit beside it
        outside = sorted(set(table) - {"train", "model"})
        if outside:
            raise UsageError(f"--config {path}: {', '.join(outside)} outside its [train] table; put every "
                             "setting inside [train], or drop the [train] header")
        model = table.get("model")
        table = dict(table["train"])
        if isinstance(model, dict) and isinstance(table.get("model"), str):
            model = {"spec": table["model"], **model}  # [train]'s model = "SPEC", [model]'s arguments
        if model is not None:
            table["model"] = model
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
    """Every setting against its choices and bounds, then the rules that join settings."""
    for name, f in FIELDS.items():
        meta, value = f.metadata, getattr(config, name)
        allowed = choices(name)
        if allowed is not None and value not in allowed:
            raise UsageError(f"`{name}` must be one of {', '.join(a for a in allowed if a)}, got {value!r}")
        if f.type is int and isinstance(value, int) and value > MAX_COUNT:
            raise UsageError(f"`{name}` must be at most {MAX_COUNT}, got {value}")
        bounds = [(meta["above"], lambda v, b: v > b, "> {}"), (meta["at_least"], lambda v, b: v >= b, ">= {}"),
                  (meta["below"], lambda v, b: v < b, "< {}"), (meta["at_most"], lambda v, b: v <= b, "<= {}")]
        if value is None or all(bound is None for bound, _, _ in bounds):
            continue
        if isinstance(value, float) and not math.isfinite(value):  # (an int is finite, however long)
            raise UsageError(f"`{name}` must be a finite number, got {value!r}")
        hint = f" ({meta['hint']})" if meta["hint"] else ""
        for bound, holds, words in bounds:
            if bound is not None and not holds(value, bound):
                raise UsageError(f"`{name}` must be {words.format(bound)}, got {value!r}{hint}")
    if any(size > MAX_COUNT for size in config.hidden):
        raise UsageError(f"`hidden` sizes must be at most {MAX_COUNT}, got {config.hidden}")
    if config.classes == 1:
        raise UsageError("`classes` must be 0 (count them from the labels) or >= 2, got 1")
    watched = early_stop_metric(config)
    if watched.startswith("val_") and not config.validation_split:
        used = (f"`keep_best` {config.keep_best}" if config.keep_best
                else f"`early_stop` {config.early_stop} (it watches val_loss)")
        raise UsageError(f"{used} needs validation rows: add `validation_split` 0.1, or watch a test metric "
                         "with `keep_best` test_loss")
    if config.keep_best and not config.checkpoint_dir:
        raise UsageError(f"`keep_best` {config.keep_best} needs `checkpoint_dir` DIR, where best.dpf is written")
    if config.resume and not config.checkpoint_dir:
        raise UsageError("`resume` needs `checkpoint_dir` DIR, the directory to resume from")
    if config.trust_coefficient is not None and config.optimizer not in ("lars", "lamb"):
        raise UsageError(f"`trust_coefficient` applies to `optimizer` lars or lamb, not {config.optimizer}")
    validate_schedule(config)


def validate_schedule(config):
    """The decay settings must describe a schedule that decays, inside the run."""
    peak = scaled_lr(config.lr, config.lr_scaling, config.batch_size * config.accumulate, config.base_batch_size)
    if config.lr_schedule != "constant" and config.min_lr >= peak:
        raise UsageError(f"`min_lr` {config.min_lr:g} must be below the lr after scaling ({peak:g}); "
                         "lower it or raise `lr`")
    epochs = config.lr_decay_epochs
    if config.lr_schedule != "step":
        if epochs:
            raise UsageError(f"`lr_decay_epochs` applies to `lr_schedule` step only (now {config.lr_schedule}); "
                             "add `lr_schedule` step or drop `lr_decay_epochs`")
        return
    if not epochs:
        raise UsageError("`lr_schedule` step needs `lr_decay_epochs`, the epochs where the lr drops, e.g. 30,60")
    if any(not math.isfinite(e) for e in epochs) or any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise UsageError(f"`lr_decay_epochs` must increase, e.g. 30,60, got {','.join(f'{e:g}' for e in epochs)}")
    if epochs[0] <= config.warmup_epochs or epochs[-1] >= config.epochs:
        raise UsageError(
            f"`lr_decay_epochs` {','.join(f'{e:g}' for e in epochs)} must lie after the warmup "
            f"({config.warmup_epochs:g} epochs) and before the end ({config.epochs} epochs)"
        )


def early_stop_metric(config):
    """The metric that `keep_best` and `early_stop` watch: `keep_best`'s, else val_loss."""
    return config.keep_best or ("val_loss" if config.early_stop else "")


def config_dict(config):
    return dataclasses.asdict(config)


def options_markdown():
    """The README's table of `dpflow train` flags, generated from the settings."""
    def cell(text):
        return text.replace("|", "\\|")

    rows = ["| flag | meaning (default) |", "| --- | --- |"]
    for name, f in FIELDS.items():
        allowed = tuple(choice for choice in choices(name) or () if choice)
        value = "" if f.type in (bool, "bool") else " " + (
            "|".join(allowed) if allowed else f.metadata["metavar"] or name.upper())
        text = help_text(name, spell=lambda setting: f"`{flag(setting)}`" if setting in FIELDS else None)
        rows.append(f"| {cell(f'`{flag(name)}{value}`')} | {cell(text)} |")
    return "\n".join(rows) + "\n"
