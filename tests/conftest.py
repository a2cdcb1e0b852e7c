"""Test-wide JAX settings."""

import os

# The suite is dominated by XLA compiling hundreds of small programs once each, not by running
# them: LLVM at -O0 halves XLA:CPU's compile time. Only the generated code's speed changes (not
# its semantics); the tests' subprocesses (the CLI, the examples) inherit the setting.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import pytest

# The tests compare network outputs to 1e-5. On GPUs, float32 matmuls and convolutions default to
# TF32 (a 10-bit mantissa, relative error ~1e-3), which would make two applications of the same
# function differ by more than that; jfusion's own contractions already ask for HIGHEST.
jax.config.update("jax_default_matmul_precision", "highest")
# XLA's RngBitGenerator compiles in a fraction of the time of threefry's unrolled rounds, and
# the suite compiles a random program for nearly every new shape; jfusion never depends on
# the PRNG implementation (it only passes the keys it is given to jax.random).
jax.config.update("jax_default_prng_impl", "rbg")

# The command line turns on JAX's persistent compilation cache in the user's cache directory;
# the tests that call its main() in this process must neither write there nor change this
# process's JAX configuration (tests/test_compile_cache.py checks the cache in subprocesses).
os.environ["JFUSION_NO_COMPILE_CACHE"] = "1"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every module's compiled XLA programs when it is done.

    One process compiles hundreds of programs over the suite; keeping all of them alive
    exhausted XLA:CPU's compiler and crashed it (a segfault in ``backend_compile``) late in
    the run.
    """
    yield
    jax.clear_caches()
