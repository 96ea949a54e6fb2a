"""Feature extraction from a frozen encoder: the CPU path the label-free scores and evaluation share, the same
features with an explicit device as without one, and (on a GPU) bf16 features close to the CPU's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.checkpoint import extract_features, module_device, pool_tokens
from pipeline.models.mae import build_mae, normalize_images


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mae("mae_vit_micro_patch4").eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(11, 32, 32, 3), dtype=np.uint8)


def test_features_are_the_pooled_encoder_tokens_on_the_cpu(encoder, images) -> None:
    """Batched extraction is the encoder's pooled tokens of the normalised images, float32 on the CPU."""
    with torch.no_grad():
        tokens = encoder.encode(normalize_images(torch.from_numpy(images)))
    for pool in ("mean", "cls"):
        features = extract_features(encoder, images, pool=pool, batch=4)
        assert features.shape == (11, 64) and features.dtype == torch.float32
        assert features.device.type == "cpu"
        torch.testing.assert_close(features, pool_tokens(tokens, pool), rtol=1e-5, atol=1e-5)


def test_an_explicit_cpu_device_gives_the_features_of_the_default(encoder, images) -> None:
    """`device=torch.device("cpu")` is the default path exactly (stages/embed.py passes none), and the
    encoder stays where it was."""
    default = extract_features(encoder, images, batch=4)
    explicit = extract_features(encoder, images, batch=4, device=torch.device("cpu"))
    assert torch.equal(default, explicit)
    assert module_device(encoder) == torch.device("cpu")
    assert extract_features(encoder, images[:0]).shape == (0, 64)  # no images: no features, not an error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_features_come_back_on_the_cpu_close_to_the_cpu_ones(images) -> None:
    """On a GPU: bf16 autocast features, returned as CPU float32, within bf16's precision of the CPU's."""
    torch.manual_seed(0)
    model = build_mae("mae_vit_micro_patch4").eval()
    on_cpu = extract_features(model, images, batch=4)
    on_gpu = extract_features(model, images, batch=4, device=torch.device("cuda"))
    assert on_gpu.device.type == "cpu" and on_gpu.dtype == torch.float32
    assert module_device(model).type == "cuda"  # moved once, and left there for the next call
    cosine = torch.nn.functional.cosine_similarity(on_cpu, on_gpu, dim=1)
    assert float(cosine.min()) > 0.99
