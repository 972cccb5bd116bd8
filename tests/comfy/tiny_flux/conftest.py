"""The larger tiny FLUX (tiny_models.FLUX, a 32x32 latent) and the map of one probe on it: the setting of
the behaviour tests in this folder."""

import pytest
import torch
from harness import sampling, tiny_models


@pytest.fixture(scope="module")
def steps():
    """The length of every run here."""
    return 20


@pytest.fixture(scope="module")
def apply_every(pack):
    """HyCa Apply with warm-up 3 and one full step every ``interval``."""

    def apply(model, solver_map, interval, **kwargs):
        schedule = pack.hyca_core.schedule.Schedule(interval=interval, warmup=3)
        return pack.nodes.apply_hyca.apply_hyca(model, solver_map, schedule, **kwargs)

    return apply


@pytest.fixture(scope="module")
def flux_config():
    return tiny_models.FLUX


@pytest.fixture(scope="module")
def latent():
    return torch.zeros(1, 16, 32, 32)


@pytest.fixture(scope="module")
def full(flux, conditioning, latent, steps):
    return sampling.sample(flux, *conditioning, latent, steps=steps, seed=5)


@pytest.fixture(scope="module")
def solver_map(pack, flux, conditioning, latent, steps):
    calibrate = pack.nodes.calibrate_node
    schedule = pack.hyca_core.schedule.Schedule(interval=4, warmup=3)
    solver_map, _ = calibrate.probe(flux, 0, steps, 1.0, "euler", "simple", *conditioning,
                                    {"samples": latent}, schedule)
    return solver_map
