"""Each training option is defined once (dpflow/config.py); the parser, the config file,
`--help`, the README's table and `dpflow bench` derive from it."""

import argparse
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT
from dpflow import catalog, config, data, model, normalize, optim, schedule, trainer, zoo
from dpflow.bench import BENCH_SETTINGS, add_bench_arguments, bench_config
from dpflow.errors import UsageError


def test_help_lists_every_option_once_under_mpiexec(dpflow):
    result = dpflow("train", "--help", ranks=2)
    assert result.returncode == 0, result
    assert result.stdout.count("usage: dpflow train") == 1
    listed = re.findall(r"^  (--[a-z-]+)", result.stdout, flags=re.M)
    assert sorted(listed) == sorted(["--config", *map(config.flag, config.FIELDS)])
    for name in config.FIELDS:  # each with its help text (argparse wraps lines)
        words = config.help_text(name).split()
        assert " ".join(words[:3]) in " ".join(result.stdout.split()), name


def test_the_readme_table_is_generated_from_the_options():
    check = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "readme_options.py"), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name in config.FIELDS:
        assert f"| `{config.flag(name)}" in readme, name


def test_choices_come_from_the_registries():
    assert config.choices("optimizer") == tuple(optim.OPTIMIZERS)
    assert config.choices("activation") == tuple(model.ACTIVATIONS)
    assert config.choices("lr_schedule") == schedule.SCHEDULES and config.choices("lr_scaling") == schedule.SCALINGS
    assert config.choices("normalize") == normalize.KINDS
    assert config.choices("keep_best") == ("", *trainer.BEST_METRICS)
    for name in (*zoo.BUILDERS, *data.BUILTIN, *catalog.NAMED):  # models and datasets: also paths
        assert name in config.help_text("model") + config.help_text("dataset"), name


@pytest.mark.parametrize("name", sorted(set(config.FIELDS) - {"model_args"}))
def test_every_option_is_a_flag_and_a_toml_key_of_its_type(tmp_path, name):
    default = config.default_of(name)
    if default is None:  # "not set": try a valid value of the field's type instead
        default = config.FIELDS[name].type(0.5)
    allowed = [choice for choice in config.choices(name) or () if choice]
    if allowed and default not in allowed:  # "" is "off", not a value one types
        default = allowed[0]
    value = ",".join(map(str, default)) if isinstance(default, list) else default
    toml = f"{name} = {value!r}\n".replace("True", "true").replace("False", "false")
    (tmp_path / "c.toml").write_text(toml.replace("'", '"'))
    assert config.load_toml(tmp_path / "c.toml") == {name: default}
    parser = argparse.ArgumentParser()
    config.add_setting_arguments(parser)
    args = parser.parse_args([] if isinstance(default, bool) else [config.flag(name), str(value)])
    if isinstance(default, bool):
        args = parser.parse_args([config.flag(name)])
        assert config.given_settings(args) == {name: True}
    else:
        assert config.given_settings(args) == {name: default}


def test_model_arguments_are_a_repeated_flag_and_a_table(tmp_path):
    (tmp_path / "c.toml").write_text('[model]\nspec = "cnn"\ndropout = 0.25\n')
    assert config.load_toml(tmp_path / "c.toml") == {"model": "cnn", "model_args": {"dropout": 0.25}}
    parser = argparse.ArgumentParser()
    config.add_setting_arguments(parser)
    args = parser.parse_args(["--model-arg", "dropout=0.25", "--model-arg", "channels=[16,32]"])
    assert config.given_settings(args) == {"model_args": {"dropout": 0.25, "channels": [16, 32]}}
    with pytest.raises(UsageError, match="must be a table of KEY = VALUE"):
        config.coerce("model_args", 3)


@pytest.mark.parametrize("name,value,message", [
    ("momentum", "1", "`momentum` must be < 1, got 1.0 (0.9 is usual)"),
    ("validation_split", "1", "`validation_split` must be < 1, got 1.0 (the fraction of training rows held out"),
    ("seed", "-1", "`seed` must be >= 0, got -1"),
    ("early_stop", "99999999999", "`early_stop` must be at most 2147483647"),
    ("epochs", "0", "`epochs` must be > 0, got 0"),
    ("bucket_mb", "-1", "`bucket_mb` must be >= 0, got -1.0"),
    ("lr", "nan", "`lr` must be a finite number"),
    ("batch_size", "2.5", "`batch_size` must be an integer, got '2.5'"),
])
def test_bounds_come_from_the_table(name, value, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        config.build_config({}, {name: config.coerce(name, value)})


def test_bench_takes_the_same_options_with_its_own_defaults():
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    settings = bench_config(parser.parse_args([]))
    assert (settings.features, settings.hidden, settings.batch_size) == (784, [512, 256], 256)
    settings = bench_config(parser.parse_args(["--hidden", "8,4", "--optimizer", "lamb"]))
    assert settings.hidden == [8, 4] and settings.optimizer == "lamb"
    assert all(parser.parse_args([]).__contains__(name) for name in BENCH_SETTINGS)
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "rmsprop"])
