"""What every trained reference model ships beside its weights: samples its classifier reads as their
class at its recommended setting, a classifier that reads its data set, and a solver map in
calibrations/ that the node layer finds for it."""

import numpy as np
import pytest
import torch

from harness import reference_flux, reference_model, reference_sd3, reference_student

MODELS = {"wan": reference_model, "flux": reference_flux, "sd3": reference_sd3, "student": reference_student}
# The bar; each model's shipped figure is in its module (train_reference's / distill_student's log).
MIN_SAMPLE_ACCURACY = 0.8
SAMPLES_PER_CLASS = 5


@pytest.fixture(scope="module", params=sorted(MODELS))
def reference(request):
    return MODELS[request.param]


def test_samples_show_their_class(reference):
    """Loaded through the loader it ships with, sampled through ComfyUI's sampler at its recommended
    steps and cfg (against its negative prompt where cfg > 1)."""
    labels = np.tile(np.arange(reference.DATA.NUM_CLASSES), SAMPLES_PER_CLASS)
    latent = reference.sample(reference.load(), labels, seed=2024, steps=reference.STEPS, cfg=reference.CFG)
    assert latent.shape == reference.empty_latent(len(labels)).shape
    assert torch.isfinite(latent).all()
    predicted = reference.load_classifier().predict(reference.decode(latent)).numpy()
    accuracy = float((predicted == labels).mean())
    assert accuracy >= MIN_SAMPLE_ACCURACY, accuracy


def test_classifier_reads_real_images_of_its_data(reference):
    images, labels = reference.DATA.make_dataset(100, seed=99)
    predicted = reference.load_classifier().predict(torch.from_numpy(images).float() / 255).numpy()
    assert (predicted == labels).mean() >= 0.95


def test_its_solver_map_ships_in_calibrations_and_is_found(pack, reference):
    model = reference.load()
    found = pack.nodes.map_store.find(model)
    assert found is not None and found.parent == pack.nodes.map_store.SHIPPED
    solver_map = pack.hyca_core.solver_map.SolverMap.load(found)
    patching = pack.nodes.patching
    solver_map.check_fits(patching.model_architecture(model), patching.unit_widths(model))
