"""`lexvla train`: resume on another mesh, non-finite steps never checkpointed, metrics, reading the model."""

import glob
import io
import json
import os
import shutil
import signal
import subprocess
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict
from PIL import Image
from support import local_cluster

from lexvla_jax import configlib, train
from lexvla_jax import step as step_lib
from lexvla_jax.data.tar_reader import iter_samples
from lexvla_jax.sparse import parts

STEPS = local_cluster.STEPS


def _final_state(workdir, step=STEPS):
    return local_cluster.final_state(workdir, step)


@pytest.mark.slow
def test_metrics_rows(uninterrupted):
    workdir, stdout = uninterrupted
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(4, STEPS + 1, 4))
    for key in ("info_nce", "penalty_img", "active_words_img", "grad_norm", "learning_rate", "samples_per_s"):
        assert key in train_rows[-1]
    # Throughput: FLOPs from the step's jaxpr against the measured CPU peak; input wait is a fraction.
    for row in train_rows:
        assert row["tflops_per_device"] > 0 and 0 < row["mfu"] < 1.5 and 0 <= row["input_wait_fraction"] <= 1
        assert row["samples_per_s"] == pytest.approx(16 / row["step_time_s"], rel=1e-6)
    traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0  # train.profile_steps=(5,7)
    eval_row = [r for r in rows if "retrieval/dense/i2t_r@1" in r][-1]
    for mode in ("dense", "threshold", "topk"):
        for direction in ("i2t", "t2i"):  # recall grows with k; CLIP_benchmark's names carry the same numbers
            r = [eval_row[f"retrieval/{mode}/{direction}_r@{k}"] for k in (1, 5, 10)]
            assert r == sorted(r) and r[-1] > 0, (mode, direction, r)
        assert eval_row[f"retrieval/{mode}/image_retrieval_recall@1"] == eval_row[f"retrieval/{mode}/t2i_r@1"]
    assert eval_row["patchdis/num_images"] == 24
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert "final evaluation" in stdout
    assert "eval image 1:" in stdout and "caption words:" in stdout  # top words of eval images and captions


