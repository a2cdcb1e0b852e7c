"""How the reference models expose each group's pre-activations for activation alignment."""

from __future__ import annotations

import flax.linen as nn
import jax

COLLECTION = "activations"


def record_activations(module: nn.Module, group: str, x: jax.Array) -> None:
    """Sow ``x`` as ``group``'s pre-activations (read by :meth:`jfusion.ByActivations.from_module`).

    Nothing is sown while initialising: ``init`` must return the variables alone.
    """
    if not module.is_initializing():
        module.sow(COLLECTION, group, x)
