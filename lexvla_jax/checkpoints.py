"""Orbax checkpoints of a training run: train state, data-iterator position, config and vocabulary, together.

The directory is any `etils.epath` path (local, `gs://`, ...): orbax writes through tensorstore, so a
remote workdir never becomes a local folder. Saves are asynchronous (arrays are copied to host, then
written in the background), keep the last N, and restore onto whatever mesh the abstract target carries —
a run can resume on a different mesh or process count. The kept vocabulary (token ids and words) is saved
with every step and checked on restore: codebook rows mean words only under the same vocabulary.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lexvla_jax.configlib import ConfigError, first_line
from lexvla_jax.data import streams
from lexvla_jax.text.tokenizer import Tokenizer


class CheckpointNotFound(ConfigError):
    """No checkpoint where one was asked for; the message is one line with the fix."""


class VocabularyMismatch(ConfigError):
    """A checkpoint trained on another kept vocabulary than the tokenizer gives now; one line."""


class CheckpointFailed(ConfigError):
    """Orbax could not read or write a checkpoint; one line naming the directory and what to change."""


# What to change when a checkpoint cannot be restored: it was written for another model, or is damaged.
RESTORE_HINT = (
    "run with the config it was trained with (config.model, config.train.trainable), or start a new --workdir"
)


@contextlib.contextmanager
def _one_line(what: str, hint: str):
    """Turns orbax / tensorstore / OS errors inside into `CheckpointFailed`; one-line errors pass through."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        raise CheckpointFailed(f"{what} failed ({first_line(e)}); {hint}") from e


def workdir_path(workdir: str) -> epath.Path:
    """`workdir` as an epath (local paths made absolute, remote ones untouched)."""
    path = epath.Path(workdir)
    return path.absolute() if "://" not in str(workdir) else path


def vocabulary_record(tokenizer: Tokenizer, kept_ids: np.ndarray, tokenizer_path: str) -> dict:
    """What is saved of the kept vocabulary: the tokenizer path, its size, the ids and their words."""
    return {
        "tokenizer": str(tokenizer_path),
        "tokenizer_size": int(tokenizer.vocab_size),
        "ids": [int(i) for i in kept_ids],
        "words": [tokenizer.id_to_piece(int(i)) for i in kept_ids],
    }


class Checkpointer:
    """`save` / `restore` of (state, data iterator, config, vocabulary) under `workdir/checkpoints/<step>`."""

    def __init__(
        self, workdir: str, *, every_steps: int, keep: int | None, async_save: bool = True, create: bool = True
    ):
        self.directory = workdir_path(workdir) / "checkpoints"
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=create)
        with _one_line(f"opening {self.directory}", "set --workdir to a directory this process can write"):
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "data": streams.StreamsCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(),
                    "vocab": ocp.JsonCheckpointHandler(),
                },
            )

    def _restoring(self, step: int, item: str):
        return _one_line(f"restoring the {item} of checkpoint step {step} in {self.directory}", RESTORE_HINT)

    def _writing(self, what: str):
        hint = "check that --workdir is writable and has free space"
        return _one_line(f"{what} under {self.directory}", hint)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether `step` is on the checkpoint cadence."""
        return step % self.every_steps == 0

    def save(self, step: int, state, data_iterator, config_dict: dict, vocabulary: dict) -> None:
        """Starts an (asynchronous) save of step `step`."""
        args = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(json.loads(json.dumps(config_dict))),
            "vocab": ocp.args.JsonSave(vocabulary),
        }
        if data_iterator is not None:
            args["data"] = streams.StreamsSave(data_iterator)
        with self._writing(f"saving checkpoint step {step}"):
            self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def check_vocabulary(self, step: int, tokenizer: Tokenizer, kept_ids: np.ndarray, tokenizer_path: str):
        """Raises `VocabularyMismatch` when step `step` was trained on another kept vocabulary."""
        with self._restoring(step, "vocabulary"):
            saved = self.manager.restore(step, args=ocp.args.Composite(vocab=ocp.args.JsonRestore()))["vocab"]
        if saved["ids"] == [int(i) for i in kept_ids]:
            return
        raise VocabularyMismatch(
            f"checkpoint step {step} in {self.directory} was trained on {len(saved['ids'])} kept words of "
            f"{saved['tokenizer']} ({saved['tokenizer_size']} pieces) but {tokenizer_path} gives "
            f"{len(kept_ids)} of {tokenizer.vocab_size}; set config.data.tokenizer (and the vocabulary filter) "
            "to what the checkpoint was trained with"
        )

    def restore_data(self, step: int, data_iterator) -> None:
        """Repositions `data_iterator` where step `step` left it; `DataConfigError` (one line) when the saved
        streams cannot be continued exactly with this run's `num_streams` / `num_workers`."""
        with self._restoring(step, "data position"):
            self.manager.restore(step, args=ocp.args.Composite(data=streams.StreamsRestore(data_iterator)))

    def restore(self, step: int, abstract_state):
        """The train state of step `step`, in the shardings of `abstract_state` (any mesh, any process count)."""
        with self._restoring(step, "train state"):
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        return restored["state"]

    def restore_params(self, step: int, abstract_params):
        """Only the trainable parameters of step `step` (the optimiser's moments are not read), in the shardings
        of `abstract_params`: what reading a trained model needs, without an optimiser or a train step."""
        target = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        # The train state is saved in the PyTree format; a reader of that format restores a subtree of it.
        reader = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(create=False, read_only=True),
            item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        )
        try:
            with self._restoring(step, "trained parameters"):
                return reader.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
        finally:
            reader.close()

    def restore_config(self, step: int) -> dict:
        """The config dict saved with step `step`."""
        with self._restoring(step, "config"):
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        """Waits for the pending asynchronous save; its failure is raised here."""
        with self._writing("writing a checkpoint"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
