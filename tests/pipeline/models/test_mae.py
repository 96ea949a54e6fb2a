"""MAE model: masking shapes and bookkeeping, loss only on masked patches, timm loads the exported encoder."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.checkpoint import export_encoder
from pipeline.models.mae import (
    SIZES,
    build_mae,
    get_size,
    mask_from_noise,
    num_kept,
    patchify,
    sincos_pos_embed_2d,
    timm_encoder,
    unpatchify,
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mae("mae_vit_micro_patch4").eval()


def test_visible_tokens_are_one_minus_ratio_of_patches(model) -> None:
    imgs = torch.randn(3, 3, 32, 32)
    for ratio in (0.0, 0.5, 0.75, 0.9):
        latent, mask, _ids_restore = model.forward_encoder(imgs, ratio)
        kept = num_kept(64, ratio)
        assert kept == max(1, int(64 * (1 - ratio)))
        assert latent.shape == (3, 1 + kept, model.size.embed_dim)  # CLS + visible patches only
        assert mask.shape == (3, 64)
        assert torch.all(mask.sum(dim=1) == 64 - kept)


def test_ids_restore_inverts_the_shuffle() -> None:
    noise = torch.rand(4, 16)
    ids_keep, mask, ids_restore = mask_from_noise(noise, 5)
    ids_shuffle = torch.argsort(noise, dim=1)
    sequence = torch.arange(16).expand(4, -1)
    shuffled = torch.gather(sequence, 1, ids_shuffle)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), sequence)
    # kept patches are the lowest-noise ones, and the mask marks exactly the others (0 keep, 1 remove)
    for row in range(4):
        expected_kept = set(torch.topk(noise[row], 5, largest=False).indices.tolist())
        assert set(ids_keep[row].tolist()) == expected_kept
        assert set(torch.nonzero(mask[row] == 0).flatten().tolist()) == expected_kept


def test_loss_ignores_visible_patches(model) -> None:
    torch.manual_seed(1)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    with torch.no_grad():
        out = model(imgs, 0.75, noise)
    visible = torch.nonzero(out.mask[0] == 0).flatten()
    masked = torch.nonzero(out.mask[0] == 1).flatten()
    # Change the *target* of one visible patch (prediction fixed): the loss must not move.
    target_imgs = patchify(imgs, 4)
    changed = target_imgs.clone()
    changed[0, visible[0]] += 5.0 * torch.randn_like(changed[0, visible[0]])
    loss_a = model.forward_loss(imgs, out.pred, out.mask)
    loss_b = model.forward_loss(unpatchify(changed, 4), out.pred, out.mask)
    assert torch.allclose(loss_a, loss_b)
    # ... while changing a masked patch's target does move it.
    changed = target_imgs.clone()
    changed[0, masked[0]] += 5.0 * torch.randn_like(changed[0, masked[0]])
    assert not torch.allclose(loss_a, model.forward_loss(unpatchify(changed, 4), out.pred, out.mask))


def test_patchify_round_trip() -> None:
    imgs = torch.randn(2, 3, 16, 16)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 16, 48)
    assert torch.equal(unpatchify(patches, 4), imgs)


def test_sincos_pos_embed_is_fixed_and_distinct() -> None:
    table = sincos_pos_embed_2d(64, 8)
    assert table.shape == (65, 64)
    assert (table[0] == 0).all()  # CLS slot
    distances = torch.cdist(torch.from_numpy(table[1:]), torch.from_numpy(table[1:]))
    assert (distances + torch.eye(64) * 10).min() > 1e-3  # every position differs


def test_timm_loads_the_exported_encoder_with_the_same_features(model, tmp_path) -> None:
    url = export_encoder(model, str(tmp_path / "encoder.pth"))
    encoder = timm_encoder(model.size, url).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.encode(imgs)
        theirs = encoder.forward_features(imgs)
    assert ours.shape == theirs.shape == (2, 65, model.size.embed_dim)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_named_sizes_match_timm_shapes() -> None:
    import timm

    for name in ("mae_vit_tiny_patch4", "mae_vit_small_patch16", "mae_vit_base_patch16"):
        size = get_size(name)
        mae = build_mae(name)
        reference = timm.create_model(size.timm_name, pretrained=False, num_classes=0, **size.timm_kwargs())
        ours = {k: tuple(v.shape) for k, v in mae.encoder_state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        assert ours == theirs, name
    assert {"mae_vit_large_patch16", "mae_vit_huge_patch14"} <= set(SIZES)


def test_unknown_size_names_the_choices() -> None:
    with pytest.raises(ValueError, match="mae_vit_tiny_patch4"):
        get_size("vit_gigantic")


def test_hard_patch_head_trains_with_a_ranking_loss() -> None:
    torch.manual_seed(0)
    mae = build_mae("mae_vit_micro_patch4", loss_head=True)
    imgs = torch.randn(4, 3, 32, 32)
    out = mae(imgs, 0.75, loss_head_weight=1.0)
    assert out.rank_loss > 0
    torch.testing.assert_close(out.loss, out.recon_loss + out.rank_loss)
    out.loss.backward()
    assert mae.loss_head.weight.grad is not None and mae.loss_head.weight.grad.abs().sum() > 0
    assert mae.predict_patch_loss(imgs).shape == (4, 64)


def test_our_vit_block_computes_what_timm_block_computes() -> None:
    from functools import partial

    from timm.models.vision_transformer import Block as TimmBlock

    from pipeline.models.vit import Block

    ours = Block(64, 4, mlp_ratio=4.0).eval()
    theirs = TimmBlock(64, 4, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    theirs.load_state_dict(ours.state_dict())  # same names and shapes, strict
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs.eval()(x))


def test_training_code_does_not_import_timm() -> None:
    """Every Train worker imports pipeline.train; timm (with torchvision and dynamo) would add seconds."""
    import subprocess
    import sys

    code = "import sys, pipeline.train, pipeline.models.mae; sys.exit('timm' in sys.modules or 'torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_losses_need_no_masked_count_on_the_host(model) -> None:
    """forward_loss and ranking_loss pick their branch on the device: with nothing masked the reconstruction
    loss is the mean over all patches, and the ranking loss is 0 with no gradient; else the masked means."""
    from pipeline.models.mae import ranking_loss

    torch.manual_seed(2)
    imgs, pred = torch.randn(2, 3, 32, 32), torch.randn(2, 64, 48)
    per_patch = model.patch_losses(imgs, pred)
    none = torch.zeros(2, 64)
    assert torch.equal(model.forward_loss(imgs, pred, none), per_patch.mean())
    some = (torch.rand(2, 64) < 0.75).float()
    assert torch.equal(model.forward_loss(imgs, pred, some), (per_patch * some).sum() / some.sum())

    scores = torch.randn(2, 64, requires_grad=True)
    zero = ranking_loss(scores, per_patch, none)
    zero.backward()
    assert float(zero.detach()) == 0.0 and scores.grad is not None and not scores.grad.any()
    assert float(ranking_loss(scores, per_patch, some).detach()) > 0
