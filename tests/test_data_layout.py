"""The training shards' split over data streams and workers, checked before training (`data/layout.py`)."""

import os

import ml_collections
import pytest
from support.local_cluster import REPO

from lexvla_jax.commands import inspect_data
from lexvla_jax.data.config import DataConfigError, default_data_config
from lexvla_jax.data.layout import check_layout


def _config(tmp_path, shards: int, workers: int, streams: int = 0) -> ml_collections.ConfigDict:
    folder = tmp_path / "train"
    folder.mkdir(exist_ok=True)
    for i in range(shards):
        (folder / f"{i:05d}.tar").write_bytes(b"")
    config = default_data_config()
    config.train_shards, config.num_workers, config.num_streams = str(folder), workers, streams
    return config


def test_even_shares(tmp_path):
    line = check_layout(_config(tmp_path, 8, 2), process_count=2)
    assert line == "data layout: 8 shards over 2 data stream(s) × 2 worker(s) over 2 process(es): 2 shard(s) per worker"


def test_uneven_shares_are_reported(tmp_path):
    line = check_layout(_config(tmp_path, 6, 2, streams=2), process_count=1)
    assert "workers read 1 to 2 shards" in line and "use a multiple of 4 shards" in line


@pytest.mark.parametrize(("shards", "workers", "processes"), [(3, 2, 2), (4, 3, 2), (1, 0, 2)])
def test_a_worker_without_a_shard_is_refused(tmp_path, shards, workers, processes):
    with pytest.raises(DataConfigError, match=f"^{shards} training shard.* some workers would get no shard"):
        check_layout(_config(tmp_path, shards, workers), process_count=processes)


def test_inspect_data_checks_the_layout_before_reading(tmp_path):
    """3 empty shards for 4 workers: refused by the layout check (reading them would stall)."""
    os.makedirs(tmp_path / "train")
    for i in range(3):
        (tmp_path / "train" / f"{i}.tar").write_bytes(b"")
    config = os.path.join(REPO, "configs", "tiny.py")
    args = ["--config", config, f"--config.data.train_shards={tmp_path / 'train'}", "--config.data.num_workers=4"]
    args.append("--config.data.tokenizer=")  # images only
    with pytest.raises(DataConfigError, match="^3 training shard"):
        inspect_data.main(args)
