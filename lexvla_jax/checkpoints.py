"""Orbax checkpoints of a training run: train state, data-iterator position and the config, saved together.

Saves are asynchronous (arrays are copied to host, then written in the background), keep the last N,
and restore onto whatever mesh the abstract target carries — a run can resume on a different mesh.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """`save` / `restore` of (state, data iterator, config) under `workdir/checkpoints/<step>`."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `step` is on the checkpoint cadence."""
        return step % self.every_steps == 0

    def save(self, step: int, state, data_iterator, config_dict: dict) -> None:
        """Starts an (asynchronous) save of step `step`."""
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(json.loads(json.dumps(config_dict)))}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores the state into the shardings of `abstract_state` and repositions `data_iterator`."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster announced a preemption (TPU maintenance events); multi-host runs only."""
        if jax.process_count() == 1:
            return False
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
