"""Test-wide JAX settings."""

import jax

# The tests compare network outputs to 1e-5. On GPUs, float32 matmuls and convolutions default to
# TF32 (a 10-bit mantissa, relative error ~1e-3), which would make two applications of the same
# function differ by more than that; jfusion's own contractions already ask for HIGHEST.
jax.config.update("jax_default_matmul_precision", "highest")
