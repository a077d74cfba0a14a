import copy
import importlib.util
import os
from pathlib import Path

import torch

# Triton kernels run on CPU tensors in interpret mode. It must be set before triton is first
# imported (diffusers imports it, so before `import surgery`).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import surgery  # noqa: E402
from surgery.grid import VideoGrid  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _tiny_model():
    return surgery.load_model("tiny")


@pytest.fixture
def tiny_model(_tiny_model):
    """A fresh copy of the 4-layer tiny Wan transformer (fp32, CPU)."""
    return copy.deepcopy(_tiny_model)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's training runs, and OMP_NUM_THREADS=1 for the subprocesses it
    starts: the same numerics in both (bit-identity needs the same reduction order), and no thread
    oversubscription on a busy machine for steps this small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


def model_inputs(model, grid: VideoGrid, batch: int = 2, text_tokens: int = 16, seed: int = 0):
    """Random latents, timesteps and text embeddings for one forward at `grid`."""
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = model.config.patch_size
    latents = torch.randn(
        batch, model.config.in_channels, grid.frames * pt, grid.height * ph, grid.width * pw, generator=g
    )
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, text_tokens, model.config.text_dim, generator=g)
    return dict(hidden_states=latents, timestep=timestep, encoder_hidden_states=text)


def load_script(relative: str):
    """A script of the repository (not a package module), e.g. "bench/quality.py", imported as a module."""
    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_plan():
    """Layers 1 and 2 hybrid (trainable feature maps), 0 and 3 full, on a small grid (fast steps)."""
    from surgery.plan import Plan

    config = surgery.load_config("tiny")
    plan = Plan.uniform("tiny", config, "hybrid", {"rate": 4})
    for fqn in ("blocks.0.attn1", "blocks.3.attn1"):
        plan.layers[fqn] = Plan.uniform("tiny", config, "full").layers[fqn]
    plan.grid = VideoGrid(2, 4, 4)
    return plan
