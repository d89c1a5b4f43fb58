"""Decoding and augmentation on the CPU side: bytes -> uint8 CHW tensors, normalised later on the device.

Randomness comes from a ``random.Random`` the caller seeds per sample, never from global state, so a sample's
crop and caption are a pure function of (seed, epoch, key) whatever worker or process decodes it.
JPEGs use PIL's draft mode: the decoder downscales by 2/4/8 while decoding when the target is small.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image

_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's own conversion clips 16-bit grey (modes ``I;16*``, and ``I`` as 16-bit PNGs open) at 255,
    turning most of a photo white: those are scaled from 0..65535 to 0..255 instead."""
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img, dtype=np.float64) * (255 / 65535)
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def open_image(data: bytes, min_side: int) -> Image.Image:
    """Decodes to RGB, letting the JPEG decoder skip resolution we would throw away (>= ``min_side`` kept)."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG" and min(img.size) >= 2 * min_side:
        scale = min_side / min(img.size)
        img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
    return to_rgb(img)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: random.Random) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop parameter search (10 tries, then centre crop), on a given RNG. A scale of
    (1, 1) skips the search: its centre crop (the whole image within aspect 3/4..4/3) is the only box it could find
    but for rounding, which would shift a few images by a pixel in some epochs (cached features need none)."""
    area = width * height
    for _ in range(0 if scale[0] >= 1 else 10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*_LOG_RATIO))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        h, w = height, round(height * (4 / 3))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def crop_resize_u8(img: Image.Image, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop ``box`` of an RGB image and resize it to ``size`` x ``size``: uint8 CHW.

    torch's uint8 antialiased bicubic kernel (channels-last, the decoded buffer as is) gives PIL's bicubic
    result to within 2 grey levels at a third of PIL's cost, which is most of a small image's budget.
    """
    left, top, right, bottom = box
    hwc = torch.from_numpy(np.array(img, dtype=np.uint8))
    crop_1chw = hwc[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)
    if crop_1chw.shape[-2:] == (size, size):
        return crop_1chw[0].contiguous()
    out = torch.nn.functional.interpolate(crop_1chw, size=(size, size), mode="bicubic", antialias=True)
    return out[0].contiguous()


def train_image(data: bytes, size: int, scale: tuple[float, float], rng: random.Random) -> torch.Tensor:
    # Decode at the smallest JPEG DCT scale (1/2, 1/4, 1/8) whose shorter side is still >= the output size:
    # most of the cost of a 512 px source goes away; a crop is then upsampled by at most 1/sqrt(scale_min * 3/4)
    # (1.2x for open_clip's scale 0.9), where full-resolution decoding would have downsampled it.
    img = open_image(data, size)
    return crop_resize_u8(img, random_resized_crop_box(*img.size, scale, rng), size)


class DeviceNormalize(torch.nn.Module):
    """uint8 NCHW on the device -> float, normalised with the model's mean/std (in the model's dtype)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("inv_std", 1 / (torch.tensor(std).view(1, -1, 1, 1) * 255), persistent=False)

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        return (images_u8.float() - self.mean) * self.inv_std
