"""Bad input to `lexvla` commands is one line naming the problem, the path and the field to set."""

import os

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


def test_missing_checkpoint_directory_names_the_path_and_the_field(tmp_path, capsys, llama2_tokenizer_path):
    missing = str(tmp_path / "dinov2-large")
    err = _one_line_error(
        capsys,
        "train",
        *PAPER,
        f"--config.data.tokenizer={llama2_tokenizer_path}",
        f"--config.model.vision_checkpoint={missing}",
        "--workdir",
        str(tmp_path / "w"),
    )
    assert missing in err and "config.model.vision_checkpoint" in err