@pytest.mark.slow
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
        "train.final_eval": True,
    }
    config = configlib.load_config(local_cluster.TINY_CONFIG, local_cluster.overrides(data_dir, **extra))
    config.data.prompt_template = "[TEXT]"
    del config.evals["patchdis"]
    workdir = str(tmp_path / "work")
    final = train.run(config, workdir)
    info_nce = [r["info_nce"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r]
    recall = {d: (final[f"retrieval/dense/{d}_r@1"], final[f"retrieval/chance/{d}_r@1"]) for d in ("i2t", "t2i")}
    print(f"\ninfo_nce {info_nce[0]:.3f} -> {info_nce[-1]:.3f}; R@1 and chance: {recall}")
    assert len(info_nce) == 10 and info_nce[-1] < 0.7 * info_nce[0]
    for r_at_1, chance in recall.values():
        assert 0 < chance < 0.05  # 24 eval images, 5 captions each
        assert r_at_1 > 0.3  # measured 0.71 (i2t) and 0.53 (t2i); info_nce 3.65 -> 1.94


def _terminate(workdir, data_dir, env):
    """Starts a run and sends SIGTERM to the trainer once its first checkpoint exists → (steps saved, output, exit
    code); the trainer must checkpoint and exit cleanly (with a data worker: tests/test_multiprocess_train.py)."""
    log = open(os.path.join(os.path.dirname(workdir), "terminated.log"), "w+")
    proc = subprocess.Popen(
        local_cluster.command(workdir, data_dir), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 300
    while not local_cluster.saved_steps(workdir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    log.seek(0)
    out = log.read()
    saved = local_cluster.saved_steps(workdir)
    assert saved and max(saved) < STEPS, f"the run was not interrupted mid-way: {saved}\n{out[-2000:]}"
    return saved, out, proc.returncode


def _resume(workdir, data_dir, env, saved, **extra):
    resumed = subprocess.run(local_cluster.command(workdir, data_dir, **extra), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {max(saved)}" in resumed.stdout
    return resumed.stdout


@pytest.fixture(scope="module")
def terminated(data_dir, env, tmp_path_factory):
    """A run stopped by SIGTERM after its first checkpoint (copied by each test that resumes it)."""
    workdir = tmp_path_factory.mktemp("terminated") / "work"
    saved, out, returncode = _terminate(workdir, data_dir, env)
    assert returncode == 0 and "termination signal" in out, out[-2000:]
    return workdir, saved


@pytest.mark.slow
def test_resume_on_a_different_mesh(uninterrupted, terminated, data_dir, env, tmp_path):
    """Stopped by SIGTERM on a data-parallel mesh, resumed with FSDP: the same training up to float reassociation.
    (Bit-for-bit resumes after a stop: test_multiprocess_train.py for SIGTERM, test_long_run.py for hangs and
    SIGKILL.)"""
    workdir = tmp_path / "work"
    shutil.copytree(terminated[0], workdir)
    stdout = _resume(workdir, data_dir, env, terminated[1], **{"mesh.shape": "(1,2,1)"})
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1}" in stdout
    local_cluster.assert_close(_final_state(workdir), _final_state(uninterrupted[0]), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_non_finite_steps_are_skipped_never_saved_and_stop_the_run_when_repeated(data_dir, tmp_path, monkeypatch):
    """A NaN loss at step 6 skips that update, no checkpoint is written from it and training goes on; NaN losses at
    steps 10, 11 and 12 (3 in a row, `train.max_consecutive_skips=3`) stop the run with one line."""
    real_loss = step_lib.losses.lexvla_loss

    def loss_with_nan(*args, step, **kwargs):
        loss, metrics = real_loss(*args, step=step, **kwargs)
        return jnp.where((step == 5) | (step >= 9), jnp.nan, loss), metrics

    monkeypatch.setattr(step_lib.losses, "lexvla_loss", loss_with_nan)
    extra = {"train.num_steps": 20, "train.max_consecutive_skips": 3, "checkpoint.every_steps": 2, "train.log_every": 1}
    config = configlib.load_config(local_cluster.TINY_CONFIG, local_cluster.overrides(data_dir, **extra))
    workdir = str(tmp_path / "work")
    with pytest.raises(
        train.TrainingError, match=r"3 steps in a row had a non-finite loss or gradient \(last at step 12\)"
    ):
        train.run(config, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    by_step = {r["step"]: r for r in rows if "loss" in r}
    assert np.isnan(by_step[6]["loss"]) and by_step[6]["skipped_updates"] == 1
    assert np.isfinite(by_step[7]["loss"]) and by_step[8]["skipped_updates"] == 1
    assert local_cluster.saved_steps(workdir) == [2, 4, 8]  # steps 6, 10 and 12 were skipped updates: not saved
    state = _final_state(workdir, step=8)
    assert (int(state["step"]), int(state["skipped_updates"]), int(state["consecutive_skips"])) == (8, 1, 0)


@pytest.mark.slow
def test_throughput_leaves_out_evaluation_and_checkpoint_time(data_dir, tmp_path, monkeypatch):
    """Evaluation and checkpoint saves made 3 s slower each: the logged step time must not see them.

    Both run after the report of steps 2 and 4, inside the next interval of two steps; counted, each alone would
    add 1.5 s to that interval's `step_time_s` (a step of this config takes ~0.1 s).
    """
    from lexvla_jax.checkpoints import Checkpointer
    from lexvla_jax.evaluate import registry

    slow = 3.0
    run_evaluators, save = registry.run_evaluators, Checkpointer.save
    calls = []

    def slow_evaluators(evaluators, encoder, step=None, log=None):
        if step is not None and any(e.due(step) for e in evaluators):
            calls.append(("eval", step))
            time.sleep(slow)
        return run_evaluators(evaluators, encoder, step, log)

    def slow_save(self, step, *args):
        calls.append(("save", step))
        time.sleep(slow)
        return save(self, step, *args)

    monkeypatch.setattr(registry, "run_evaluators", slow_evaluators)
    monkeypatch.setattr(Checkpointer, "save", slow_save)
    extra = {
        "train.num_steps": 6,
        "train.log_every": 2,
        "checkpoint.every_steps": 2,
        "evals.retrieval.every_steps": 2,
        "train.show_top_words": 0,
    }
    config = configlib.load_config(local_cluster.TINY_CONFIG, local_cluster.overrides(data_dir, **extra))
    del config.evals["patchdis"]
    workdir = str(tmp_path / "work")
    train.run(config, workdir)
    assert calls == [("eval", 2), ("save", 2), ("eval", 4), ("save", 4), ("save", 6)]
    rows = {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r}
    for step in (4, 6):  # the intervals after an evaluation and a save
        assert rows[step]["step_time_s"] < slow / 2, rows[step]
        assert rows[step]["samples_per_s"] == pytest.approx(16 / rows[step]["step_time_s"], rel=1e-6)


def _cli(capsys, *args) -> tuple[int, str, str]:
    from lexvla_jax import cli

    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_eval_explain_and_export_read_the_trained_checkpoint(uninterrupted, data_dir, tmp_path, capsys):
    """`lexvla eval`, `explain` and `export` restore the run's checkpoint and agree with its final evaluation."""
    workdir = str(uninterrupted[0])
    config_args = ["--config", local_cluster.TINY_CONFIG]
    config_args += [f"--config.{o}" for o in local_cluster.overrides(data_dir)]
    code, out, err = _cli(capsys, "eval", *config_args, "--workdir", workdir)
    assert code == 0, err
    written = json.loads(open(os.path.join(workdir, "eval", f"step_{STEPS}.json")).read())["metrics"]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    final = [r for r in rows if "retrieval/dense/i2t_r@1" in r][-1]
    for key in ("retrieval/dense/i2t_r@1", "retrieval/threshold/t2i_r@5", "patchdis/miou"):
        assert written[key] == pytest.approx(final[key], abs=1e-6), key  # same parameters, same numbers
    assert "Retrieval (%)" in out and "wrote " in out

    image = os.path.join(tmp_path, "image.png")
    with open(os.path.join(data_dir, "eval", "shard-00000.tar"), "rb") as f:
        from lexvla_jax.data.tar_reader import iter_samples

        sample = next(iter_samples(f))
    with open(image, "wb") as f:
        f.write(sample.files["jpg"])
    code, out, err = _cli(
        capsys, "explain", *config_args, "--workdir", workdir, "--image", image, "--out", str(tmp_path)
    )
    assert code == 0, err
    pngs = [line.split()[-1] for line in out.splitlines() if line.strip().endswith(".png")]
    assert pngs and all(os.path.getsize(p) > 0 for p in pngs)

    code, out, err = _cli(capsys, "export", *config_args, "--workdir", workdir, "--out", str(tmp_path / "sparse"))
    assert code == 0, err
    lines = [
        line for part in parts.part_files(tmp_path / "sparse" / "images") for line in part.read_text().splitlines()
    ]
    assert len(lines) == 24 and all(json.loads(line)["vector"] for line in lines)


@pytest.mark.slow
def test_search_finds_with_the_trained_model(uninterrupted, data_dir, tmp_path, capsys):
    """image → text on the trained model's exported captions: the model's vector of an image file finds what the
    image's exported vector finds (same words, scores within quantisation); Seismic (re-ranking every candidate)
    finds what exact search does."""
    workdir, sparse = str(uninterrupted[0]), tmp_path / "sparse"
    model = ["--config", local_cluster.TINY_CONFIG, *(f"--config.{o}" for o in local_cluster.overrides(data_dir))]
    model += ["--workdir", workdir]
    code, _, err = _cli(capsys, "export", *model, "--out", str(sparse))
    assert code == 0, err
    assert _cli(capsys, "index", str(sparse / "captions"), "--threads", "1")[0] == 0
    image_record = json.loads(parts.part_files(sparse / "images")[0].read_text().splitlines()[0])
    image = os.path.join(tmp_path, "image.png")
    with open(os.path.join(data_dir, "eval", "shard-00000.tar"), "rb") as f:
        from lexvla_jax.data.tar_reader import iter_samples

        sample = next(iter_samples(f))  # the first exported image
    with open(image, "wb") as f:
        f.write(sample.files["jpg"])
    search = ["search", "--index", str(sparse / "captions"), "-k", "5"]
    code, out, err = _cli(capsys, *search, "--method", "exact", "--query-image", image, *model)
    assert code == 0, err
    by_model = out.splitlines()
    by_id = {}
    for method in ("exact", "seismic"):
        query = ["--query-id", image_record["id"], "--queries", str(sparse / "images"), "--method", method]
        code, out, err = _cli(capsys, *search, *query)
        assert code == 0, err
        by_id[method] = out.splitlines()
    assert by_id["seismic"][1:] == by_id["exact"][1:] and len(by_id["exact"]) == 6
    n_words = len(image_record["vector"])
    for lines in (by_model, by_id["exact"]):
        assert lines[0].endswith(f", {n_words} words; exact search of 120 vectors")
    scores = [[float(line.split()[2]) for line in lines[1:]] for lines in (by_model, by_id["exact"])]
    np.testing.assert_allclose(scores[0], scores[1], atol=2e-3)


@pytest.mark.slow
def test_python_api_reads_the_trained_parameters_without_an_optimizer(uninterrupted, data_dir, monkeypatch):
    """`lexvla_jax.load(workdir)`: the config saved with the checkpoint, only the trained parameters (bit for bit
    those of the train state), no optimiser and no train step; the encoder reads images and texts as words."""
    import lexvla_jax
    from lexvla_jax import explain, optim

    never = lambda *a, **k: pytest.fail("reading a model must not make an optimiser or a train step")  # noqa: E731
    monkeypatch.setattr(optim, "make_optimizer", never)
    monkeypatch.setattr(step_lib, "jit_train_step", never)
    workdir = str(uninterrupted[0])
    model = lexvla_jax.load(workdir)
    saved = _flat_params(local_cluster.final_state(workdir, STEPS)["params"])
    loaded = _flat_params(nnx.to_pure_dict(model.params))
    assert sorted(loaded) == sorted(saved) and len(saved) > 10
    for key, value in saved.items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), value, err_msg=str(key))

    with open(os.path.join(data_dir, "eval", "shard-00000.tar"), "rb") as f:
        jpegs = [sample.files["jpg"] for _, sample in zip(range(3), iter_samples(f), strict=False)]
    images = np.stack([np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in jpegs])
    s_img, s_txt = model.encode_images(images), model.encode_texts(["a small red circle", "a large blue square"])
    assert s_img.shape == (3, len(model.kept_ids)) and s_txt.shape == (2, len(model.kept_ids))
    np.testing.assert_allclose(np.linalg.norm(s_img, axis=1), 1.0, rtol=1e-5)
    top = model.top_words(s_txt[0], k=5)
    assert top == explain.top_words(s_txt[0], model.kept_ids, model.tokenizer, 5)
    assert [w for w, _ in top] == [model.words[j] for j in np.argsort(-s_txt[0], kind="stable")[:5]]
    assert all(a >= b for (_, a), (_, b) in zip(top, top[1:], strict=False))


def _flat_params(tree) -> dict:
    """`{path: array}` of a nested parameter dict, with NNX's `value` leaf level dropped."""
    flat = {}
    for path, value in flatten_dict(tree).items():
        flat[tuple(str(k) for k in path if k != "value")] = value
    return flat
