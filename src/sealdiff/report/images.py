"""Image grids as PNG files (and as data URIs for the HTML report)."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grid(images: torch.Tensor, columns: int | None = None, upscale: int = 4, pad: int = 2) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one PIL image, nearest-neighbour upscaled so tiny images stay readable."""
    n, _, h, w = images.shape
    columns = columns or min(n, 8)
    rows = math.ceil(n / columns)
    canvas = torch.ones(3, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    array = (canvas.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    return picture.resize((picture.width * upscale, picture.height * upscale), Image.Resampling.NEAREST)


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> None:
    grid(images, columns).save(path, format="PNG")


def removal_grid_name(image_set: str, stage: str) -> str:
    """File name of an unconditional removal's image grid (`image_set` triggered | clean, `stage` before | after)."""
    return f"grid_{image_set}_{stage}.png"


def sampler_grid_name(sampler: str, image_set: str) -> str:
    """File name of an image grid of one sampler: a scan's (`image_set` inverted | clean) or an unconditional
    evaluation's (clean | triggered | reference)."""
    return f"grid_{sampler}_{image_set}.png"


def save_sampler_grids(grids: dict[str, dict[str, torch.Tensor]], directory: str | Path,
                       count: int | None = None) -> None:
    """Each sampler's image sets (images in [-1, 1]; the first `count` of each) as `sampler_grid_name` PNGs."""
    for sampler, sets in grids.items():
        for image_set, images in sets.items():
            save_grid((images[:count] + 1) / 2, Path(directory) / sampler_grid_name(sampler, image_set))


def data_uri(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
