"""The Solver Inspector on real probe maps: plot, summary, and two probes' clusterings compared."""



def test_inspector_plots_and_summarizes_and_compares(pack, flux, solver_map, conditioning, latent, steps):
    inspector = pack.nodes.inspector_node.HyCaSolverInspector
    image, text = inspector.execute(solver_map).result
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.shape[1] > 300 and image.shape[2] > 500 and 0 <= float(image.min()) < float(image.max()) <= 1
    assert solver_map.architecture in text and "solver mix" in text
    # a map from another probe seed of the same model: clusterings compared block by block
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    other, _ = pack.nodes.calibrate_node.probe(flux, 1, steps, 1.0, "euler", "simple", *conditioning,
                                               {"samples": latent}, schedule)
    _, compared = inspector.execute(solver_map, other).result
    assert "adjusted Rand index vs the second map over 6 block streams" in compared
    _, same = inspector.execute(solver_map, solver_map).result
    assert "mean 1.000, min 1.000" in same
