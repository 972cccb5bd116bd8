"""The factory that patches a MODEL for HyCa Apply: its map (given, stored, or calibrated by the first run),
the options, and the run state a clone of the model carries."""

from __future__ import annotations

import logging

from ..hyca_core.schedule import Schedule
from ..hyca_core.solver_map import MapError, SolverMap
from . import map_store, ui_text
from .apply_options import ApplyOptions, granularity_for, map_warmup
from .apply_run import ApplyRunState
from .map_source import MapSource
from .patching import with_hyca


def patch_model(model, solver_map: SolverMap | None, options: ApplyOptions):
    """The patched clone (see `apply_hyca`). Raises ValueError/MapError/UnsupportedModel with a clear
    message if the options or the map do not fit the model."""
    granularity = granularity_for(options, solver_map)
    if solver_map is None:
        try:
            solver_map = map_store.load_for(model, granularity, options.checkpoint)
        except MapError as error:
            logging.warning("HyCa: %s; calibrating a new map from the next run", error)
        if solver_map is None:
            logging.info("HyCa: no solver map for this model yet; the first full run computes every step and "
                         "calibrates")
            ui_text.show(options.node_id, "HyCa: no solver map for this model yet. The next full run "
                                          "computes every step (normal speed), then calibrates and tunes "
                                          "one (about three more runs); the runs after it are faster.")
    source = MapSource(model, solver_map, options, granularity)
    return with_hyca(model, ApplyRunState(source, model.offload_device), granularity)


def apply_hyca(model, solver_map: SolverMap | None = None, schedule: Schedule | None = None, **options):
    """A clone of ``model`` that predicts block residuals between full steps. Without a map, the map stored
    for this base model is used (looked for first beside ``checkpoint``, the model's file if known), or the
    first full run long enough calibrates one. ``schedule``: by default the map's warm-up (its tuned one
    for the run's N) and the shared defaults; ``options``: the fields of `ApplyOptions`."""
    options.setdefault("tuned_warmup", schedule is None)
    schedule = schedule or Schedule(warmup=map_warmup(solver_map))
    return patch_model(model, solver_map, ApplyOptions(schedule=schedule, **options))
