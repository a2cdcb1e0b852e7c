"""jfusion: fuse trained neural networks with optimal transport, as one jitted JAX program.

A fusion is, for every neuron group, one transport plan per model plus a weight per fused
neuron: supports (weights or activations) -> costs -> plans ``T_k`` -> transport -> combine.
Every method is a plan producer (:class:`PlanProducer`) on that one engine, and every
method returns a result with the fused ``params`` and the ``plans`` with their diagnostics.

* OT fusion -- Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020:
  :func:`fuse`, :func:`align`.
* Wasserstein-barycenter fusion into any widths -- Akash, Li & García Trillos 2022:
  :func:`barycenter_fuse`; their Gromov-Wasserstein barycenter of recurrent networks with
  ``producer=GromovWassersteinPlans(...)``.
* Partial fusion and generalized pruning -- Morelli & Eckstein, ICML 2026:
  :func:`partial_fuse`, :func:`prune`.
* Alignment by :class:`ByWeights` (default), :class:`ByActivations`, or
  :class:`WeightMatching` (Git Re-Basin's coordinate descent over all groups) --
  Ainsworth, Hayase & Srinivasa, ICLR 2023; whether a plan beats the identity:
  :func:`plan_diagnostics`; a price on leaving it: ``GroundMetric(identity_prior=...)``.
* REPAIR / RESCALE after any fusion (Jordan et al., ICLR 2023): :func:`repair`.
* BatchNorm networks: :func:`recalibrate_batch_stats`; mode connectivity: :func:`loss_barrier`
  (git-re-basin's protocol), drawn by :func:`plot_interpolation`.
* Baselines: :func:`vanilla_average`, :func:`ensemble_apply`.
* Layer topology: :class:`Spec`, traced from the model by :func:`trace_spec` or written by
  hand (one layer at a time with :mod:`jfusion.layers`: ``layers.dense``, ``layers.conv``,
  ``layers.batch_norm``...), checked with :func:`check_spec`; :func:`permute` plants random
  permutations.
  K models: :func:`stack_models`, :func:`unstack_models`, :func:`take_model`.
* Fused pytrees of other widths (partial fusion, pruning, barycenters): :func:`widths_of`
  reads their widths, :func:`module_for` builds the module that applies them.
"""

from importlib.metadata import PackageNotFoundError, version as _installed_version

from jfusion import layers
from jfusion.check import check_spec, permute
from jfusion.core.align import Alignment, align
from jfusion.core.costs import GroundMetric
from jfusion.core.errors import ConvergenceWarning, FusionInputError, JFusionError, ResidualStreamWarning, SpecError
from jfusion.core.plans import BalancedPlans, PlanProducer
from jfusion.core.solvers import Exact, OTResult, Sinkhorn, Solver
from jfusion.core.spec import Concat, Heads, LeafSpec, Spec
from jfusion.core.matching import WeightMatching
from jfusion.core.support import ByActivations, ByWeights, ModuleActivations, NnxActivations
from jfusion.core.tree import running_statistics, stack_models, unstack_models
from jfusion.diagnostics import PlanDiagnostics, plan_diagnostics
from jfusion.evaluate import BarrierResult, loss_barrier, plot_interpolation, recalibrate_batch_stats
from jfusion.methods.barycenter import Barycenter, barycenter_fuse
from jfusion.methods.baselines import ensemble_apply, vanilla_average
from jfusion.methods.fuse import Fusion, fuse, fuse_with
from jfusion.methods.gromov import GromovWassersteinPlans
from jfusion.methods.partial import PartialFusion, partial_fuse
from jfusion.methods.prune import prune
from jfusion.methods.repair import Repair, repair
from jfusion.models.widths import module_for, widths_of
from jfusion.pytrees import take_model
from jfusion.trace import TraceError, trace_spec

try:  # the version lives in pyproject.toml only
    __version__ = _installed_version("jfusion")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [
    "Alignment",
    "BalancedPlans",
    "BarrierResult",
    "Barycenter",
    "ByActivations",
    "ByWeights",
    "Concat",
    "ConvergenceWarning",
    "Exact",
    "Fusion",
    "FusionInputError",
    "GromovWassersteinPlans",
    "GroundMetric",
    "Heads",
    "JFusionError",
    "LeafSpec",
    "ModuleActivations",
    "NnxActivations",
    "OTResult",
    "PartialFusion",
    "PlanDiagnostics",
    "PlanProducer",
    "Repair",
    "ResidualStreamWarning",
    "Sinkhorn",
    "Solver",
    "Spec",
    "SpecError",
    "TraceError",
    "WeightMatching",
    "align",
    "barycenter_fuse",
    "check_spec",
    "ensemble_apply",
    "fuse",
    "fuse_with",
    "layers",
    "loss_barrier",
    "module_for",
    "partial_fuse",
    "permute",
    "plan_diagnostics",
    "plot_interpolation",
    "prune",
    "recalibrate_batch_stats",
    "repair",
    "running_statistics",
    "stack_models",
    "take_model",
    "trace_spec",
    "unstack_models",
    "vanilla_average",
    "widths_of",
]
