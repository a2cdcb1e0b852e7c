"""Test-wide JAX settings."""

import jax
import pytest

# The tests compare network outputs to 1e-5. On GPUs, float32 matmuls and convolutions default to
# TF32 (a 10-bit mantissa, relative error ~1e-3), which would make two applications of the same
# function differ by more than that; jfusion's own contractions already ask for HIGHEST.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every module's compiled XLA programs when it is done.

    One process compiles hundreds of programs over the suite; keeping all of them alive
    exhausted XLA:CPU's compiler and crashed it (a segfault in ``backend_compile``) late in
    the run.
    """
    yield
    jax.clear_caches()
