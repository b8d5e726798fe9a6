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
import os
import re
import signal
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lexvla_jax.configlib import ConfigError, first_line
from lexvla_jax.data import streams
from lexvla_jax.text.tokenizer import Tokenizer


class CheckpointNotFound(ConfigError):
    """No checkpoint where one was asked for; the message is one line with the fix."""


class VocabularyMismatch(ConfigError):
    """A checkpoint trained on another kept vocabulary than the tokenizer gives now; one line."""


class CheckpointFailed(ConfigError):
    """Orbax could not read or write a checkpoint; one line naming the directory and what to change."""


class CheckpointDamaged(CheckpointFailed):
    """A checkpoint whose files cannot be read (damaged or partial data), told apart from a config mismatch."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# What to change when a checkpoint that reads cannot be restored: it was written for another model.
RESTORE_HINT = (
    "run with the config it was trained with (config.model, config.train.trainable), or start a new --workdir"
)
DAMAGED = "damaged"  # WORKDIR/damaged/<step>: checkpoints set aside because they cannot be read
# What tensorstore, orbax and the JSON readers say when stored bytes cannot be read (not: do not fit the target).
_UNREADABLE = re.compile(
    r"Error reading|DATA_LOSS|[Cc]orrupt|Encountered error while reading|NOT_FOUND|Unexpected end|"
    r"Expecting value|Unterminated string|Invalid control character|No such file"
)


def _unreadable(error: BaseException) -> str | None:
    """The innermost message of `error`'s chain that says stored bytes cannot be read, else None."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _UNREADABLE.search(str(error)) or isinstance(error, (FileNotFoundError, json.JSONDecodeError)):
            found = first_line(error)
        error = error.__cause__ or error.__context__
    return found


@contextlib.contextmanager
def _one_line(what: str, hint: str, damaged: tuple[int, str] | None = None):
    """Turns orbax / tensorstore / OS errors inside into `CheckpointFailed`, or, for unreadable data of a checkpoint
    `damaged = (step, message)`, into `CheckpointDamaged`; one-line errors pass through."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        unreadable = _unreadable(e) if damaged is not None else None
        if unreadable is not None:
            raise CheckpointDamaged(f"{damaged[1]} ({unreadable})", damaged[0]) from e
        raise CheckpointFailed(f"{what} failed ({first_line(e)}); {hint}") from e


def _any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (a collective when there are several)."""
    if jax.process_count() == 1:
        return flag

    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _move_tree(source: epath.Path, target: epath.Path) -> None:
    """Moves a directory: one rename on a filesystem; on an object store (no directories to rename), a copy of
    every file, then the source removed."""
    if "://" not in str(source):
        source.rename(target)
        return

    def copy_tree(folder: epath.Path, to: epath.Path) -> None:
        to.mkdir(parents=True, exist_ok=True)
        for child in folder.iterdir():
            if child.is_dir():
                copy_tree(child, to / child.name)
            else:
                child.copy(to / child.name)

    copy_tree(source, target)
    source.rmtree()


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


KILL_POINTS = ("before", "during", "after")  # of the array writes of a save: `config.checkpoint.debug_kill_save`


def parse_kill_save(value) -> tuple[int, str] | None:
    """`config.checkpoint.debug_kill_save` → (step, point) or None; `()` is off."""
    if not value:
        return None
    if len(value) == 2 and isinstance(value[0], int) and value[1] in KILL_POINTS:
        return int(value[0]), str(value[1])
    raise ConfigError(
        f"config.checkpoint.debug_kill_save={tuple(value)!r}: use (step, point) with point one of "
        f"{', '.join(KILL_POINTS)}, or () for off"
    )


def _kill_self(step: int, point: str) -> None:
    print(
        f"process {jax.process_index()}: debug_kill_save: SIGKILL at step {step}, {point} the array writes",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGKILL)


class _KillAfter:
    """A commit future that waits for the save's array writes, then kills the process (before orbax finalises)."""

    def __init__(self, futures, step: int):
        self.futures, self.step = list(futures or []), step

    def result(self, timeout=None):
        for f in self.futures:
            f.result(timeout=timeout)
        _kill_self(self.step, "after")


