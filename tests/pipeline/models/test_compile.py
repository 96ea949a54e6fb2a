"""The MAE's training forward compiles to one graph: no graph break and no host sync, whatever the mask strategy
(the strategies only change the noise the step feeds in); a mask-ratio schedule costs one recompile, not one
per ratio. Traced with Dynamo's cheap backends here; inductor's numbers are checked in tests/pipeline/test_train.py."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from pipeline.core.config import MaskConfig
from pipeline.models.mae import build_mae, num_kept
from pipeline.models.masking import Masker


def _inputs(strategy: str, model, ratio: float = 0.75):
    torch.manual_seed(0)
    imgs = torch.randn(4, 3, 32, 32)
    masker = Masker(MaskConfig(strategy=strategy), grid=8, seed=0)
    predicted = model.predict_patch_loss(imgs) if masker.needs_prediction else None
    return imgs, masker(4, ratio, 0.5, predicted)


@pytest.mark.parametrize("strategy", ["random", "block", "hard-patch"])
def test_training_forward_has_no_graph_break(strategy: str) -> None:
    torch._dynamo.reset()
    model = build_mae("micro", loss_head=strategy == "hard-patch")
    imgs, noise = _inputs(strategy, model)
    explained = torch._dynamo.explain(model)(imgs, 0.75, noise, 1.0, len_keep=num_kept(64, 0.75))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    # fullgraph: forward and (through AOTAutograd) backward traced whole; the same loss and gradients
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)  # the hard-patch ranking loss draws its pairs
    out = compiled(imgs, 0.75, noise, 1.0, len_keep=num_kept(64, 0.75))
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    torch.manual_seed(1)
    eager = model(imgs, 0.75, noise, 1.0)
    eager.loss.backward()
    assert torch.allclose(out.loss, eager.loss, rtol=1e-5)
    assert torch.allclose(out.recon_loss, eager.recon_loss, rtol=1e-5)
    expected = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(expected)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, expected, strict=True))


def test_a_ratio_schedule_recompiles_once() -> None:
    """len_keep is an int argument: after the first change Dynamo makes it a dynamic size."""
    torch._dynamo.reset()
    model = build_mae("micro")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for ratio in (0.75, 0.7, 0.65, 0.6, 0.5):
        imgs, noise = _inputs("random", model, ratio)
        out = compiled(imgs, ratio, noise, 1.0, len_keep=num_kept(64, ratio))
        assert torch.allclose(out.loss, model(imgs, ratio, noise).loss, rtol=1e-5)
    assert counter.frame_count == 2
