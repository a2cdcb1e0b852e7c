"""JAX's persistent compilation cache for one-off runs (the ``jfusion`` command, the demo).

A command that fuses once spends most of its time compiling (see the README's Benchmarks);
with the cache on, the next run of the same fusion loads the compiled program from disk.
Only the command line and the demo turn it on: importing jfusion sets no global JAX option.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

OPT_OUT = "JFUSION_NO_COMPILE_CACHE"

# Every program is written, not only those that compiled for over a second (JAX's default):
# a one-off command also compiles dozens of small eager ops (model initialisation, checks).
# In benchmarks/results/bench_compile_cache_cpu.md, run back to back on 2 CPU cores, a warm
# process took 0.7-2.4 s less with this than with a 0.2 s threshold, for 44-84 entries
# (under 1 MiB) per fusion.
MIN_COMPILE_TIME_S = 0.0


def cache_directory() -> Path:
    """``$XDG_CACHE_HOME/jfusion/xla``, or ``~/.cache/jfusion/xla`` (the XDG base directory rules)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "jfusion" / "xla"


def enable_compile_cache(enabled: bool = True) -> Path | None:
    """Turn on JAX's persistent compilation cache under the user's cache directory.

    Call before anything is compiled. Does nothing (returns None) when ``enabled`` is False,
    when ``JFUSION_NO_COMPILE_CACHE`` is set to anything but ``""`` or ``"0"``, or when the
    directory cannot be created. A cache directory the user already chose
    (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept as it is. Returns the
    directory in use. jfusion never deletes anything there (JAX's own size limit,
    ``jax_compilation_cache_max_size``, is left unset); remove the directory to clear it.
    """
    if not enabled or os.environ.get(OPT_OUT, "") not in ("", "0"):
        return None
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return Path(chosen)
    directory = cache_directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    # Any entry size (-1: no filesystem-specific minimum).
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory
