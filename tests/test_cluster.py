"""SLURM task environment → `local_device_ids` for `jax.distributed.initialize`."""

import os

import pytest

from lexvla_jax import cluster

# One node of two, four GPUs each: what srun exports to a task (plus what each test adds).
STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NODEID": "1",
}


def task(local_id: int, tasks_per_node: str, visible: str | None, **extra) -> dict:
    env = {**STEP, "SLURM_LOCALID": str(local_id), "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, **extra}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return env


@pytest.mark.parametrize("local_id", range(4))
def test_one_task_per_gpu_drives_its_local_id(local_id):
    assert cluster.slurm_local_device_ids(task(local_id, "4(x2)", "0,1,2,3")) == [local_id]


def test_one_task_per_node_drives_every_visible_gpu():
    assert cluster.slurm_local_device_ids(task(0, "1(x2)", "0,1,2,3")) == [0, 1, 2, 3]


def test_gpus_split_evenly_over_tasks():
    assert cluster.slurm_local_device_ids(task(1, "2(x2)", "0,1,2,3")) == [2, 3]


@pytest.mark.parametrize("local_id", range(4))
def test_gpus_per_task_binding_uses_the_tasks_own_gpus(local_id):
    # --gpus-per-task=1: each task sees one GPU (its physical index, or 0 under cgroup isolation).
    env = task(local_id, "4(x2)", str(local_id), SLURM_GPUS_PER_TASK="1")
    assert cluster.slurm_local_device_ids(env) == [0]
    # JAX's own detection would ask for ordinal `local_id`, which does not exist for local_id > 0.


def test_two_gpus_per_task_binding():
    env = task(1, "2(x2)", "2,3", SLURM_TRES_PER_TASK="gres/gpu:2")
    assert cluster.slurm_local_device_ids(env) == [0, 1]


def test_binding_inferred_from_fewer_gpus_than_tasks():
    assert cluster.slurm_local_device_ids(task(3, "4(x2)", "3")) == [0]


def test_uneven_split_is_a_one_line_error():
    with pytest.raises(cluster.ClusterError, match="6 visible GPUs .* 4 tasks") as info:
        cluster.slurm_local_device_ids(task(0, "4(x2)", "0,1,2,3,4,5"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "env",
    [
        {},  # not SLURM
        task(0, "4(x2)", None),  # no CUDA_VISIBLE_DEVICES: JAX decides
        task(0, "4(x2)", "NoDevFiles"),  # SLURM's value when no GPU was allocated
        task(2, "4(x2)", "0,1,2,3", JAX_LOCAL_DEVICE_IDS="2"),  # JAX reads its own override
    ],
)
def test_none_leaves_the_choice_to_jax(env):
    assert cluster.slurm_local_device_ids(env) is None
    assert cluster.distributed_kwargs(env) == {}


def test_distributed_kwargs():
    assert cluster.distributed_kwargs(task(0, "1(x2)", "0,1")) == {"local_device_ids": [0, 1]}


@pytest.mark.parametrize(
    ("spec", "node", "expected"),
    [("8", "0", 8), ("4(x2)", "1", 4), ("4(x2),3", "2", 3), ("2,1(x3)", "3", 1)],
)
def test_tasks_on_node_reads_slurms_compressed_list(spec, node, expected):
    assert cluster.tasks_on_node({"SLURM_TASKS_PER_NODE": spec, "SLURM_NODEID": node}) == expected


def test_step_tasks_per_node_wins_over_the_jobs():
    env = {"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "0"}
    assert cluster.tasks_on_node(env) == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLURM_TASKS_PER_NODE": "4x2"}, "cannot read SLURM tasks per node"),
        ({"SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
    ],
)
def test_tasks_on_node_errors(env, message):
    with pytest.raises(cluster.ClusterError, match=message):
        cluster.tasks_on_node(env)


def test_auto_mode_passes_the_tasks_gpus_to_jax(monkeypatch):
    """`config.dist.mode=auto` under SLURM with GPUs bound per task: JAX gets the task's own GPU, not its local id."""
    import jax

    from lexvla_jax import sharding

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    for key in [k for k in os.environ if k.startswith(("SLURM_", "CUDA_VISIBLE", "JAX_LOCAL"))]:
        monkeypatch.delenv(key)
    for key, value in task(3, "4(x2)", "5", SLURM_GPUS_PER_TASK="1").items():
        monkeypatch.setenv(key, value)
    sharding.initialize_distributed({"mode": "auto"})
    assert calls == [{"local_device_ids": [0]}]  # JAX alone would ask for GPU 3 of the one visible
    monkeypatch.delenv("SLURM_LOCALID")  # not a SLURM task: JAX decides everything
    sharding.initialize_distributed({"mode": "auto"})
    assert calls[1] == {}
