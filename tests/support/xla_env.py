"""The XLA settings of every JAX process of the test suite: fake CPU devices and one shared compilation cache.

A whole `lexvla train` or `lexvla encode` of the tests' cut-down config is mostly XLA compilation on a CPU (about
20 of its 30 s), and the suite starts dozens of them with the same few programs. They share JAX's persistent
compilation cache: one directory per test session (`$LEXVLA_TEST_XLA_CACHE`, made by conftest.py unless set; `off`
turns it off), used by the pytest processes and by the single-process subprocesses started with `cpu_env`
(multi-process jobs compile for themselves: see `cpu_env`).

With 2+ CPU devices in a process, an executable read back from the cache deadlocks in its first collective under
XLA:CPU's default, concurrency-optimised scheduler (jaxlib 0.10.2: the two devices wait in different all-gathers,
rendezvous op_id 5 vs 51; 4 of 4 cached starts hung). `SCHEDULER_FLAG` turns that scheduler off; with it no cached
start hung (0 of 8) and the trained parameters are bit for bit those of a default, uncached run. So every test
process runs with `SCHEDULER_FLAG`, and the cache is only ever handed over together with it.
"""

from __future__ import annotations

import os

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
CACHE_VAR = "LEXVLA_TEST_XLA_CACHE"
# A size limit makes JAX guard every read and write of the cache with a file lock; without one, a process could read
# an entry another is still writing.
CACHE_MAX_BYTES = 8 << 30


def cache_dir() -> str | None:
    """This session's compilation cache directory, or None."""
    value = os.environ.get(CACHE_VAR, "")
    return None if value in ("", "off") else value


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {SCHEDULER_FLAG}"


def _cache_settings() -> dict:
    """JAX's config values that point a process at the session's cache (their environment variables are the same
    names in capitals)."""
    return {
        "jax_compilation_cache_dir": cache_dir(),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_compilation_cache_max_size": CACHE_MAX_BYTES,
    }


def cpu_env(devices: int, *, cache: bool = True) -> dict[str, str]:
    """The environment of a JAX subprocess on `devices` CPU devices: this process's with the suite's XLA flags and,
    when this session has one and `cache`, its compilation cache.

    Pass `cache=False` for the processes of a multi-process job: when one process compiles a program while another
    reads it back from the cache (the first writes it mid-run), their gloo collectives disagree and the job times
    out in its first cross-process step (seen in CI: `Gloo context initialization failed ... GetKeyValue() timed
    out`)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
    for name, value in _cache_settings().items():
        env.pop(name.upper(), None)
        if cache and cache_dir():
            env[name.upper()] = str(value)
    return env


def use_cache_in_this_process() -> None:
    """Points this (already flagged) process's JAX at the session's compilation cache."""
    import jax

    if cache_dir():
        for name, value in _cache_settings().items():
            jax.config.update(name, value)
