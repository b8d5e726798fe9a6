import subprocess
import sys

import ml_collections
import pytest

from lexvla_jax import configlib


def _config():
    config = ml_collections.ConfigDict()
    config.train = dict(num_steps=10, learning_rate=1e-3, use_remat=False, name="run", mesh=(1, -1, 1))
    config.model = dict(checkpoint=None)
    return config


def test_overrides_parse_to_the_existing_type():
    config = configlib.apply_overrides(
        _config(),
        [
            "train.num_steps=20",
            "train.learning_rate=3e-4",
            "train.use_remat=true",
            "train.mesh=(2, 4, 1)",
            "model.checkpoint=/tmp/x",
        ],
    )
    assert config.train.num_steps == 20 and isinstance(config.train.num_steps, int)
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.train.use_remat is True
    assert config.train.mesh == (2, 4, 1)
    assert config.model.checkpoint == "/tmp/x"


def test_unknown_key_names_the_closest_keys():
    with pytest.raises(configlib.ConfigError, match=r"train\.num_step: no such config key; closest: train\.num_steps"):
        configlib.apply_overrides(_config(), ["train.num_step=3"])


def test_wrong_type_is_one_line():
    with pytest.raises(configlib.ConfigError, match=r"train\.num_steps=ten: expected an int") as info:
        configlib.apply_overrides(_config(), ["train.num_steps=ten"])
    assert "\n" not in str(info.value)


def test_split_config_args_and_file_arg(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.size = arg or 'small'\n"
        "    c.steps = 1\n"
        "    return c\n"
    )
    spec, overrides, rest = configlib.split_config_args(
        ["--config", f"{path}:large", "--config.steps=5", "--workdir", "w"]
    )
    assert rest == ["--workdir", "w"]
    config = configlib.load_config(spec, overrides)
    assert config.size == "large" and config.steps == 5


def test_cli_reports_bad_override_in_one_line_before_jax(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(
        "import ml_collections\ndef get_config(arg=None):\n    return ml_collections.ConfigDict({'a': 1})\n"
    )
    code = (
        "import sys\n"
        "from lexvla_jax import configlib\n"
        "try:\n"
        f"    configlib.load_config({str(path)!r}, ['b=2'])\n"
        "except configlib.ConfigError as e:\n"
        "    print(e)\n"
        "print('jax' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["--config.b: no such config key", "False"]


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "lexvla_jax.cli", "--help"], capture_output=True, text=True, check=True)
    assert "commands:" in out.stdout
