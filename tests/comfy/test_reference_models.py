"""What every trained reference model ships beside its weights: a classifier that reads its data set, and
a solver map in calibrations/ that the node layer finds for it."""

import pytest
import torch

from harness import reference_flux, reference_model

MODELS = {"wan": reference_model, "flux": reference_flux}


@pytest.fixture(scope="module", params=sorted(MODELS))
def reference(request):
    return MODELS[request.param]


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
    solver_map.check_fits(patching.model_architecture(model), patching.block_widths(model))
