"""LexVLA built from Hugging Face checkpoints by 2 processes × 4 devices equals the 1-process build, and each
process reads only the checkpoint blocks its own devices hold."""

import json
import pathlib

import numpy as np
import pytest
from support import local_cluster, tiny_hf

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

pytest.importorskip("transformers")
WORKER = pathlib.Path(__file__).parent / "support" / "multihost_build_worker.py"


def _read(out_dir, process: int):
    shards = dict(np.load(out_dir / f"process-{process}.npz"))
    record = json.loads((out_dir / f"process-{process}.json").read_text())
    as_set = lambda blocks: {(key, json.dumps(where)) for key, where in blocks}
    return shards, as_set(record["reads"]), as_set(record["held"])


def test_two_process_build_equals_one_process_build(tmp_path):
    vision_dir, text_dir, _, _ = tiny_hf.write_tiny_hf(tmp_path)
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = local_cluster.start_workers(WORKER, 2, 4, vision_dir, text_dir, tmp_path / "two")
    one = local_cluster.start_workers(WORKER, 1, 8, vision_dir, text_dir, tmp_path / "one")
    local_cluster.wait_workers(two + one)

    reference, reads_one, _ = _read(tmp_path / "one", 0)
    processes = [_read(tmp_path / "two", p) for p in range(2)]
    # Every device shard of every variable (loaded, randomly initialised, LoRA) is the 1-process value.
    assert {k for shards, _, _ in processes for k in shards} == set(reference)
    for shards, _, _ in processes:
        for key, value in shards.items():
            np.testing.assert_array_equal(value, reference[key], err_msg=key)
    # Each process read exactly the blocks its devices hold: half of what one process reads (FSDP across them).
    for _, reads, held in processes:
        assert reads == held and len(reads) < len(reads_one)
    assert processes[0][1] | processes[1][1] == reads_one
    split = [key for key, where in processes[0][1] if (key, where) not in processes[1][1]]
    assert any(key == "lm_head.weight" for key in split)  # codebook rows split too
