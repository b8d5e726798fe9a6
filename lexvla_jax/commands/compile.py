"""`lexvla compile`: compile the train step for a TPU topology (or this machine) ahead of time and report the fit."""

from __future__ import annotations

import argparse

import jax

from lexvla_jax import configlib
from lexvla_jax.aot import compile_train_step, topology_devices


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexvla compile", description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--topology", help="TPU topology, e.g. v5p:2x2x1, v4:2x2x1, v5e:4x4")
    target.add_argument("--local", action="store_true", help="this machine's devices (a GPU, or the CPU)")
    config, args = configlib.parse_command(argv, parser)
    if args.local:
        devices = jax.devices()
        report = compile_train_step(config, devices, f"local {devices[0].platform}")
    else:
        report = compile_train_step(config, topology_devices(args.topology), args.topology)
    print("\n".join(report.lines()))
    return 0 if report.fits else 1
