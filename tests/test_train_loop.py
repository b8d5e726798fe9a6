"""`lexvla train`: exact resume after SIGKILL and SIGTERM, non-finite steps never checkpointed, metrics."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lexvla_jax import configlib, train, vocab
from lexvla_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.make_synthetic(root, num_train=600, num_eval=24, seed=1, image_size=32, shard_size=100)
    config = configlib.load_config(os.path.join(REPO, "configs", "tiny.py"))
    texts = [*synthetic.all_captions(root), config.data.prompt_template]
    vocab.train_tokenizer(texts, config.model.text.vocab_size, os.path.join(root, "tokenizer.model"))
    return root


def _overrides(data_dir: str, **extra) -> list[str]:
    values = {
        "data.synthetic.dir": data_dir,
        "data.train_shards": os.path.join(data_dir, "train"),
        "data.eval_shards": os.path.join(data_dir, "eval"),
        "data.tokenizer": os.path.join(data_dir, "tokenizer.model"),
        "data.image_size": 32,
        "data.shuffle_buffer": 50,
        "model.vision.image_size": 32,
        "model.vision.num_hidden_layers": 1,
        "model.text.num_hidden_layers": 1,
        "train.num_steps": STEPS,
        "train.global_batch_size": 16,
        "train.log_every": 4,
        "train.show_top_words": 2,
        "optim.warmup_steps": 2,
        "checkpoint.every_steps": 4,
        "checkpoint.keep": 10,
        "eval.every_steps": 0,
        "eval.batch_size": 16,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _command(workdir, data_dir, **extra):
    args = ["--config", os.path.join(REPO, "configs", "tiny.py"), "--workdir", str(workdir)]
    args += [f"--config.{o}" for o in _overrides(data_dir, **extra)]
    return [sys.executable, "-m", "lexvla_jax.cli", "train", *args]


@pytest.fixture(scope="session")
def env():
    """Two data-parallel devices: sharded like a real run, light enough for a loaded 2-core machine."""
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _saved_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def _final_state(workdir, step=STEPS):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]


def _assert_bitwise_equal(a, b):
    flat_a = ocp.tree.to_flat_dict(a)
    flat_b = ocp.tree.to_flat_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


@pytest.fixture(scope="session")
def uninterrupted(data_dir, env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted") / "work"
    result = subprocess.run(_command(workdir, data_dir), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return workdir, result.stdout


def test_metrics_rows(uninterrupted):
    workdir, stdout = uninterrupted
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(4, STEPS + 1, 4))
    for key in ("info_nce", "penalty_img", "active_words_img", "grad_norm", "learning_rate", "samples_per_s"):
        assert key in train_rows[-1]
    eval_row = [r for r in rows if "eval/i2t_r@1" in r][-1]
    for key in ("eval/i2t_r@5", "eval/i2t_r@10", "eval/t2i_r@1", "eval/t2i_r@10"):
        assert 0.0 <= eval_row[key] <= 1.0
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert "final evaluation" in stdout
    assert "eval image 1:" in stdout and "caption words:" in stdout  # top words of eval images and captions


def test_the_model_learns(data_dir, tmp_path):
    """A short in-process run: the contrastive loss falls and retrieval on held-out images beats chance widely.

    The caption alone is the prompt (`[TEXT]`, shorter sequences) and the data is read in-process (no workers).
    """
    extra = {
        "train.num_steps": 200,
        "train.global_batch_size": 64,
        "train.log_every": 20,
        "optim.learning_rate": 3e-3,
        "optim.warmup_steps": 20,
        "checkpoint.every_steps": 200,
        "data.num_workers": 0,
    }
    config = configlib.load_config(os.path.join(REPO, "configs", "tiny.py"), _overrides(data_dir, **extra))
    config.data.prompt_template = "[TEXT]"
    workdir = str(tmp_path / "work")
    final = train.run(config, workdir)
    info_nce = [r["info_nce"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r]
    print(
        f"\ninfo_nce {info_nce[0]:.3f} -> {info_nce[-1]:.3f}; R@1 i2t {final['eval/i2t_r@1']:.3f}, "
        f"t2i {final['eval/t2i_r@1']:.3f}, chance {final['eval/chance_i2t_r@1']:.3f}"
    )
    assert len(info_nce) == 10 and info_nce[-1] < 0.7 * info_nce[0]
    for direction in ("i2t", "t2i"):
        chance = final[f"eval/chance_{direction}_r@1"]
        assert 0 < chance < 0.05  # 24 eval images, 5 captions each
        assert final[f"eval/{direction}_r@1"] > 0.3  # measured 0.75 (i2t) and 0.73 (t2i)


def _interrupt(workdir, data_dir, env, sig):
    """Starts a run and sends `sig` once its first checkpoint exists → (steps saved, output, exit code).

    SIGKILL goes to the whole process group (the trainer and its data worker), as when a machine dies;
    SIGTERM goes to the trainer only, which must checkpoint, stop its workers and exit cleanly.
    """
    log = open(os.path.join(os.path.dirname(workdir), "interrupted.log"), "w+")
    proc = subprocess.Popen(
        _command(workdir, data_dir), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 300
    while not _saved_steps(workdir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(sig)
    proc.wait(timeout=300)
    log.seek(0)
    out = log.read()
    saved = _saved_steps(workdir)
    assert saved and max(saved) < STEPS, f"the run was not interrupted mid-way: {saved}\n{out[-2000:]}"
    return saved, out, proc.returncode


def _resume(workdir, data_dir, env, saved, **extra):
    resumed = subprocess.run(_command(workdir, data_dir, **extra), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {max(saved)}" in resumed.stdout
    return resumed.stdout


@pytest.fixture(scope="module")
def terminated(data_dir, env, tmp_path_factory):
    """A run stopped by SIGTERM after its first checkpoint (copied by each test that resumes it)."""
    workdir = tmp_path_factory.mktemp("terminated") / "work"
    saved, out, returncode = _interrupt(workdir, data_dir, env, signal.SIGTERM)
    assert returncode == 0 and "termination signal" in out, out[-2000:]
    return workdir, saved


def test_exact_resume_after_sigkill(uninterrupted, data_dir, env, tmp_path):
    workdir = tmp_path / "work"
    saved, _, returncode = _interrupt(workdir, data_dir, env, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    _resume(workdir, data_dir, env, saved)
    _assert_bitwise_equal(_final_state(workdir), _final_state(uninterrupted[0]))


def test_exact_resume_after_sigterm(uninterrupted, terminated, data_dir, env, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(terminated[0], workdir)
    _resume(workdir, data_dir, env, terminated[1])
    _assert_bitwise_equal(_final_state(workdir), _final_state(uninterrupted[0]))


def test_resume_on_a_different_mesh(uninterrupted, terminated, data_dir, env, tmp_path):
    """Saved on a data-parallel mesh, resumed with FSDP: the same training up to float reassociation."""
    workdir = tmp_path / "work"
    shutil.copytree(terminated[0], workdir)
    stdout = _resume(workdir, data_dir, env, terminated[1], **{"mesh.shape": "(1,2,1)"})
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1}" in stdout
    ours = ocp.tree.to_flat_dict(_final_state(workdir))
    reference = ocp.tree.to_flat_dict(_final_state(uninterrupted[0]))
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_allclose(np.asarray(ours[key]), np.asarray(reference[key]), rtol=1e-3, atol=1e-4)


def test_non_finite_step_is_skipped_and_never_saved(data_dir, tmp_path, monkeypatch):
    """A NaN loss at step 6 skips that update; no checkpoint is written from it; training goes on."""
    real_loss = train.step_lib.losses.lexvla_loss

    def loss_with_nan(*args, step, **kwargs):
        loss, metrics = real_loss(*args, step=step, **kwargs)
        return jnp.where(step == 5, jnp.nan, loss), metrics

    monkeypatch.setattr(train.step_lib.losses, "lexvla_loss", loss_with_nan)
    config = configlib.load_config(
        os.path.join(REPO, "configs", "tiny.py"),
        _overrides(data_dir, **{"train.num_steps": 8, "checkpoint.every_steps": 2, "train.log_every": 1}),
    )
    workdir = str(tmp_path / "work")
    train.run(config, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    by_step = {r["step"]: r for r in rows if "loss" in r}
    assert np.isnan(by_step[6]["loss"]) and by_step[6]["skipped_updates"] == 1
    assert np.isfinite(by_step[7]["loss"]) and by_step[8]["skipped_updates"] == 1
    assert _saved_steps(workdir) == [2, 4, 8]  # step 6 (the skipped update) was not saved
    state = _final_state(workdir, step=8)
    assert (int(state["step"]), int(state["skipped_updates"]), int(state["consecutive_skips"])) == (8, 1, 0)


def test_repeated_non_finite_steps_stop_the_run(data_dir, tmp_path, monkeypatch):
    real_loss = train.step_lib.losses.lexvla_loss

    def loss_nan_from_step_3(*args, step, **kwargs):
        loss, metrics = real_loss(*args, step=step, **kwargs)
        return jnp.where(step >= 3, jnp.nan, loss), metrics

    monkeypatch.setattr(train.step_lib.losses, "lexvla_loss", loss_nan_from_step_3)
    extra = {"train.num_steps": 20, "train.max_consecutive_skips": 3, "checkpoint.every_steps": 2}
    config = configlib.load_config(os.path.join(REPO, "configs", "tiny.py"), _overrides(data_dir, **extra))
    workdir = str(tmp_path / "work")
    with pytest.raises(
        train.TrainingError, match=r"3 steps in a row had a non-finite loss or gradient \(last at step 6\)"
    ):
        train.run(config, workdir)
    assert _saved_steps(workdir) == [2]  # steps 4 and 6 were skipped updates: not saved
