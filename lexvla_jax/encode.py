"""Encoding a collection into sparse part files on the config's mesh: every device of every process, resumable.

Each step, every process feeds its next local batch (padded to a fixed size; a process whose share is used up
feeds padding) into one jitted function over the global batch, sharded on the mesh's batch axes. The function
returns the quantised impacts `round(scale · sparsify(s))` `[B, V']` sharded the same way, and each process
reads back only its own rows and appends them to its open part (`sparse/parts.py`). The step's row counts are
all-gathered, so every process runs the same steps and stops at the same one. After `part_size` rows a process
completes its part and records it, with its data position, in its ledger; run again, it restores that position
and continues after its last recorded part (a part renamed but not yet recorded, from a kill between the two, is
deleted and written again). Host memory holds the batch on the devices, the batch being read and one open part's
file buffer, whatever the collection's size.

Crash test: `LEXVLA_DEBUG_KILL_ENCODE=KIND:N` SIGKILLs each process once its part N of KIND is renamed and before its
ledger records it, the worst moment for a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from etils import epath
from jax.experimental import multihost_utils

from lexvla_jax import losses, sharding
from lexvla_jax.configlib import ConfigError
from lexvla_jax.data.device_batch import make_global_batch
from lexvla_jax.sparse import parts

DEFAULT_PART_SIZE = 100_000
KILL_ENV = "LEXVLA_DEBUG_KILL_ENCODE"


def config_digest(config) -> str:
    """sha256 of what decides a vector: the model config and the data settings that shape inputs."""
    fields = ("image_size", "resample", "prompt_template", "max_caption_tokens", "max_length")
    relevant = {"model": config.model.to_dict(), "data": {k: config.data.get(k) for k in fields}}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_settings(config, step: int, words, *, threshold, top_k, scale: int, compress: bool) -> dict:
    """The settings a collection is written with; a rerun into the same OUT must have the same ones."""
    return {
        "step": int(step),
        "config_digest": config_digest(config),
        "scale": int(scale),
        "sparsification": {"threshold": threshold, "top_k": top_k},
        "process_count": jax.process_count(),
        "num_workers": int(config.data.num_workers),
        "compress": bool(compress),
        "words": list(words),
    }


def check_settings(out: str, saved: dict, settings: dict) -> None:
    """A one-line error when `OUT/meta.json` was written with other settings than this run's (those given)."""
    for field, now in settings.items():
        before = saved.get(field)
        if before == now:
            continue
        if field == "words":
            before, now = f"a vocabulary of {len(before or [])} words", f"{len(now)} words"
        hint = "run it with the process count that started it" if field == "process_count" else "pass another --out"
        raise ConfigError(f"{out} was encoded with {field}={before}, this run has {now}: {hint}")


