"""Checkpoints and encoders on storage: write `encoder.pth`, read it back (or a checkpoint's `state.pt`),
infer its size from the tensor shapes, build a frozen encoder from it, and turn images into features: where
the encoder is (the CPU for one built here) or on a given device (evaluation passes `evaluate.device`), the
features coming back on the CPU either way.

`encoder.pth` is a plain state dict with timm's ViT keys, so `timm.create_model(..., checkpoint_path=...)`
loads it; pretraining writes it, evaluation, label-free scoring and warm starts read it.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import UserInputError
from pipeline.core.storage import atomic_write_bytes, join, read_bytes, url_to_fs
from pipeline.models.augment import to_device
from pipeline.models.mae import SIZES, MAESize, MaskedAutoencoder, get_size, normalize_images

log = logging.getLogger(__name__)

# the encoder part of a state dict, in timm ViT keys
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def encoder_bytes(model: MaskedAutoencoder) -> bytes:
    """`encoder.pth` as bytes: a plain state dict with timm keys (loadable with torch.load, weights_only)."""
    buffer = io.BytesIO()
    torch.save(model.encoder_state_dict(), buffer)
    return buffer.getvalue()


def export_encoder(model: MaskedAutoencoder, url: str, storage_options: dict | None = None) -> str:
    """Write the encoder to `url` (any fsspec URL, atomically); returns `url`."""
    atomic_write_bytes(url, encoder_bytes(model), storage_options)
    log.info("wrote encoder (%s) to %s", model.size.timm_name, url)
    return url


def read_encoder_state(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """An encoder state dict (timm keys) from `encoder.pth`, a pretraining output folder (its
    `encoder.pth`) or a checkpoint folder / `state.pt` (the encoder part of the saved model)."""
    fs, path = url_to_fs(url, storage_options)
    if fs.isdir(path):
        for name in ("encoder.pth", "state.pt"):
            if fs.exists(f"{path.rstrip('/')}/{name}"):
                url = join(url, name)
                break
        else:
            raise UserInputError(f"no encoder.pth or state.pt under {url}")
    state = torch.load(io.BytesIO(read_bytes(url, storage_options)), map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}


def size_from_state(state: dict[str, torch.Tensor], hint: str | None = None) -> MAESize:
    """The architecture that `state` fits: width, depth, patch and image size from the tensor shapes; heads
    from the named size with that width and depth (`hint` first, e.g. pretrain.model)."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise UserInputError("not a ViT encoder state dict: cls_token / patch_embed.proj.weight missing")
    dim = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    names = ([hint] if hint else []) + list(SIZES)
    for name in names:
        size = get_size(name)
        if (size.embed_dim, size.depth, size.patch_size) == (dim, depth, patch):
            return get_size(name, img_size=grid * patch)
    raise UserInputError(
        f"no known size has width {dim}, depth {depth}, patch {patch}; see pipeline/models/mae.py"
    )


def encoder_from_state(size: MAESize, state: dict[str, torch.Tensor] | None) -> MaskedAutoencoder:
    """The MAE of `size` with the encoder weights `state` (timm keys, every one required); None: MAE's
    initialisation (the baseline). Only its encoder is used (`encode`)."""
    model = MaskedAutoencoder(size)
    if state is not None:
        expected = set(model.encoder_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise UserInputError(
                f"the encoder weights do not match {size.timm_name} at {size.img_size} px: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.load_state_dict(state, strict=False)  # strict about shapes; the decoder keeps its init
    return model.eval()


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, 1 + L, D) → (N, D): the CLS token (`pool="cls"`) or the mean patch token."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of `module`'s first parameter (CPU for one without parameters)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


@torch.no_grad()
def extract_features(
    encoder: MaskedAutoencoder,
    images: np.ndarray,
    pool: str = "mean",
    batch: int = 256,
    device: torch.device | None = None,
) -> torch.Tensor:
    """images (N, S, S, 3) uint8 → features (N, D) float32 on the CPU: the CLS token or the mean patch token.

    The batches run on `device` (None: where the encoder's weights are, the CPU for an encoder fresh from
    `encoder_from_state`); an encoder elsewhere is moved there in place and stays, so a second call copies
    nothing. On CUDA the uint8 pixels go pinned and non-blocking (a quarter of the bytes of floats) and are
    normalised there, the encoder runs under bf16 autocast as in pretraining, and each batch's features come
    back non-blocking while the next batch runs: the host waits once, at the end. Callers always get CPU
    tensors, whatever the device."""
    device = device or module_device(encoder)
    if module_device(encoder) != device:
        encoder.to(device)
    on_gpu = device.type == "cuda"
    out = []
    for start in range(0, len(images), batch):
        pixels = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
        x = normalize_images(to_device(pixels, device))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            tokens = encoder.encode(x)  # (n, 1 + L, D)
        features = pool_tokens(tokens, pool).float()
        out.append(features.to("cpu", non_blocking=True) if on_gpu else features)
    if on_gpu:
        torch.cuda.synchronize(device)  # the non-blocking copies back have landed
    return torch.cat(out) if out else torch.zeros(0, encoder.size.embed_dim)


def load_warm_start(model: MaskedAutoencoder, url: str, storage_options: dict[str, Any]) -> None:
    """Initialise from an `encoder.pth` (encoder only) or a checkpoint's `state.pt` (whole model)."""
    if not url.endswith((".pth", ".pt")):
        url = join(url, "state.pt")
    state = torch.load(io.BytesIO(read_bytes(url, storage_options)), map_location="cpu", weights_only=False)
    weights = state.get("model", state)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise UserInputError(f"warm start {url} has keys this model lacks, e.g. {unexpected[:3]}")
    log.info("warm start from %s (%d keys not in it)", url, len(missing))