def _crash_test(handler: ocp.StandardCheckpointHandler, kill_at: tuple[int, str], saving_step) -> None:
    """Wraps `handler.async_save` so that step `kill_at[0]`'s save SIGKILLs this process at `kill_at[1]`, as a lost
    machine would: before the array writes start (the temporary directory exists), during them (writes issued,
    not finished) or after them (before orbax finalises the save). `saving_step()` names the step being saved."""
    save = handler.async_save

    async def async_save(directory, *args, **kwargs):
        step = saving_step()
        point = kill_at[1] if step == kill_at[0] else None
        if point == "before":
            if not isinstance(directory, epath.Path):
                await directory.await_creation()
            _kill_self(step, point)
        futures = await save(directory, *args, **kwargs)
        if point == "during":
            _kill_self(step, point)
        return [_KillAfter(futures, step)] if point == "after" else futures

    handler.async_save = async_save


class Checkpointer:
    """`save` / `restore` of (state, data iterator, config, vocabulary) under `workdir/checkpoints/<step>`."""

    def __init__(
        self,
        workdir: str,
        *,
        every_steps: int,
        keep: int | None,
        async_save: bool = True,
        create: bool = True,
        kill_at: tuple[int, str] | None = None,
    ):
        """`kill_at`: a crash test (`parse_kill_save`), SIGKILL at one point of one save."""
        self.directory = workdir_path(workdir) / "checkpoints"
        self.every_steps = every_steps
        self.saving_step: int | None = None
        state_handler = ocp.StandardCheckpointHandler()
        if kill_at:
            _crash_test(state_handler, kill_at, lambda: self.saving_step)
        # A save cut short (SIGKILL, a lost machine) leaves a temporary directory orbax never reads; on opening
        # for training (`create`) such directories are removed (`partial_saves` names them first).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=create, cleanup_tmp_directories=create
        )
        self.partial_saves = self._partial_saves()
        with _one_line(f"opening {self.directory}", "set --workdir to a directory this process can write"):
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    "state": state_handler,
                    "data": streams.StreamsCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(),
                    "vocab": ocp.JsonCheckpointHandler(),
                },
            )

    def _restoring(self, step: int, item: str):
        what = f"restoring the {item} of checkpoint step {step} in {self.directory}"
        damaged = f"checkpoint step {step} in {self.directory} is damaged: its {item} cannot be read"
        return _one_line(what, RESTORE_HINT, (step, damaged))

    def _writing(self, what: str):
        hint = "check that --workdir is writable and has free space"
        return _one_line(f"{what} under {self.directory}", hint)

    def _partial_saves(self) -> list[str]:
        """Names of saves cut short under the checkpoint directory (orbax's temporary directories)."""
        if not self.directory.exists():
            return []
        return sorted(p.name for p in self.directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)

    def set_aside(self, step: int) -> epath.Path:
        """Moves checkpoint `step` to `WORKDIR/damaged/<step>` (never deleted); the main process moves it."""
        target = self.directory.parent / DAMAGED / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = target.with_name(f"{step}-{len(list(target.parent.iterdir()))}")
            _move_tree(self.directory / str(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        return target

    def newest_readable(self, step: int | None, restore, log) -> tuple[object, int | None]:
        """`(restore(s), s)` for the newest checkpoint `s <= step` that reads; a damaged one is set aside (one line
        each). Every process decides alike: a checkpoint damaged for one process is set aside by all."""
        while step is not None:
            try:
                result, error = restore(step), None
            except CheckpointDamaged as e:
                result, error = None, e
            if not _any_process(error is not None):
                return result, step
            older = [s for s in self.all_steps() if s < step]
            target = self.set_aside(step)
            reason = error if error is not None else f"checkpoint step {step} is damaged on another process"
            following = f"resuming from step {max(older)}" if older else "no older checkpoint: starting anew"
            log(f"{reason}; moved it to {target}; {following}")
            step = max(older) if older else None
        return None, None

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
        self.saving_step = step
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
