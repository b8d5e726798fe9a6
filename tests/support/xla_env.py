"""The XLA settings of every JAX process of the test suite: fake CPU devices, unoptimised code generation and one
shared compilation cache.

A whole `lexvla train` or `lexvla encode` of the tests' cut-down config is mostly XLA compilation on a CPU (about
20 of its 30 s), and the suite starts dozens of them with the same few programs. They share JAX's persistent
compilation cache: one directory per test session (`$LEXVLA_TEST_XLA_CACHE`, made by conftest.py unless set; `off`
turns it off), used by the pytest processes and by the subprocesses started with `cpu_env`; each process of a
multi-process job reads and writes a cache of its own (see `cpu_env`).

With 2+ CPU devices in a process, an executable read back from the cache deadlocks in its first collective under
XLA:CPU's default, concurrency-optimised scheduler (jaxlib 0.10.2: the two devices wait in different all-gathers,
rendezvous op_id 5 vs 51; 4 of 4 cached starts hung). `SCHEDULER_FLAG` turns that scheduler off; with it no cached
start hung (0 of 8) and the trained parameters are bit for bit those of a default, uncached run. So every test
process runs with `SCHEDULER_FLAG`, and the cache is only ever handed over together with it.
"""

from __future__ import annotations

import os

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# LLVM without optimisation passes: the suite's programs are tiny and compiled once, so their code generation costs
# far more than they run (one tiny train step: 36 -> 22 s of CPU for compile and run). Numerics are XLA's HLO, which
# this flag leaves as it is.
CODEGEN_FLAG = "--xla_backend_optimization_level=0"
CACHE_VAR = "LEXVLA_TEST_XLA_CACHE"
# A size limit makes JAX guard every read and write of the cache with a file lock; without one, a process could read
# an entry another is still writing.
CACHE_MAX_BYTES = 8 << 30


def cache_dir() -> str | None:
    """This session's compilation cache directory, or None."""
    value = os.environ.get(CACHE_VAR, "")
    return None if value in ("", "off") else value


def xla_flags(devices: int, *, optimised_code: bool = False) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices; `optimised_code` keeps LLVM's optimisation, for
    a process that runs long more than it compiles."""
    return f"--xla_force_host_platform_device_count={devices} {SCHEDULER_FLAG} {'' if optimised_code else CODEGEN_FLAG}"


def _cache_settings(directory: str | None) -> dict:
    """JAX's config values that point a process at the cache in `directory` (their environment variables are the
    same names in capitals)."""
    return {
        "jax_compilation_cache_dir": directory,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_compilation_cache_max_size": CACHE_MAX_BYTES,
    }


def cpu_env(
    devices: int, *, job_process: tuple[str, int] | None = None, optimised_code: bool = False
) -> dict[str, str]:
    """The environment of a JAX subprocess on `devices` CPU devices: this process's with the suite's XLA flags
    (`optimised_code`: see `xla_flags`) and, when this session has one, its compilation cache.

    A process of a multi-process job passes `job_process=(job, index)` and gets a cache of its own,
    `<cache>/<job>/process<index>`. Its processes must all find a program in their caches or all compile it: when
    one reads a program back while another compiles it, the first waits in the job's first collective for longer
    than gloo's key-value timeout (seen in CI with one shared cache: `Gloo context initialization failed ...
    GetKeyValue() timed out`). With a cache per process, the processes of a job see the same hits, because every
    launch of `job` compiles the same programs in every process. Launches of one `job` must not overlap in time."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices, optimised_code=optimised_code), JAX_PLATFORMS="cpu")
    directory = cache_dir()
    if directory and job_process is not None:
        job, index = job_process
        directory = os.path.join(directory, job, f"process{index}")
    for name, value in _cache_settings(directory).items():
        env.pop(name.upper(), None)
        if directory:
            env[name.upper()] = str(value)
    return env


def use_cache_in_this_process() -> None:
    """Points this (already flagged) process's JAX at the session's compilation cache."""
    import jax

    if cache_dir():
        for name, value in _cache_settings(cache_dir()).items():
            jax.config.update(name, value)
