"""Bad input to `lexvla` commands is one line naming the problem, the path and the field to set."""

import os

import pytest

from lexvla_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = ["--config", os.path.join(REPO, "configs", "lexvla_cc12m.py"), "--config.dist.mode=none"]


def _one_line_error(capsys, *args) -> str:
    code = cli.main(list(args))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_missing_tokenizer_names_the_path_and_the_field(tmp_path, capsys):
    missing = str(tmp_path / "nope" / "tokenizer.model")
    err = _one_line_error(
        capsys, "train", *PAPER, f"--config.data.tokenizer={missing}", "--workdir", str(tmp_path / "w")
    )
    assert missing in err and "config.data.tokenizer" in err


def test_missing_checkpoint_directory_names_the_path_and_the_field(tmp_path):
    from lexvla_jax import build, configlib, convert

    missing = str(tmp_path / "dinov2-large")
    config = configlib.load_config(PAPER[1], [f"model.vision_checkpoint={missing}"])
    with pytest.raises(convert.CheckpointError) as error:
        build.vision_config(config)
    message = str(error.value)
    assert isinstance(error.value, configlib.ConfigError)  # `lexvla <command>` prints it as one line
    assert missing in message and "config.model.vision_checkpoint" in message and "\n" not in message


def test_pretrain_lm_without_a_stage_1_section_is_one_line(capsys):
    err = _one_line_error(capsys, "pretrain-lm", *PAPER)
    assert err.startswith("lexvla pretrain-lm: ") and "no lm_pretrain section" in err
