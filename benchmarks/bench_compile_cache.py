"""First-call time of ``jfusion.fuse`` in a fresh process: no cache, a cold cache, a warm one.

What a one-off command (``jfusion fuse``) pays: every run is a new process, so without JAX's
persistent compilation cache every run compiles the fusion again. For each model (MLPNet
784-400-200-100-10, a VGG11-width CNN; random weights, K = 2) and solver (exact, Sinkhorn),
three fresh processes run one eager ``jfusion.fuse`` and time it (tracing, compiling and
running, as the first call in a process does):

* ``no cache``: ``enable_compile_cache(False)``;
* ``cold``: the cache on (``jfusion.workflow.compile_cache.enable_compile_cache``, what the
  CLI calls) with ``XDG_CACHE_HOME`` in a new empty directory, which it fills;
* ``warm``: the same directory again, in a new process.

"process" is the child's whole wall time (interpreter start, imports, building the models,
the fusion). Prints a markdown table.

    python benchmarks/bench_compile_cache.py
    python benchmarks/bench_compile_cache.py --models mlp --solvers sinkhorn --min-compile-time 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("no cache", "cold", "warm")


def child(model: str, solver_name: str, use_cache: bool, min_compile_time: float | None) -> None:
    """In the fresh process: enable the cache (or not), build K = 2 models, time one fuse."""
    from jfusion.workflow.compile_cache import enable_compile_cache

    directory = enable_compile_cache(use_cache)
    import jax

    if min_compile_time is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time)

    sys.path.insert(0, str(HERE))
    import jfusion
    from bench_fuse import ARCHITECTURES, random_models

    module, spec, input_shape, _ = ARCHITECTURES[model]()
    stacked = jax.block_until_ready(random_models(module, input_shape, 2))
    solver = jfusion.Exact() if solver_name == "exact" else jfusion.Sinkhorn()
    start = time.perf_counter()
    jax.block_until_ready(jfusion.fuse(stacked, spec, solver=solver).params)
    first = time.perf_counter() - start
    print("RESULT " + json.dumps({"first_call_s": first, "cache": None if directory is None else str(directory)}))


def measure(model: str, solver: str, mode: str, xdg: Path, min_compile_time: float | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JFUSION_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(xdg)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", model, solver, "0" if mode == "no cache" else "1"]
    if min_compile_time is not None:
        command += ["--min-compile-time", str(min_compile_time)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    process_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{model} {solver} {mode}: {done.stderr[-2000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    cache = xdg / "jfusion" / "xla"
    files = [p for p in cache.glob("*-cache")] if cache.exists() else []
    return {**result, "process_s": process_s, "entries": len(files), "mib": sum(p.stat().st_size for p in files) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "vgg11"], choices=["mlp", "vgg11"])
    parser.add_argument("--solvers", nargs="+", default=["exact", "sinkhorn"], choices=["exact", "sinkhorn"])
    parser.add_argument(
        "--min-compile-time", type=float, metavar="S",
        help="jax_persistent_cache_min_compile_time_secs (default: enable_compile_cache's)",
    )
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "SOLVER", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, solver, cache = args.child
        child(model, solver, cache == "1", args.min_compile_time)
        return
    print("| model | K | solver | no cache: first call (s) | cold: first call (s) | warm: first call (s) "
          "| no cache / cold / warm: process (s) | cache entries (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for solver in args.solvers:
            with tempfile.TemporaryDirectory() as empty, tempfile.TemporaryDirectory() as xdg:
                rows = {
                    "no cache": measure(model, solver, "no cache", Path(empty), args.min_compile_time),
                    "cold": measure(model, solver, "cold", Path(xdg), args.min_compile_time),
                    "warm": measure(model, solver, "warm", Path(xdg), args.min_compile_time),
                }
            assert rows["no cache"]["entries"] == 0
            processes = " / ".join(f"{rows[m]['process_s']:.1f}" for m in MODES)
            print(
                f"| {model} | 2 | {solver} | {rows['no cache']['first_call_s']:.2f} | {rows['cold']['first_call_s']:.2f} "
                f"| {rows['warm']['first_call_s']:.2f} | {processes} | {rows['cold']['entries']} ({rows['cold']['mib']:.1f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
