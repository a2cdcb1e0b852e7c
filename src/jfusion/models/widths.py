"""Modules at other widths: the module that fits a fused, pruned or partially fused pytree.

Fusion can change a network's widths: :func:`jfusion.partial_fuse` widens every group
(``m + sum_k round(alpha n_k)`` neurons), :func:`jfusion.barycenter_fuse` and
:func:`jfusion.prune` narrow them. The pytree says its widths (its leaves' shapes, read
through the Spec: :func:`widths_of`); :func:`module_for` builds the module of the same
architecture at those widths, so the result can be applied and evaluated::

    partial = jfusion.partial_fuse(models, model.spec(), alpha=0.5)
    wide = jfusion.module_for(model, partial.params)   # e.g. MLP((24, 24, 10)) from MLP((16, 16, 10))
    logits = wide.apply(partial.params, x)

The reference models know which of their arguments each group's width is
(``with_widths``); for your own model pass ``build(widths) -> module`` and the Spec.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import numpy as np
from flax import nnx

from jfusion.core.spec import Spec
from jfusion.core.tree import PyTree, flatten


def widths_of(params: PyTree, spec: Spec) -> dict[str, int]:
    """Every group's width in ``params`` (one model's variables), read from its leaves' shapes.

    Raises SpecError when ``params`` does not fit ``spec`` (a missing or unlabelled leaf,
    one group with two sizes), naming the leaf.
    """
    shapes = {path: tuple(np.shape(leaf)) for path, leaf in flatten(params)[0].items()}
    return spec.validate(shapes, "params")


def module_for(
    model: Any | Callable[[dict[str, int]], Any],
    params: PyTree,
    spec: Spec | None = None,
) -> Any:
    """The module of ``model``'s architecture with the widths ``params`` has.

    Args:
      model: a reference model (:class:`jfusion.models.MLP`, ``CNN``, ``VGG``, ``ResNet``,
        ``RecurrentClassifier``, or any module with a ``with_widths(widths)`` method), of any
        widths: only its architecture is used; or ``build(widths) -> module``, a function
        of ``{group: width}`` that builds your own model.
      params: one model's variables, e.g. ``jfusion.partial_fuse(...).params``.
      spec: the Spec labelling ``params``; by default ``model.spec()``.

    Returns:
      ``model.with_widths(widths_of(params, spec))``, or ``build(widths)``.

    Raises:
      TypeError: ``model`` has no ``with_widths`` and is not a function, or no Spec is given
        for one without ``spec()``.
      SpecError: ``params`` does not fit the Spec.
      ValueError: the model cannot have these widths (e.g. a ResNet block whose inner
        width differs from its stage's: the ResNet has one width per stage).
    """
    is_module = isinstance(model, (nn.Module, nnx.Module))
    if spec is None:
        if not callable(getattr(model, "spec", None)):
            raise TypeError(f"module_for: pass the Spec of params ({type(model).__name__} has no spec() method)")
        spec = model.spec()
    widths = widths_of(params, spec)
    if callable(getattr(model, "with_widths", None)):
        return model.with_widths(widths)
    if callable(model) and not is_module:
        return model(widths)
    raise TypeError(
        f"module_for: {type(model).__name__} has no with_widths(widths) method; pass a function "
        f"build(widths) -> module instead, e.g. lambda w: Net(hidden=w['hidden'])"
    )


def check_groups(widths: Mapping[str, int], known: Mapping[str, Any], model: str) -> None:
    """Raise ValueError if ``widths`` names groups ``model`` does not have (``known``)."""
    unknown = sorted(set(widths) - set(known))
    if unknown:
        raise ValueError(f"{model} has no group {', '.join(map(repr, unknown))}; its groups are {', '.join(known)}")
