"""The fusion engine, in pipeline order: spec -> supports -> costs -> solvers -> plans -> transport -> combine.

``align.py`` runs the pipeline; every method in :mod:`jfusion.methods` is a plan producer
(:class:`jfusion.core.plans.PlanProducer`) plus a thin entry point. The core imports neither
the methods nor the workflow (:mod:`jfusion.workflow`) nor the reference models.
"""
