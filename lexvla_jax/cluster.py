"""Which local GPUs a SLURM task drives: `local_device_ids` for `jax.distributed.initialize`.

JAX detects SLURM by itself (coordinator from `SLURM_STEP_NODELIST` and the job id, process count and
id from `SLURM_NTASKS` / `SLURM_PROCID`), but it gives every task `local_device_ids=[SLURM_LOCALID]`.
That is right only for one task per GPU with every GPU of the node visible to every task. It is wrong

- with one task per node (each task should drive all of its visible GPUs, not only the first), and
- with `--gpus-per-task` (SLURM then binds each task to its own GPUs, so `CUDA_VISIBLE_DEVICES` lists
  only those and the task's `SLURM_LOCALID`-th GPU does not exist: "invalid device ordinal").

`slurm_local_device_ids` reads the task's environment and returns ordinals into the task's visible GPUs:

- not a SLURM task, no `CUDA_VISIBLE_DEVICES`, or `JAX_LOCAL_DEVICE_IDS` set (JAX reads that itself):
  None, JAX decides;
- bound to its GPUs (`SLURM_GPUS_PER_TASK`, or `gpu` in `SLURM_TRES_PER_TASK`, or fewer visible GPUs
  than tasks on the node): all visible GPUs, `[0, ..., n-1]`;
- otherwise the node's visible GPUs are split evenly over its tasks, in `SLURM_LOCALID` order
  (`[localid]` for one task per GPU, all of them for one task per node).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lexvla_jax.configlib import ConfigError


class ClusterError(ConfigError):
    """A SLURM layout whose GPUs cannot be split over its tasks; the message is one line."""


def tasks_on_node(env: Mapping[str, str]) -> int:
    """Tasks of this job step on this node, from SLURM's compressed per-node list (e.g. `4(x2),3`)."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return int(env.get("SLURM_NTASKS_PER_NODE", "1"))
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ClusterError(f"cannot read SLURM tasks per node {spec!r}; expected e.g. '4(x2),3'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    if node >= len(counts):
        raise ClusterError(f"SLURM_NODEID={node} but tasks per node {spec!r} lists {len(counts)} nodes")
    return counts[node]


def visible_gpus(env: Mapping[str, str]) -> list[str] | None:
    """The entries of `CUDA_VISIBLE_DEVICES` (indices or UUIDs); None when unset or SLURM's `NoDevFiles`."""
    value = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not value or value == "NoDevFiles":
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _bound_per_task(env: Mapping[str, str], num_visible: int, num_tasks: int) -> bool:
    return (
        "SLURM_GPUS_PER_TASK" in env
        or "gpu" in env.get("SLURM_TRES_PER_TASK", "")
        or (num_tasks > 1 and num_visible < num_tasks)
    )


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """Ordinals (into this task's visible GPUs) the task should drive; None to let JAX decide."""
    if "SLURM_LOCALID" not in env or "SLURM_STEP_NODELIST" not in env or env.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    gpus = visible_gpus(env)
    if gpus is None:
        return None
    num_tasks = tasks_on_node(env)
    if _bound_per_task(env, len(gpus), num_tasks):
        return list(range(len(gpus)))
    if len(gpus) % num_tasks:
        raise ClusterError(
            f"{len(gpus)} visible GPUs (CUDA_VISIBLE_DEVICES) cannot be split over {num_tasks} tasks on this node; "
            "run one task per GPU or one per node"
        )
    per_task = len(gpus) // num_tasks
    local_id = int(env["SLURM_LOCALID"])
    return list(range(local_id * per_task, (local_id + 1) * per_task))


def distributed_kwargs(env: Mapping[str, str]) -> dict:
    """Extra keyword arguments for `jax.distributed.initialize()` in "auto" mode ({} when JAX's own are right)."""
    ids = slurm_local_device_ids(env)
    return {} if ids is None else {"local_device_ids": ids}
