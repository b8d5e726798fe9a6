"""A `gs://` workdir end to end, against a GCS emulator on 127.0.0.1 (`gcs_emulator.py`).

Tested backend: `fake-gcs-server` serving GCS's JSON API over HTTP from memory (why that one: see
`gcs_emulator.py`). The same clients as on real GCS write to it: orbax's arrays through tensorstore's
`gcs` kvstore driver; orbax's directories and metadata, the data-iterator position, config, vocabulary,
`metrics.jsonl` and TensorBoard events through `etils.epath` → fsspec `gcsfs`. Only their endpoint (and
an anonymous token) differ from production. Every test checks that no local folder named like the
workdir (`gs:`, `gs`, the bucket) appears.
"""

import io
import json
import os
import struct
import subprocess
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from support import xla_env
from support.gcs_emulator import LOCAL_SUSPECTS, local_traces
from support.local_cluster import REPO
from support.local_cluster import command as _command
from support.local_cluster import overrides as _overrides
from tensorboardX.proto import event_pb2

from lexvla_jax import build, configlib, inference
from lexvla_jax.checkpoints import Checkpointer, VocabularyMismatch, vocabulary_record
from lexvla_jax.commands import eval as eval_command
from lexvla_jax.data import pipeline
from lexvla_jax.metric_writers import MetricWriter
from lexvla_jax.text.prompt import prompt_encoder

TINY = os.path.join(REPO, "configs", "tiny.py:scratch")


def _assert_no_local_copy(*roots):
    """Nothing named like the workdir under `roots`, nor where a relative "gs:/..." would land."""
    assert local_traces(*roots) == []
    assert not [name for name in os.listdir(os.getcwd()) + os.listdir(REPO) if name in LOCAL_SUSPECTS]


# ---------------------------------------------------------------------------------------- checkpoints


def _state(mesh):
    """A train-state-like tree: sharded float32 and bfloat16 weights, a replicated step and PRNG key."""
    rng = np.random.default_rng(0)
    placed = {
        "params": {
            "codebook": (rng.standard_normal((16, 8)).astype(np.float32), PartitionSpec("data", "tensor")),
            "lora": (rng.standard_normal((8, 4)).astype(jax.numpy.bfloat16), PartitionSpec(None, "tensor")),
        },
        "step": (np.int32(7), PartitionSpec()),
        "rng": (np.array([3, 4], np.uint32), PartitionSpec()),
    }
    return jax.tree.map(
        lambda pair: jax.device_put(pair[0], NamedSharding(mesh, pair[1])),
        placed,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _abstract_on(tree, mesh):
    """`tree`'s shapes on `mesh`, sharded along their first axis where it divides (else replicated)."""

    def spec(x):
        return PartitionSpec("data") if x.ndim and x.shape[0] % mesh.size == 0 else PartitionSpec()

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x))), tree)