def _all(values: np.ndarray) -> np.ndarray:
    """`values` of every process stacked `[P, ...]` (an all-gather; every process must call it)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class DeviceEncoder:
    """A `LexicalEncoder`'s model as jitted functions from global batches to impacts sharded on the batch axes."""

    def __init__(self, encoder, *, threshold: float | None, top_k: int | None, scale: int, batch_size: int):
        self.encoder, self.mesh, self.rules = encoder, encoder.mesh, encoder.rules
        dp = sharding.data_parallel_size(self.mesh, self.rules)
        per = dp * jax.process_count() // np.gcd(dp, jax.process_count())
        self.global_batch = -(-batch_size // per) * per
        self.local_batch = self.global_batch // jax.process_count()
        out = sharding.batch_sharding(self.mesh, self.rules)
        model = encoder.model

        def impacts(s):
            kept = losses.sparsify(s.astype(jnp.float32), threshold=threshold, top_k=top_k)
            return jnp.rint(kept * scale).astype(jnp.int32)

        def images(params, frozen, rest, image):
            m = model.merge(params, frozen, rest)
            return impacts(m.encode_image(m.normalize(image)))

        def texts(params, frozen, rest, input_ids, attention_mask):
            return impacts(model.merge(params, frozen, rest).encode_text(input_ids, attention_mask))

        self.functions = {"images": jax.jit(images, out_shardings=out), "texts": jax.jit(texts, out_shardings=out)}
        size = encoder.image_size
        self.padding = {"images": {"image": np.zeros((1, size, size, 3), np.uint8)}}

    def _padding(self, kind: str) -> dict:
        """One row of each input of `kind`, repeated to fill a short batch (an image of zeros, the text "a")."""
        if kind not in self.padding:
            filler = self.encoder.prompt.batch(["a"])
            self.padding[kind] = {name: filler[name][:1] for name in ("input_ids", "attention_mask")}
        return self.padding[kind]

    def __call__(self, kind: str, batch: dict | None) -> np.ndarray:
        """This process's rows (its `batch`, or none) → int32 impacts of those rows (all processes call it)."""
        return local_rows(self.dispatch(kind, batch))[: len(batch["key"]) if batch else 0]

    def dispatch(self, kind: str, batch: dict | None) -> jax.Array:
        """Starts encoding this process's rows (or padding only) on the devices; returns the global impacts
        `[global_batch, V']` without waiting for them (read this process's rows with `local_rows`)."""
        rows = len(batch["key"]) if batch else 0
        local = {}
        for name, pad in self._padding(kind).items():
            value = batch[name] if rows else pad[:0]
            fill = np.repeat(pad, self.local_batch - rows, axis=0)
            local[name] = np.concatenate([np.asarray(value, pad.dtype), fill]) if rows < self.local_batch else value
        with sharding.use_mesh_rules(self.mesh, self.rules):
            arrays = make_global_batch(local, self.mesh, self.rules)
            enc = self.encoder
            return self.functions[kind](enc.params, enc.frozen, enc.rest, *arrays.values())


def local_rows(array: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array held by this process's devices, in order."""
    blocks = {}
    for shard in array.addressable_shards:
        blocks.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def format_duration(seconds: float) -> str:
    """`HH:MM:SS`, with the whole days in front from 24 h on: `1d 01:00:00`."""
    rest = int(round(seconds))
    days, rest = divmod(rest, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, rest = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{rest:02d}"


@dataclasses.dataclass
class Progress:
    """Rate and ETA over every process, printed by process 0 every `every_seconds`; the final line says how many
    vectors this run encoded (the rest were there before it)."""

    kind: str
    done: int
    expected: int | None
    devices: int
    every_seconds: float = 10.0
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self):
        self.start = self.last = self.clock()
        self.first = self.done

    def update(self, rows: int, skipped: int, final: bool = False) -> None:
        self.done += rows
        now = self.clock()
        if not (final or now - self.last >= self.every_seconds) or jax.process_index() != 0:
            return
        self.last = now
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        this_run = f" ({self.done - self.first:,} this run)" if final else ""
        line = f"{self.kind}: {self.done:,} vectors{this_run}, {rate:.1f}/s ({rate / self.devices:.1f}/s per device)"
        line += f", {skipped:,} skipped"
        if self.expected and not final and rate > 0:
            left = max(self.expected - self.done - skipped, 0)
            line += f", ETA {format_duration(left / rate)}"
        print(line, flush=True)


def parse_kill_part(value: str | None) -> tuple[str, int] | None:
    """`$LEXVLA_DEBUG_KILL_ENCODE` (`KIND:N`) → (kind, N); None when unset or empty."""
    if not value:
        return None
    kind, _, number = value.partition(":")
    if kind and number.isdigit():
        return kind, int(number)
    raise ConfigError(
        f"{KILL_ENV}={value!r}: use KIND:N (e.g. images:1) to SIGKILL once part N of KIND is renamed, before its "
        "ledger records it; unset it for no crash"
    )


def _kill_self(kind: str, number: int) -> None:
    print(
        f"process {jax.process_index()}: {KILL_ENV}: SIGKILL after part {number} of {kind} was renamed, before "
        "the ledger records it",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGKILL)


def encode_kind(out: str, kind: str, source, device: DeviceEncoder, *, part_size: int, expected: int | None,
                compress: bool, log_seconds: float = 10.0) -> dict:  # fmt: skip
    """Encodes this process's share of `source` into `OUT/KIND` (continuing its ledger); returns the totals
    over every process: vectors, parts and skips by reason."""
    process = jax.process_index()
    directory = epath.Path(out) / kind
    directory.mkdir(parents=True, exist_ok=True)
    ledger_path = directory / f"progress-{process:05d}.json"
    kill_at = parse_kill_part(os.environ.get(KILL_ENV))
    ledger = parts.read_json(ledger_path) or {"parts": 0, "vectors": 0, "state": None, "finished": False}
    writer = parts.PartWriter(directory, process, device.encoder.words, compress=compress, next_part=ledger["parts"])
    removed = [name for name in writer.remove_unrecorded() if not name.endswith(".tmp")]
    if removed:
        print(f"{out}/{kind}: process {process} deleted {', '.join(removed)} (renamed, not in its ledger)", flush=True)
    if ledger["state"] is not None:
        if not ledger["finished"]:
            print(f"{out}/{kind}: process {process} resumes after its {ledger['parts']} recorded parts "
                  f"({ledger['vectors']:,} vectors)", flush=True)  # fmt: skip
        source.set_state(ledger["state"])
    if not ledger["finished"]:
        getattr(source, "start_prefetch", lambda: None)()
    exhausted, vectors = ledger["finished"], ledger["vectors"]
    progress = Progress(kind, int(_all(np.int64(vectors)).sum()), expected, jax.device_count(), log_seconds)
    skip_counts = ledger["skipped"] if exhausted else source.skip_counts

    def record(finished: bool, state=None, counts=None) -> None:
        entry = {"parts": writer.next_part, "vectors": vectors, "finished": finished, "skipped": counts or skip_counts}
        parts.write_json(ledger_path, {**entry, "state": state})

    def complete_part(finished: bool, state=None, counts=None) -> None:
        """Renames the open part (if any), then records it in the ledger."""
        if writer.finish_part() is not None and kill_at == (kind, writer.next_part - 1):
            _kill_self(kind, writer.next_part - 1)
        record(finished, state, counts)

    def write(pending) -> None:
        """Writes a dispatched batch's rows; completes the part when it is full (with the data position after
        that batch: the next batch is already read, and a resume must read it again)."""
        nonlocal vectors
        batch, impacts, state, counts = pending
        writer.add(batch["key"], batch["content"], scipy.sparse.csr_array(local_rows(impacts)[: len(batch["key"])]))
        vectors += len(batch["key"])
        if writer.rows >= part_size:
            complete_part(False, state, counts)

    # One batch in flight: the devices encode batch k while the host writes batch k-1 and reads batch k+1.
    pending = None
    try:
        while True:
            batch = None if exhausted else next(source, None)
            exhausted = batch is None
            rows = len(batch["key"]) if batch else 0
            if batch is not None:
                skip_counts = source.skip_counts
            gathered = _all(np.array([rows, not exhausted, sum(skip_counts.values())], np.int64))
            if not gathered[:, :2].any():
                break
            current = None
            if gathered[:, 0].any():
                impacts = device.dispatch("images" if kind == "images" else "texts", batch if rows else None)
                if rows:
                    current = (batch, impacts, source.get_state(), dict(skip_counts))
            if pending is not None:
                write(pending)
            pending = current
            progress.update(int(gathered[:, 0].sum()), int(gathered[:, 2].sum()))
        if pending is not None:
            write(pending)
    finally:
        getattr(source, "close", lambda: None)()
    if not ledger["finished"]:
        skip_counts = source.skip_counts
    complete_part(finished=True)
    reasons = list(skip_counts)
    totals = _all(np.array([vectors, writer.next_part, *(skip_counts[r] for r in reasons)], np.int64)).sum(axis=0)
    progress.update(0, int(totals[2:].sum()), final=True)
    return {
        "vectors": int(totals[0]),
        "parts": int(totals[1]),
        "skipped": {r: int(n) for r, n in zip(reasons, totals[2:], strict=True)},
        "finished": True,
    }


def prepare_out(out: str, settings: dict) -> dict:
    """Checks `OUT/meta.json` against `settings` (or writes it: process 0); returns the meta."""
    path = epath.Path(out) / parts.META
    saved = parts.read_json(path)
    if saved is not None:
        check_settings(out, saved, settings)
    _barrier("lexvla-encode-meta-read")
    meta = saved or {**settings, "kinds": {}}
    if saved is None and jax.process_index() == 0:
        epath.Path(out).mkdir(parents=True, exist_ok=True)
        parts.write_json(path, meta)
    _barrier("lexvla-encode-meta-written")
    return meta


def check_before_restore(config, workdir: str, step: int | None, out: str, *, threshold=None, top_k=None,
                         scale: int, compress=False) -> None:  # fmt: skip
    """The settings check of `open_collection` for all but the vocabulary, before the model is built: a rerun
    against an existing OUT with another step or sparsification fails in a second, not after a restore."""
    saved = parts.read_json(epath.Path(out) / parts.META)
    if saved is None:
        return
    from lexvla_jax.checkpoints import Checkpointer

    sharding.initialize_distributed(config.dist)  # before anything asks JAX for the process count
    checkpointer = Checkpointer(workdir, every_steps=1, keep=None, async_save=False, create=False)
    try:
        step = checkpointer.latest_step() if step is None else step
    finally:
        checkpointer.close()
    if step is not None:
        settings = run_settings(config, step, [], threshold=threshold, top_k=top_k, scale=scale, compress=compress)
        check_settings(out, saved, {k: v for k, v in settings.items() if k != "words"})


def open_collection(config, encoder, step: int, out: str, *, threshold=None, top_k=None, scale: int, compress=False,
                    batch_size: int | None = None) -> tuple[dict, DeviceEncoder]:  # fmt: skip
    """`OUT/meta.json` checked against (or written with) this run's settings, and the device encoder."""
    settings = run_settings(config, step, encoder.words, threshold=threshold, top_k=top_k, scale=scale,
                            compress=compress)  # fmt: skip
    meta = prepare_out(out, settings)
    device = DeviceEncoder(encoder, threshold=threshold, top_k=top_k, scale=scale,
                           batch_size=batch_size or config.eval.batch_size)  # fmt: skip
    return meta, device


def finish_kind(out: str, meta: dict, kind: str, totals: dict) -> None:
    """Records a finished kind's totals in `OUT/meta.json` (process 0)."""
    meta["kinds"][kind] = totals
    if jax.process_index() == 0:
        parts.write_json(epath.Path(out) / parts.META, meta)
    _barrier(f"lexvla-encode-{kind}-finished")


def encode_collection(out: str, meta: dict, device: DeviceEncoder, sources: dict, *, part_size: int = DEFAULT_PART_SIZE,
                      compress: bool = False) -> dict:  # fmt: skip
    """Encodes each kind of `sources` (`{kind: () -> (source, expected count or None)}`) into `OUT/KIND` unless
    `meta` says it is finished; returns `{kind: totals}` of the kinds encoded now. Process 0 prints a line per kind."""
    encoded = {}
    for kind, make_source in sources.items():
        done = meta["kinds"].get(kind)
        if done and done.get("finished"):
            _say(f"{out}/{kind}: finished before ({done['vectors']:,} vectors); nothing to encode")
            continue
        source, expected = make_source()
        totals = encode_kind(out, kind, source, device, part_size=part_size, expected=expected, compress=compress)
        finish_kind(out, meta, kind, totals)
        skipped = {r: n for r, n in totals["skipped"].items() if n}
        _say(f"{out}/{kind}: {totals['vectors']:,} vectors in {totals['parts']} parts; skipped {skipped or 0}")
        encoded[kind] = totals
    return encoded


def _say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)
