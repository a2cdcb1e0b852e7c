"""jfusion: fuse trained neural networks with optimal transport, as one jitted JAX program.

A fusion is, for every neuron group, one transport plan per model plus a weight per fused
neuron: supports (weights or activations) -> costs -> plans ``T_k`` -> transport -> combine.

* OT fusion -- Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020:
  :func:`fuse`, :func:`align`.
* Wasserstein-barycenter fusion into any widths -- Akash, Li & García Trillos 2022:
  :func:`barycenter_fuse`.
* Partial fusion and generalized pruning -- Morelli & Eckstein, ICML 2026:
  :func:`partial_fuse`, :func:`prune`.
* Activation alignment: :class:`Activations` (``Activations.from_module(model)``).
* BatchNorm networks: :func:`recalibrate_batch_stats`; mode connectivity: :func:`loss_barrier`.
* Baselines: :func:`vanilla_average`, :func:`ensemble_apply`.
* Layer topology: :class:`Spec`, checked with :func:`check_spec`; :func:`permute` plants
  random permutations.
"""

from jfusion.core.align import Alignment, align
from jfusion.methods.baselines import ensemble_apply, vanilla_average
from jfusion.check import check_spec, permute
from jfusion.core.costs import GroundMetric
from jfusion.core.errors import ConvergenceWarning, FusionInputError, JFusionError, SpecError
from jfusion.evaluate import loss_barrier, recalibrate_batch_stats
from jfusion.methods.fuse import Barycenter, barycenter_fuse, fuse
from jfusion.methods.partial import PartialFusion, partial_fuse
from jfusion.methods.prune import prune
from jfusion.core.solvers import Exact, OTResult, Sinkhorn
from jfusion.core.spec import LeafSpec, Spec
from jfusion.core.support import Activations, ModuleActivations, Weights

__all__ = [
    "Activations",
    "Alignment",
    "Barycenter",
    "ConvergenceWarning",
    "Exact",
    "FusionInputError",
    "GroundMetric",
    "JFusionError",
    "LeafSpec",
    "ModuleActivations",
    "OTResult",
    "PartialFusion",
    "Sinkhorn",
    "Spec",
    "SpecError",
    "Weights",
    "align",
    "barycenter_fuse",
    "check_spec",
    "ensemble_apply",
    "fuse",
    "loss_barrier",
    "partial_fuse",
    "permute",
    "prune",
    "recalibrate_batch_stats",
    "vanilla_average",
]
