"""Test environment (8 fake CPU devices, no network, grain-ready absl flags) and the fixtures shared across files.

Helpers live in `tests/support/`. Markers: `slow` (more than ~8 s on a 2-core CPU), `multiprocess` (several JAX
processes on 127.0.0.1); `pytest -m "not slow and not multiprocess"` is the quick tier for development.
"""

import atexit
import os
import shutil
import tempfile

from support import xla_env

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_env.xla_flags(8)).strip()
if xla_env.CACHE_VAR not in os.environ:  # the first pytest process of the session (xdist's workers inherit it)
    os.environ[xla_env.CACHE_VAR] = tempfile.mkdtemp(prefix="lexvla-xla-cache-")
    atexit.register(shutil.rmtree, os.environ[xla_env.CACHE_VAR], ignore_errors=True)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu is installed for ahead-of-time TPU compiles; keep it from probing for TPU metadata.
from lexvla_jax import libtpu_env  # noqa: E402

libtpu_env.quiet_libtpu_without_tpu()
xla_env.use_cache_in_this_process()

import pathlib  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's worker processes read absl flags; they must count as parsed.
flags.FLAGS.mark_as_parsed()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
LLAMA2_TOKENIZER = pathlib.Path(os.environ.get("LLAMA2_TOKENIZER", SHARED_DATA / "llama2_tokenizer.model"))


@pytest.fixture(scope="session")
def llama2_tokenizer_path():
    """Llama 2's real tokenizer from ../shared/data (or $LLAMA2_TOKENIZER); tests using it skip when it is absent."""
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"{LLAMA2_TOKENIZER} not present")
    return str(LLAMA2_TOKENIZER)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The small synthetic set of the training tests (600 training and 24 eval images of 32 px) and its tokenizer."""
    from support import local_cluster

    return local_cluster.make_data(str(tmp_path_factory.mktemp("synthetic")))


@pytest.fixture(scope="session")
def env():
    """The environment of `lexvla train` subprocesses: two data-parallel devices, sharded like a real run and light
    enough for a 2-core machine."""
    return xla_env.cpu_env(2)


@pytest.fixture(scope="session")
def uninterrupted(data_dir, env, tmp_path_factory):
    """`(workdir, stdout)` of one whole `lexvla train` of the cut-down tiny config (`local_cluster.overrides`, 24
    steps, with its final evaluation): the reference that interrupted, resumed and read-back runs are compared with."""
    import subprocess

    from support import local_cluster

    workdir = tmp_path_factory.mktemp("uninterrupted") / "work"
    command = local_cluster.command(workdir, data_dir, **{"train.profile_steps": "(5,7)", "train.final_eval": True})
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return workdir, result.stdout


@pytest.fixture(scope="session")
def synthetic_text(tmp_path_factory):
    """`(captions, tokenizer)`: 7,500 synthetic captions (1,500 scenes × 5) and a 512-piece tokenizer trained on
    them and configs/tiny.py's prompt, as the embedded job trains its own."""
    import numpy as np

    from lexvla_jax import configlib
    from lexvla_jax.miniature import synthetic
    from lexvla_jax.text.tokenizer import train_tokenizer

    template = configlib.load_config(str(REPO_ROOT / "configs" / "tiny.py")).data.prompt_template
    rng = np.random.default_rng(0)
    captions = [c for _ in range(1500) for c in synthetic.captions_for(synthetic.random_scene(rng))]
    path = tmp_path_factory.mktemp("synthetic_tokenizer") / "tokenizer.model"
    return captions, train_tokenizer([*captions, template], 512, str(path))


from support.gcs_emulator import gcs_emulator  # noqa: E402, F401 (a session fixture: the GCS emulator)

# Under pytest-xdist (`-n 2 --dist loadgroup`, .ci/run), each module runs on one worker, so its module and session
# fixtures are made once; modules that share an expensive session fixture share a worker.
SHARED_WORKER = {"test_long_run": "test_train_loop"}
# The groups with the most worker-seconds (BENCHMARKS.md, "Test suite and CI"), handed out first so that no worker is
# left alone with a long one at the end; the rest follow in file order.
LONGEST_FIRST = (
    "test_train_loop",
    "test_multiprocess_train",
    "test_main_job",
    "test_train_step",
    "test_encode",
    "test_variant_training",
    "test_lm_pretrain",
    "test_vision_pretrain",
)


def pytest_configure(config):
    # xdist would otherwise order the groups by their number of tests, which puts these long, few-test ones last.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    group = lambda item: SHARED_WORKER.get(item.path.stem, item.path.stem)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group(item), len(rank)))  # stable: file order within each rank
