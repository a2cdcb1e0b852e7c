"""K models in one pytree: taking one model out of a stack.

:func:`jfusion.stack_models` and :func:`jfusion.unstack_models` convert between a list of K
pytrees and one pytree whose leaves carry a leading K axis (what
:func:`jfusion.workflow.train.train_models` returns and every fusion method accepts);
:func:`take_model` reads one model of such a stack without unstacking all K.
"""

from __future__ import annotations

import numpy as np

from jfusion.core.errors import FusionInputError
from jfusion.core.tree import ModelStack, PyTree, unflatten


def take_model(stacked: PyTree, k: int) -> PyTree:
    """Model ``k`` of a pytree stacked along a leading K axis: every leaf's ``[k]``.

    Works on linen variable dicts and ``nnx.State`` alike and keeps the tree's structure;
    ``k`` may be negative (``-1`` is the last model), as in Python indexing.
    ``take_model(stack_models(models), k)`` is ``models[k]``. ``k`` must be a Python int;
    for an index traced under ``jit`` use ``jax.tree.map(lambda a: a[k], stacked)``.

    Raises:
      FusionInputError: the leaves do not share one leading model axis, or ``k`` is not an
        int in range.
    """
    models = ModelStack(stacked, "stacked")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise FusionInputError(f"take_model: k must be an int model index, not {type(k).__name__}")
    n = models.num_models
    if not -n <= k < n:
        raise FusionInputError(f"take_model: model {k} is out of range for a stack of {n} models")
    return unflatten(models.treedef, models.model(int(k) % n))
