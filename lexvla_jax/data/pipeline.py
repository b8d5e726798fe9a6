"""From `config.data` to per-process batches and global `jax.Array`s.

    raw samples (webdataset stream + window shuffle | ArrayRecord global shuffle), this process's share
      → decode, crop, tokenise (SampleDecoder; a bad sample → skip marker)  ─┐ in each of `num_workers`
      → batch good samples, count markers by reason (batching.py)           ─┘ grain worker processes
      → mp_prefetch (image batches through shared memory)
      → total the counts, drop short batches (batching.py; totals are iterator state)
      → make_global_batch: sharded over the mesh's batch axes; normalize_images on the device

Each batch is `{"image": uint8 [B,S,S,3], "input_ids": int32 [B,L], "attention_mask": int32 [B,L],
"skipped": int64 [len(SKIP_REASONS)]}` where `skipped` counts the samples skipped since the previous
batch (`records.skip_counts_dict` names them) and B = global batch // process count. The iterator is a
grain `DatasetIterator`: save it next to the train state with orbax
(`grain.checkpoint.CheckpointSave(iterator)` in an `ocp.args.Composite`) and restore it with
`grain.checkpoint.CheckpointRestore`; a restored iterator continues exactly where the saved one was.
Workers take turns delivering whole batches, so the order depends on `num_workers` (deterministic for
a given count; restore with the count that saved).
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from lexvla_jax import sharding
from lexvla_jax.data.array_record import SUFFIX, array_record_dataset
from lexvla_jax.data.batching import SkipCountingBatchDataset, SkipTotalsDataset, SkipTotalsIterator
from lexvla_jax.data.config import DataConfigError, check_data_config, resolve_shards
from lexvla_jax.data.eval_set import load_eval_set  # noqa: F401  (re-exported: the eval half of the pipeline)
from lexvla_jax.data.records import skip_counts_dict
from lexvla_jax.data.shuffle import WindowShuffleDataset
from lexvla_jax.data.transforms import SampleDecoder
from lexvla_jax.data.webdataset import WebDatasetSource

MIN_SHM_BYTES = 64 * 1024
HOST_KEYS = ("skipped", "key")  # batch entries that stay on the host
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


def prompt_encoder(config, tokenizer=None):
    """`vocab.PromptEncoder` with `config.data`'s template and lengths; the tokenizer defaults to
    `config.data.tokenizer` (None when that is empty too: batches then hold images only)."""
    from lexvla_jax.vocab import PromptEncoder, load_tokenizer

    if tokenizer is None:
        if not config.tokenizer:
            return None
        tokenizer = load_tokenizer(config.tokenizer)
    return PromptEncoder(
        tokenizer,
        template=config.prompt_template,
        max_caption_tokens=config.max_caption_tokens,
        max_length=config.max_length,
    )


def raw_dataset(config, process_index: int, process_count: int) -> grain.IterDataset | grain.MapDataset:
    """This process's raw training samples in `config.format`."""
    if config.format == "array_record":
        paths = resolve_shards(config.train_shards, "config.data.train_shards", SUFFIX)
        return array_record_dataset(
            paths,
            seed=config.seed,
            num_epochs=config.num_epochs,
            process_index=process_index,
            process_count=process_count,
        )
    paths = resolve_shards(config.train_shards, "config.data.train_shards", ".tar")
    ds = WebDatasetSource(
        paths,
        process_index=process_index,
        process_count=process_count,
        seed=config.seed,
        num_epochs=config.num_epochs,
        cycle_length=config.interleave_shards,
    )
    if config.shuffle_buffer > 1:
        ds = WindowShuffleDataset(ds, window=config.shuffle_buffer, seed=config.seed)
    return ds


def make_train_dataset(
    config,
    global_batch_size: int,
    prompt_encoder=None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    keep_keys: bool = False,
) -> grain.IterDataset:
    """The training batches of one process (`iter()` it); see the module docstring.

    `config` is `config.data`. Process index/count default to JAX's; tests pass them to simulate
    several processes in one. `keep_keys=True` adds the sample keys (`"key"`, host only).
    """
    check_data_config(config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise DataConfigError(
            f"global batch size {global_batch_size} is not divisible by {process_count} processes; change "
            "config.train.global_batch_size"
        )
    batch_size = global_batch_size // process_count
    decoder = SampleDecoder.from_config(config, train=True, prompt_encoder=prompt_encoder)
    ds = raw_dataset(config, process_index, process_count).map(decoder)
    if isinstance(ds, grain.MapDataset):
        read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=batch_size)
        ds = ds.to_iter_dataset(read)
    ds = SkipCountingBatchDataset(
        ds, batch_size=batch_size, keep_keys=keep_keys, max_consecutive_skips=config.max_consecutive_skips
    )
    if config.num_workers > 0:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
        # Arrays under MIN_SHM_BYTES travel pickled; the image batch goes through shared memory.
        options = grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES)
        ds = grain.experimental.WithOptionsIterDataset(ds, options)
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.num_workers, per_worker_buffer_size=config.prefetch_buffer)
        )
    return SkipTotalsDataset(ds, batch_size=batch_size, drop_remainder=drop_remainder)


def train_iterator(
    config, global_batch_size: int, process_index=None, process_count=None, prompt_encoder=None, **kwargs
) -> SkipTotalsIterator:
    """`iter(make_train_dataset(...))`: the checkpointable iterator of this process's training batches."""
    dataset = make_train_dataset(
        config, global_batch_size, prompt_encoder, process_index=process_index, process_count=process_count, **kwargs
    )
    return iter(dataset)


def skip_counts(batch: dict) -> dict[str, int]:
    """`{reason: count}` of the samples skipped since the previous batch."""
    return skip_counts_dict(batch["skipped"])


def normalize_images(images: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 [..., 3] → (x/255 - mean) / std with DINOv2's (ImageNet) mean and std, on the device."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def make_global_batch(local_batch: dict, mesh: jax.sharding.Mesh, rules=sharding.DEFAULT_RULES) -> dict:
    """Per-process numpy batch → global `jax.Array`s split over the mesh axes of logical `batch`.

    Every process passes its own rows; the global batch is their concatenation in process order.
    Host-only entries (`HOST_KEYS`) are left out.
    """
    batch_sharding = sharding.batch_sharding(mesh, rules)
    data_parallel = sharding.data_parallel_size(mesh, rules)
    out = {}
    for name, value in local_batch.items():
        if name in HOST_KEYS:
            continue
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        if global_shape[0] % data_parallel:
            raise DataConfigError(
                f"global batch {global_shape[0]} is not divisible by the data-parallel size {data_parallel}; "
                "change config.train.global_batch_size"
            )
        out[name] = jax.make_array_from_process_local_data(batch_sharding, value, global_shape)
    return out
