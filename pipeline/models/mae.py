"""Masked Autoencoder (He et al. 2021) built from ViT pieces that match timm's (`pipeline.models.vit`).

The model's `forward` is three named calls, as in facebookresearch/mae:

    latent, mask, ids_restore = forward_encoder(imgs, mask_ratio, noise)   # visible patches + CLS only
    pred = forward_decoder(latent, ids_restore)                            # light decoder, all positions
    loss = forward_loss(imgs, pred, mask)                                  # MSE on masked patches only

Masking is "argsort of noise": each sample gets a score per patch, the lowest `len_keep` scores are kept
(visible) and the rest are masked. Random masking draws uniform noise; the strategies in
`pipeline.models.masking` (block-wise, hard-patch) produce their own noise, so any strategy drives the same model.
In `mask`, **0 is keep, 1 is remove** (MAE's convention).

The encoder's parameters use `timm.models.vision_transformer.VisionTransformer`'s key names (`cls_token`,
`pos_embed`, `patch_embed.proj.*`, `blocks.N.*`, `norm.*`), so `export_encoder` writes an `encoder.pth` that
`timm.create_model(size.timm_name, num_classes=0, checkpoint_path=..., **size.timm_kwargs())` loads.
The position embedding is a fixed 2-D sin-cos table (not trained); its CLS slot is zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import UserInputError
from pipeline.models.vit import LAYER_NORM_EPS, Block, PatchEmbed

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class MAESize:
    """One named architecture. Encoder fields match timm's ViT of the same name."""

    timm_name: str  # the timm model whose keys and shapes the encoder matches
    img_size: int  # default input side (pixels); overridable per run
    patch_size: int
    embed_dim: int  # encoder width
    depth: int  # encoder blocks
    num_heads: int
    decoder_dim: int  # decoder width (MAE: 512)
    decoder_depth: int  # decoder blocks (MAE: 8)
    decoder_heads: int
    mlp_ratio: float = 4.0

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that make `timm.create_model(self.timm_name, **kw)` match this encoder."""
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
        }


SIZES: dict[str, MAESize] = {
    # CPU tests: a few thousand images of 32 px in seconds.
    "mae_vit_micro_patch4": MAESize("vit_tiny_patch16_224", 32, 4, 64, 2, 2, 32, 1, 2),
    # The demo default: ViT-Ti's width at 4 blocks, 32 px / patch 4 (64 patches, 16 visible at 75 %): on
    # 2 CPU cores it learns digit shape (kNN well above random init) in the few hundred steps a demo affords.
    "mae_vit_mini_patch4": MAESize("vit_tiny_patch16_224", 32, 4, 192, 4, 3, 128, 2, 4),
    # ViT-Ti at 32 px / patch 4: the full 12 blocks.
    "mae_vit_tiny_patch4": MAESize("vit_tiny_patch16_224", 32, 4, 192, 12, 3, 128, 2, 4),
    "mae_vit_tiny_patch16": MAESize("vit_tiny_patch16_224", 224, 16, 192, 12, 3, 256, 4, 8),
    "mae_vit_small_patch16": MAESize("vit_small_patch16_224", 224, 16, 384, 12, 6, 256, 4, 8),
    # The paper's sizes (decoder 512 wide, 8 deep).
    "mae_vit_base_patch16": MAESize("vit_base_patch16_224", 224, 16, 768, 12, 12, 512, 8, 16),
    "mae_vit_large_patch16": MAESize("vit_large_patch16_224", 224, 16, 1024, 24, 16, 512, 8, 16),
    "mae_vit_huge_patch14": MAESize("vit_huge_patch14_224", 224, 14, 1280, 32, 16, 512, 8, 16),
}
ALIASES = {  # short names for the recommended ones
    "micro": "mae_vit_micro_patch4",
    "mini": "mae_vit_mini_patch4",
    "tiny": "mae_vit_tiny_patch4",
    "small": "mae_vit_small_patch16",
    "base": "mae_vit_base_patch16",
    "large": "mae_vit_large_patch16",
    "huge": "mae_vit_huge_patch14",
}


def get_size(
    name: str,
    img_size: int | None = None,
    decoder_dim: int | None = None,
    decoder_depth: int | None = None,
) -> MAESize:
    """The named size, with optional overrides; unknown names are an error listing the known ones."""
    key = ALIASES.get(name, name)
    if key not in SIZES:
        known = ", ".join([*SIZES, *ALIASES])
        raise UserInputError(f"unknown MAE size {name!r} (pretrain.model); expected one of: {known}")
    size = SIZES[key]
    changes: dict[str, Any] = {}
    if img_size is not None:
        changes["img_size"] = img_size
    if decoder_dim is not None:
        changes["decoder_dim"] = decoder_dim
    if decoder_depth is not None:
        changes["decoder_depth"] = decoder_depth
    size = replace(size, **changes)
    if size.img_size % size.patch_size:
        raise UserInputError(
            f"image size {size.img_size} (pretrain.image_size, else decode.image_size) is not a multiple of "
            f"patch size {size.patch_size} ({size.timm_name})"
        )
    if size.decoder_dim % size.decoder_heads:
        raise UserInputError(
            f"decoder_dim {size.decoder_dim} must be a multiple of {size.decoder_heads} heads"
        )
    if size.decoder_dim % 4:
        raise UserInputError(
            f"decoder_dim {size.decoder_dim} must be a multiple of 4 (2-D sin-cos position table)"
        )
    return size


def size_of(config: Any) -> MAESize:
    """The MAE size a `Config` asks for (`pretrain.model` at the model's input side, with its decoder
    overrides), checked: an unknown name or a shape that cannot work is a ValueError naming the key. The
    commands call it before any work, since the Train workers would otherwise be the first to find out."""
    pre = config.pretrain
    return get_size(
        pre.model,
        img_size=pre.image_size or config.decode.image_size,
        decoder_dim=pre.decoder_dim,
        decoder_depth=pre.decoder_depth,
    )


# ---------------------------------------------------------------------------------------------- helpers


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding: (grid*grid [+1], dim); half the channels encode rows, half
    columns; the CLS row (first) is zeros."""
    assert dim % 4 == 0, f"embed dim must be a multiple of 4 for 2-D sin-cos, got {dim}"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))  # (D/4,)
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (L, D/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (L, D/2)

    table = np.concatenate([encode(ys), encode(xs)], axis=1)  # (L, D), row-major patch order
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table.astype(np.float32)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs: (N, 3, H, W) → (N, L, p*p*3), patches in row-major order, pixels (p, q, channel) inside."""
    n, c, h, w = imgs.shape
    assert h == w and h % p == 0, f"square images with side divisible by {p} expected, got {h}x{w}"
    g = h // p
    x = imgs.reshape(n, c, g, p, g, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, g * g, p * p * c)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """x: (N, L, p*p*3) → imgs (N, 3, H, W); the inverse of `patchify`."""
    n, length, _ = x.shape
    g = int(length**0.5)
    assert g * g == length, f"patch count {length} is not a square"
    x = x.reshape(n, g, g, p, p, 3)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, 3, g * p, g * p)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample at `mask_ratio` (as in MAE: int(L * (1 - ratio)), at least 1)."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def random_noise(n: int, length: int, device: torch.device, generator: torch.Generator | None = None):
    """Uniform per-patch noise (N, L): argsort of it is a uniformly random permutation per sample."""
    return torch.rand(n, length, device=device, generator=generator)


def mask_from_noise(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample shuffle by argsort of `noise` (N, L): the `len_keep` lowest are kept.

    Returns ids_keep (N, len_keep), mask (N, L) in the original patch order with 0 = keep, 1 = remove,
    and ids_restore (N, L) such that gathering the shuffled sequence with it restores the original order.
    """
    n, length = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle to the original order
    return ids_keep, mask, ids_restore


# ---------------------------------------------------------------------------------------------- model


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # scalar to minimise
    pred: torch.Tensor  # (N, L, p*p*3)
    mask: torch.Tensor  # (N, L), 1 = masked
    recon_loss: torch.Tensor  # scalar: MSE on masked patches
    rank_loss: torch.Tensor  # scalar: the loss head's ranking loss (0 without a head)


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder (timm key names) and a light ViT decoder.

    Shapes: imgs (N, 3, H, W) normalised; L = (H / patch)^2 patches; D encoder width; Dd decoder width.
    """

    def __init__(self, size: MAESize, norm_pix_loss: bool = True, loss_head: bool = False) -> None:
        super().__init__()
        self.size = size
        self.norm_pix_loss = norm_pix_loss
        p, d = size.patch_size, size.embed_dim
        # ---- encoder (names as in timm's VisionTransformer)
        self.patch_embed = PatchEmbed(img_size=size.img_size, patch_size=p, in_chans=3, embed_dim=d)
        length = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, length + 1, d), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList(
            [Block(d, size.num_heads, size.mlp_ratio, qkv_bias=True) for _ in range(size.depth)]
        )
        self.norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        # ---- decoder
        dd = size.decoder_dim
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, length + 1, dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(dd, size.decoder_heads, size.mlp_ratio, qkv_bias=True) for _ in range(size.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(dd, p * p * 3)
        # Hard-patch mining: predicts each patch's reconstruction loss (trained with a ranking objective).
        self.loss_head = nn.Linear(dd, 1) if loss_head else None
        self._init_weights()

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def _init_weights(self) -> None:
        grid = self.size.img_size // self.size.patch_size
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.size.embed_dim, grid))[None])
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_pos_embed_2d(self.size.decoder_dim, grid))[None]
        )
        w = self.patch_embed.proj.weight.data  # init like nn.Linear (as MAE does), not like a conv
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------ encoder

    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        noise: torch.Tensor | None = None,
        len_keep: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (N, 3, H, W) → latent (N, 1 + len_keep, D), mask (N, L), ids_restore (N, L).

        `noise` (N, L) chooses the mask (lowest kept); None draws uniform noise (random masking). `len_keep`,
        when given, is the visible count in place of `num_kept(L, mask_ratio)` (see `forward`).
        """
        x = self.patch_embed(imgs)  # (N, L, D)
        x = x + self.pos_embed[:, 1:, :]
        n, length, d = x.shape
        if noise is None:
            noise = random_noise(n, length, x.device)
        assert noise.shape == (n, length), f"noise must be (N, L) = {(n, length)}, got {tuple(noise.shape)}"
        if len_keep is None:
            len_keep = num_kept(length, mask_ratio)
        ids_keep, mask, ids_restore = mask_from_noise(noise, len_keep)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (N, len_keep, D)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + len_keep, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """All patches, in order, no masking: (N, 1 + L, D) — equal to timm's `forward_features`."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    # ------------------------------------------------------------------------------------------ decoder

    def _decode_tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + len_keep, D) → decoder features (N, L, Dd) in the original patch order."""
        x = self.decoder_embed(latent)  # (N, 1 + len_keep, Dd)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        seq = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd), shuffled order
        seq = torch.gather(seq, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], seq], dim=1) + self.decoder_pos_embed  # (N, 1 + L, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)[:, 1:, :]  # drop CLS

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """→ pred (N, L, p*p*3): reconstructed (normalised) pixels for every patch."""
        return self.decoder_pred(self._decode_tokens(latent, ids_restore))

    # ------------------------------------------------------------------------------------------ loss

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch targets (N, L, p*p*3); with norm_pix_loss each patch is standardised on its own."""
        target = patchify(imgs, self.size.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def patch_losses(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch: (N, L)."""
        return ((pred - self.targets(imgs)) ** 2).mean(dim=-1)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of per-patch MSE over masked patches only (mask 1 = removed). With nothing masked
        (ratio 0, e.g. the step-time baseline) it is the mean over all patches: a plain autoencoder."""
        per_patch = self.patch_losses(imgs, pred)
        # No host sync (no `if mask.sum()`): both branches are computed on the device and one is kept, so the
        # step compiles to one graph; the clamp only keeps the unused branch finite when nothing is masked.
        masked = mask.sum()
        return torch.where(masked > 0, (per_patch * mask).sum() / masked.clamp_min(1.0), per_patch.mean())

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        noise: torch.Tensor | None = None,
        loss_head_weight: float = 1.0,
        len_keep: int | None = None,
    ) -> MAEOutput:
        """→ MAEOutput(loss, pred (N, L, p*p*3), mask (N, L) with 1 = masked, recon_loss, rank_loss).

        `loss` is what to minimise: the reconstruction loss, plus `loss_head_weight` × the loss head's
        ranking loss when the model has one (hard-patch mining); otherwise the two are equal.
        `len_keep` (visible patches per sample) overrides `num_kept(L, mask_ratio)`: the compiled training
        step passes it, since torch.compile guards on the float ratio (a ratio schedule would recompile the
        graph at every new ratio) but makes an int that changes a dynamic size after one recompile.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise, len_keep)
        features = self._decode_tokens(latent, ids_restore)  # (N, L, Dd)
        pred = self.decoder_pred(features)
        recon = self.forward_loss(imgs, pred, mask)
        if self.loss_head is None:
            return MAEOutput(recon, pred, mask, recon, recon.new_zeros(()))
        predicted = self.loss_head(features).squeeze(-1)  # (N, L)
        actual = self.patch_losses(imgs, pred).detach()
        rank = ranking_loss(predicted, actual, mask)
        return MAEOutput(recon + loss_head_weight * rank, pred, mask, recon, rank)

    @torch.no_grad()
    def predict_patch_loss(self, imgs: torch.Tensor) -> torch.Tensor:
        """Hard-patch mining: the loss head's score for every patch of the unmasked image, (N, L);
        higher = predicted harder to reconstruct."""
        if self.loss_head is None:
            raise ValueError("this MAE has no loss head; build it with loss_head=True for hard-patch masking")
        latent = self.encode(imgs)  # (N, 1 + L, D), original order
        n, length = imgs.shape[0], self.num_patches
        identity = torch.arange(length, device=imgs.device).expand(n, -1)
        return self.loss_head(self._decode_tokens(latent, identity)).squeeze(-1)

    # ------------------------------------------------------------------------------------------ export

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm ViT key names (decoder and loss head left out)."""
        prefixes = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k.startswith(prefixes)}


def build_mae(
    name: str,
    img_size: int | None = None,
    decoder_dim: int | None = None,
    decoder_depth: int | None = None,
    norm_pix_loss: bool = True,
    loss_head: bool = False,
) -> MaskedAutoencoder:
    """An MAE of the named size (see SIZES / ALIASES)."""
    size = get_size(name, img_size, decoder_dim, decoder_depth)
    return MaskedAutoencoder(size, norm_pix_loss=norm_pix_loss, loss_head=loss_head)


def timm_encoder(size: MAESize, checkpoint_path: str | None = None) -> nn.Module:
    """The matching timm ViT (no head), optionally loading an exported `encoder.pth` (a local file)."""
    import timm

    return timm.create_model(
        size.timm_name,
        pretrained=False,
        num_classes=0,
        checkpoint_path=checkpoint_path or "",
        **size.timm_kwargs(),
    )


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) normalised with ImageNet mean/std."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def ranking_loss(pred: torch.Tensor, actual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Relative objective for the hard-patch head: for random pairs of masked patches (i, j) within a
    sample, BCE(sigmoid(pred_i − pred_j), [actual_i > actual_j]). Only the order of losses is learned.

    pred, actual, mask: (N, L); actual is detached by the caller.
    """
    n, length = pred.shape
    order = torch.argsort(torch.rand(n, length, device=pred.device), dim=1)
    pred_j = torch.gather(pred, 1, order)
    actual_j = torch.gather(actual, 1, order)
    both = mask * torch.gather(mask, 1, order)  # pairs of two masked patches
    target = (actual > actual_j).float()
    per_pair = F.binary_cross_entropy_with_logits(pred - pred_j, target, reduction="none")
    # With no pair the sum is 0 (and so is its gradient): the clamp stands in for `if both.sum() == 0`,
    # which would read the count back to the host every step.
    return (per_pair * both).sum() / both.sum().clamp_min(1.0)
