"""A model as the ``jfusion`` command uses it: a reference model or yours, linen or nnx.

:class:`ModelHandle` is built from a model's description (``{"model": name, "kwargs":
{...}}``, :func:`jfusion.models.describe`; what a checkpoint's metadata holds) and gives every
command one interface to train, save, load, fuse, evaluate and recalibrate the model,
whichever kind it is. The name is resolved by :func:`jfusion.models.registry.resolve_model`
(a registry name or ``package.module:Factory``) and nowhere else.

linen models are used as they are: their variables are the dict ``module.init`` returns.
nnx models come from a factory that takes ``rngs`` (``Net(rngs=nnx.Rngs(seed))``); their
variables are an ``nnx.State``, and a checkpoint stores its pure dict
(:func:`flax.nnx.to_pure_dict`: the same leaf paths, ``"hidden/kernel"``), which
:meth:`ModelHandle.from_saved` puts back into the model's State. nnx models that keep random
streams in their state (``nnx.Dropout(rate, rngs=rngs)`` stores an ``nnx.Rngs``) are refused:
their keys are neither saved nor fused yet.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from jfusion.core.spec import Spec
from jfusion.core.support import ByActivations
from jfusion.core.tree import flatten
from jfusion.evaluate import recalibrate_batch_stats
from jfusion.models.registry import ModelConfigError, describe, from_metadata, is_reference, takes_rngs
from jfusion.trace import trace_spec
from jfusion.workflow.train import evaluate, evaluate_models, predict, takes_train, train_models


class ModelHandle:
    """The model a description names, with what the command line does to it.

    Attributes:
      description: ``{"model": name, "kwargs": {...}}``, as :func:`jfusion.models.describe`
        writes it (a reference model's defaults filled in).
      name: the model's name (registry name or ``package.module:Factory``).
      module: the linen module, or an abstract nnx Module (``nnx.eval_shape``; its
        graph and shapes, no values).
      is_nnx: whether the model is an nnx Module.
    """

    def __init__(self, description: Mapping[str, Any]):
        if not description or description.get("model") is None:
            raise ModelConfigError(f"the metadata names no model; got {dict(description or {})}")
        # Normalised: a registry model's every argument, JSON values (checked).
        self.description = describe(description["model"], **dict(description.get("kwargs") or {}))
        self.name = self.description["model"]
        self._takes_rngs = takes_rngs(self.name)
        if self._takes_rngs:
            # Shapes only: nothing is initialised until a command needs values.
            self.module = nnx.eval_shape(lambda: from_metadata(self.description, rngs=nnx.Rngs(0)))
        else:
            self.module = from_metadata(self.description)
        self.is_nnx = isinstance(self.module, nnx.Module)
        if self.is_nnx:
            rng_streams = flatten(nnx.state(self.module, nnx.RngState))[0]
            if rng_streams:
                raise ModelConfigError(
                    f"model {self.name!r} keeps random streams in its state ({', '.join(rng_streams)}, e.g. "
                    f"nnx.Dropout(rate, rngs=rngs)); the jfusion command cannot save or fuse those yet: build "
                    f"the model without stored rngs, or use the Python API"
                )
            self.graphdef, self._template = nnx.split(self.module)
            # The module's call is what the other functions see (evaluate, activations).
            self._model: Any = self.graphdef
        else:
            self._model = self.module
            self._train_apply = lambda v, x: self.module.apply(v, x, train=True, mutable=["batch_stats"])

    def __repr__(self) -> str:
        return f"ModelHandle({self.description})"

    @property
    def is_registry_model(self) -> bool:
        """Whether this is one of jfusion's reference models (they sow their groups' activations)."""
        return not is_reference(self.name)

    # --- training and storage ----------------------------------------------------------

    def make(self, rngs: nnx.Rngs) -> nnx.Module:
        """A new nnx model initialised from ``rngs`` (what :func:`train_models` calls K times)."""
        return from_metadata(self.description, rngs=rngs)

    def check_trainable(self) -> None:
        """Raise ModelConfigError unless K models can be initialised from K seeds."""
        if self.is_nnx and not self._takes_rngs:
            raise ModelConfigError(
                f"model {self.name!r} returns an nnx Module but takes no rngs: training K models from "
                f"seeds needs a factory Factory(rngs=nnx.Rngs(seed))"
            )

    def num_outputs(self, sample: np.ndarray) -> int:
        """The size of the model's last output axis on ``sample`` (shapes only, nothing runs)."""
        if self.is_nnx:
            logits = jax.eval_shape(lambda state, x: nnx.merge(self.graphdef, state)(x), self._template, sample)
        else:
            logits = jax.eval_shape(lambda x: self.module.init_with_output(jax.random.key(0), x)[0], sample)
        return int(logits.shape[-1])

    def train(self, subsets: Any, seeds: Sequence[int], **kwargs: Any) -> Any:
        """:func:`jfusion.workflow.train.train_models` of this model: K variables stacked on K."""
        self.check_trainable()
        return train_models(self.make if self.is_nnx else self.module, subsets, seeds, **kwargs)

    def to_saved(self, variables: Any) -> Any:
        """What a checkpoint stores of ``variables``: linen's dict, or an nnx State's pure dict."""
        return nnx.to_pure_dict(variables) if self.is_nnx else variables

    def from_saved(self, tree: Any) -> Any:
        """``variables`` from what :meth:`to_saved` stored (an nnx State is rebuilt from its dict)."""
        if not self.is_nnx:
            return tree
        expected, found = set(flatten(self._template)[0]), set(flatten(tree)[0])
        if expected != found:
            raise ModelConfigError(
                f"the arrays are not model {self.name!r}'s state: missing {sorted(expected - found) or 'none'}, "
                f"unexpected {sorted(found - expected) or 'none'}"
            )
        state = jax.tree.map(lambda x: x, self._template)  # a copy: replace_by_pure_dict writes in place
        nnx.replace_by_pure_dict(state, tree)
        return state

    # --- specs and alignment -----------------------------------------------------------

    def has_spec(self) -> bool:
        """Whether the module says its own Spec (``module.spec()``, as the reference models do)."""
        return callable(getattr(self.module, "spec", None))

    def spec(self, variables: Any, sample: np.ndarray) -> Spec:
        """``module.spec()`` where the module has one, else the Spec traced from it."""
        return self.module.spec() if self.has_spec() else self.trace(variables, sample)

    def _inference_kwargs(self, variables: Any) -> dict[str, Any]:
        return {"train": False} if not self.is_nnx and takes_train(self.module, variables) else {}

    def trace(self, variables: Any, sample: np.ndarray) -> Spec:
        """:func:`jfusion.trace_spec` of the model in inference mode with ``variables``."""
        if self.is_nnx:
            module = nnx.merge(self.graphdef, variables, copy=True)
            module.eval()
            return trace_spec(module, sample)
        return trace_spec(self.module.apply, variables, sample, **self._inference_kwargs(variables))

    def activations(self, variables: Any, spec: Spec, *, traced: bool) -> ByActivations:
        """Activation alignment through this model in inference mode.

        Reference models sow their groups' activations under the groups' names, which a
        registry spec uses; for a traced spec, a spec with attention heads (whose q, k and v
        are read per head from the projections) and any other model, each group's
        activations are the outputs of its writer modules (``points=spec``).
        """
        points = None if self.is_registry_model and not traced and not spec.heads else spec
        return ByActivations.from_module(self._model, points=points, **self._inference_kwargs(variables))

    # --- BatchNorm and evaluation ------------------------------------------------------

    def has_batch_stats(self, variables: Any) -> bool:
        """Whether ``variables`` hold BatchNorm statistics (what --recalibrate recomputes)."""
        if self.is_nnx:
            return bool(flatten(nnx.split_state(variables, nnx.BatchStat, ...)[0])[0])
        return "batch_stats" in variables

    def recalibrate(self, variables: Any, batches: np.ndarray) -> Any:
        """:func:`jfusion.recalibrate_batch_stats` of ``variables`` on ``batches``."""
        return recalibrate_batch_stats(self._model if self.is_nnx else self._train_apply, variables, batches)

    def evaluate(self, variables: Any, images: Any, labels: Any) -> float:
        """Top-1 test accuracy of one model's ``variables``."""
        return evaluate(self._model, variables, images, labels)

    def evaluate_models(self, variables: Any, images: Any, labels: Any) -> np.ndarray:
        """Top-1 accuracy of K models' ``variables`` stacked on K: a ``(K,)`` array."""
        return evaluate_models(self._model, variables, images, labels)

    def predict(self, variables: Any, images: Any) -> np.ndarray:
        """One model's logits on ``images``."""
        return predict(self._model, variables, images)


def ensemble_accuracy(
    members: Sequence[tuple[ModelHandle, Any]],
    images: Any,
    labels: Any,
    weights: Sequence[float] | None = None,
) -> float:
    """Accuracy of the prediction ensemble: the argmax of the weighted mean of the members'
    logits (each member its own model, so widths may differ), weights normalised to one."""
    w = np.ones(len(members)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    logits = sum(wk * handle.predict(variables, images) for wk, (handle, variables) in zip(w, members))
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))

