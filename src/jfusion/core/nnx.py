"""flax.nnx models as pure functions of their state.

jfusion vmaps over K models whose variables are stacked on a leading axis, so a model must
be a pure function of its variables. An nnx Module is a mutable Python object; ``nnx.split``
separates it into a static ``GraphDef`` (hashable: it keys jit's caches) and an ``nnx.State``
of arrays, and ``nnx.merge(graphdef, state)`` builds a new module from the two. Every nnx
function of jfusion merges a fresh module at each call, uses it once and returns what it
needs (outputs, the state after the call): the object never outlives the call, so nothing a
call writes on it -- updated batch statistics, values ``sow``n into a tuple -- reaches the
next call, the next model or the next batch.
"""

from __future__ import annotations

from typing import Any

from flax import nnx


def is_nnx(model: Any) -> bool:
    """Whether ``model`` is an nnx Module or GraphDef (rather than a linen module)."""
    return isinstance(model, (nnx.Module, nnx.GraphDef))


def graphdef_of(model: nnx.Module | nnx.GraphDef) -> nnx.GraphDef:
    """The GraphDef of an nnx Module (its state is dropped), or a GraphDef as given."""
    if isinstance(model, nnx.GraphDef):
        return model
    if isinstance(model, nnx.Module):
        return nnx.graphdef(model)
    raise TypeError(f"expected an nnx.Module or nnx.GraphDef, got {type(model).__name__}")


def fresh(graphdef: nnx.GraphDef, *states: nnx.State, train: bool) -> nnx.Module:
    """A new module from ``graphdef`` and ``states``, in training or inference mode.

    The mode is set on the new module (``Module.train()`` / ``eval()``: BatchNorm's
    ``use_running_average``, Dropout's ``deterministic``), so the caller's module keeps its own.
    """
    # copy: merge may reuse the states' Variable objects, which belong to the trace that made
    # them; a BatchNorm writing its statistics under an inner trace (grad in a training
    # step) may only write Variables of its own.
    module = nnx.merge(graphdef, *states, copy=True)
    if train:
        module.train()
    else:
        module.eval()
    return module
