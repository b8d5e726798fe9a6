"""Bad input to `lexvla` commands (missing tokenizer, checkpoint directory or shard; checkpoints orbax cannot read
or write) is one line naming the problem, the path and the field to set."""

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
    from lexvla_jax import build, configlib, hf_loader

    missing = str(tmp_path / "dinov2-large")
    config = configlib.load_config(PAPER[1], [f"model.vision_checkpoint={missing}"])
    with pytest.raises(hf_loader.CheckpointError) as error:
        build.vision_config(config)
    message = str(error.value)
    assert isinstance(error.value, configlib.ConfigError)  # `lexvla <command>` prints it as one line
    assert missing in message and "config.model.vision_checkpoint" in message and "\n" not in message


def test_prepare_without_a_miniature_section_is_one_line(capsys):
    err = _one_line_error(capsys, "prepare", *PAPER)
    assert err.startswith("lexvla prepare: ") and "no miniature section" in err


def test_missing_tokenizer_of_a_data_command_names_the_path_and_the_field(tmp_path, capsys):
    missing = str(tmp_path / "tokenizer.model")
    tiny = os.path.join(REPO, "configs", "tiny.py")
    err = _one_line_error(capsys, "inspect-data", "--config", tiny, f"--config.data.tokenizer={missing}")
    assert missing in err and "set config.data.tokenizer" in err


def test_missing_checkpoint_shard_names_the_shard_and_the_field(tmp_path):
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from lexvla_jax import hf_loader

    (tmp_path / "config.json").write_text("{}")
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(hf_loader.CheckpointError) as error:
        hf_loader.HFCheckpoint(tmp_path, "config.model.text_checkpoint")
    message = str(error.value)
    assert str(tmp_path / "model-00002-of-00002.safetensors") in message and "1 of 2 shards" in message
    assert "config.model.text_checkpoint" in message and "\n" not in message
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(
        (tmp_path / "model-00001-of-00002.safetensors").read_bytes()
    )
    assert hf_loader.HFCheckpoint(tmp_path).keys() == ["a"]  # complete again


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A workdir with one checkpoint (step 1) of a two-array state."""
    import jax.numpy as jnp

    from lexvla_jax.checkpoints import Checkpointer

    workdir = str(tmp_path_factory.mktemp("workdir"))
    checkpointer = Checkpointer(workdir, every_steps=1, keep=1, async_save=False)
    checkpointer.save(1, {"a": jnp.ones(3), "b": jnp.zeros((2, 2))}, None, {}, {"ids": [1, 2]})
    checkpointer.close()
    return workdir


@pytest.mark.parametrize(
    ("shapes", "reason"),
    [
        ({"a": (4,), "b": (2, 2)}, "is not compatible with the stored shape"),  # another model size
        ({"a": (3,)}, "tree structures do not match"),  # another set of parameters
    ],
)
def test_checkpoint_of_another_model_is_a_one_line_error(saved_checkpoint, shapes, reason):
    import jax
    import jax.numpy as jnp

    from lexvla_jax import configlib
    from lexvla_jax.checkpoints import Checkpointer

    checkpointer = Checkpointer(saved_checkpoint, every_steps=1, keep=1, create=False)
    abstract = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in shapes.items()}
    with pytest.raises(configlib.ConfigError) as error:
        checkpointer.restore(1, abstract)
    checkpointer.close()
    message = str(error.value)
    assert message.startswith(f"restoring the train state of checkpoint step 1 in {saved_checkpoint}/checkpoints")
    assert reason in message and "--workdir" in message and "config.model" in message and "\n" not in message


def test_unwritable_workdir_is_a_one_line_error(tmp_path):
    from lexvla_jax import configlib
    from lexvla_jax.checkpoints import Checkpointer

    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "run"  # under a file: no directory can be made there
    with pytest.raises(configlib.ConfigError) as error:
        Checkpointer(str(workdir), every_steps=1, keep=1)
    message = str(error.value)
    assert f"opening {workdir}/checkpoints failed" in message and "set --workdir" in message and "\n" not in message