def test_checkpointer_round_trip_in_gcs(gcs_emulator, data_dir, tmp_path, monkeypatch):
    """State (resharded onto another mesh), data position, config and vocabulary come back exactly."""
    monkeypatch.chdir(tmp_path)
    workdir = gcs_emulator.new_workdir()
    config = configlib.load_config(TINY, _overrides(data_dir))
    tokenizer, kept_ids = build.load_vocabulary(config)
    vocabulary = vocabulary_record(tokenizer, kept_ids, config.data.tokenizer)
    prompt = prompt_encoder(config.data, tokenizer)
    state = _state(jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2))

    iterator = pipeline.train_iterator(config.data, 8, prompt_encoder=prompt)
    checkpointer = Checkpointer(workdir, every_steps=2, keep=1)
    for step in (2, 4):  # keep=1: step 2 is deleted from the bucket once step 4 is saved
        next(iterator), next(iterator)
        checkpointer.save(step, state, iterator, config.to_dict(), vocabulary)
    checkpointer.wait()
    checkpointer.close()
    expected = [next(iterator) for _ in range(3)]
    iterator.close()

    reopened = Checkpointer(workdir, every_steps=2, keep=1, create=False)
    assert reopened.all_steps() == [4]
    resumed_iterator = pipeline.train_iterator(config.data, 8, prompt_encoder=prompt)
    target = _abstract_on(state, jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)))
    reopened.restore_data(4, resumed_iterator)
    restored = reopened.restore(4, target)
    resumed = [next(resumed_iterator) for _ in range(3)]
    resumed_iterator.close()
    for path, value in ocp.tree.to_flat_dict(state).items():
        again = ocp.tree.to_flat_dict(restored)[path]
        assert again.dtype == value.dtype and again.sharding == ocp.tree.to_flat_dict(target)[path].sharding
        np.testing.assert_array_equal(np.asarray(again), np.asarray(value), err_msg=str(path))
    for a, b in zip(expected, resumed, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert reopened.restore_config(4) == json.loads(json.dumps(config.to_dict()))
    reopened.check_vocabulary(4, tokenizer, kept_ids, config.data.tokenizer)
    with pytest.raises(VocabularyMismatch, match="kept words"):
        reopened.check_vocabulary(4, tokenizer, kept_ids[:-1], config.data.tokenizer)
    reopened.close()

    objects = gcs_emulator.objects(workdir)
    assert not [name for name in objects if name.startswith("checkpoints/2/")]
    for item in ("state", "data", "config", "vocab"):
        assert [name for name in objects if name.startswith(f"checkpoints/4/{item}/")], (item, objects)
    _assert_no_local_copy(tmp_path)


# ---------------------------------------------------------------------------------------------- metrics


def _event_scalars(data: bytes) -> dict:
    """{(tag, step): value} of one TensorBoard event file (TFRecord framing: length, crc, event, crc)."""
    scalars, offset = {}, 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        scalars.update({(v.tag, event.step): v.simple_value for v in event.summary.value})
    return scalars


def test_metric_writer_in_gcs(gcs_emulator, tmp_path, monkeypatch):
    """A run and its resumption (same second, same host) both keep their rows and event files."""
    monkeypatch.chdir(tmp_path)
    workdir = gcs_emulator.new_workdir()
    first = MetricWriter(workdir, total_steps=3, console=io.StringIO())
    first.write(1, {"loss": np.float32(0.5), "count": np.int64(3)})
    first.write(2, {"loss": 0.25, "eval/r@1": float("nan")})
    first.close()
    resumed = MetricWriter(workdir, total_steps=3, console=io.StringIO())
    resumed.write(3, {"loss": 0.125})
    resumed.close()

    rows = (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row) for row in rows[:1] + rows[2:]] == [
        {"step": 1, "loss": 0.5, "count": 3},
        {"step": 3, "loss": 0.125},
    ]
    assert json.loads(rows[1])["step"] == 2 and np.isnan(json.loads(rows[1])["eval/r@1"])
    files = sorted((epath.Path(workdir) / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    scalars = {}
    for file in files:
        scalars.update(_event_scalars(file.read_bytes()))
    assert scalars == {("loss", 1): 0.5, ("count", 1): 3.0, ("loss", 2): 0.25, ("loss", 3): 0.125}
    assert sorted(gcs_emulator.objects(workdir)) == sorted(
        ["metrics.jsonl", *(f"tensorboard/{file.name}" for file in files)]
    )
    _assert_no_local_copy(tmp_path)


def test_eval_results_in_gcs(gcs_emulator, tmp_path, monkeypatch):
    """`lexvla eval`'s record, `<workdir>/eval/step_<N>.json`, is written through epath to the bucket."""
    monkeypatch.chdir(tmp_path)
    workdir = gcs_emulator.new_workdir()
    coco = types.SimpleNamespace(name="coco", type="retrieval", settings={"top_k": 512, "ks": (1, 5)})
    path = eval_command.write_results(workdir, 700, [coco], {"coco/dense/i2t_r@1": 0.5})
    assert str(path) == f"{workdir}/eval/step_700.json" and gcs_emulator.objects(workdir) == ["eval/step_700.json"]
    record = json.loads(epath.Path(path).read_text())
    assert record == {
        "step": 700,
        "workdir": workdir,
        "evals": {"coco": {"type": "retrieval", "top_k": 512, "ks": [1, 5]}},
        "metrics": {"coco/dense/i2t_r@1": 0.5},
        "results": {"coco": {"dense/i2t_r@1": 0.5}},
    }
    _assert_no_local_copy(tmp_path)


# ------------------------------------------------------------------------------------------ lexvla train


@pytest.mark.slow
def test_train_resume_and_restore_in_gcs(gcs_emulator, data_dir, tmp_path, tmp_path_factory):
    """`lexvla train --workdir gs://...` twice (the second resumes), then `inference.restore` from gs://."""
    workdir = gcs_emulator.new_workdir()
    env = {
        **xla_env.cpu_env(2),
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    }
    steps = {"train.log_every": 2, "checkpoint.every_steps": 2}
    for num_steps in (2, 4):
        command = _command(workdir, data_dir, **steps, **{"train.num_steps": num_steps})
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resumed from step 2" in result.stdout

    objects = gcs_emulator.objects(workdir)
    assert {name.split("/")[1] for name in objects if name.startswith("checkpoints/")} >= {"2", "4"}
    assert "metrics.jsonl" in objects
    assert len([name for name in objects if name.startswith("tensorboard/events")]) == 2  # one per run
    rows = [json.loads(row) for row in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [2, 4]  # the resumed run appended its rows

    config = configlib.load_config(TINY, _overrides(data_dir, **steps, **{"train.num_steps": 4}))
    encoder, step = inference.restore(config, workdir)
    assert step == 4
    with ocp.CheckpointManager(f"{workdir}/checkpoints") as manager:
        saved = manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    restored = ocp.tree.to_flat_dict(nnx.to_pure_dict(encoder.params))
    expected = {key[:-1]: value for key, value in ocp.tree.to_flat_dict(saved["params"]).items()}  # drop "value"
    assert restored.keys() == expected.keys() and restored
    for key in restored:
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(expected[key]), err_msg=str(key))
    _assert_no_local_copy(tmp_path, tmp_path_factory.getbasetemp())
