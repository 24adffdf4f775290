"""Clean images for the unconditional attacks and removals: the embedded toy images (`data='toy'`) or a folder of
image files (png, jpg, jpeg, webp, bmp; subfolders included, as in an `imagefolder` dataset with class folders).

Folder images are read lazily, converted to RGB, resized so the shorter side is the model's image size (bicubic)
and centre-cropped to a square; every tensor is (3, size, size) in [-1, 1], the range the models generate."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sealdiff.data.uncond_toy import ToyImageSource
from sealdiff.errors import SealdiffError

TOY = "toy"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def image_files(root: str | Path) -> list[Path]:
    """The image files under `root`, sorted; a missing folder or one without images is refused."""
    root = Path(root)
    if not root.is_dir():
        raise SealdiffError(f"data {root} is not a folder of images (or 'toy' for the embedded toy images)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SealdiffError(f"data {root} holds no images; valid suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}")
    return files


def load_image(file: Path, size: int) -> torch.Tensor:
    """One image file as (3, size, size) in [-1, 1]: shorter side resized to `size`, centre-cropped."""
    try:
        with Image.open(file) as handle:
            image = handle.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise SealdiffError(f"cannot read the image {file} ({exc.__class__.__name__})") from None
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class FolderImageSource:
    """An endless stream of a folder's images in seeded random order (`rng` is a `random.Random`, so a checkpoint
    can save and restore it, as with `ToyImageSource`)."""

    def __init__(self, root: str | Path, seed: int, size: int) -> None:
        self.files, self.size = image_files(root), size
        self.rng = random.Random(seed)

    def batch(self, count: int) -> torch.Tensor:
        return torch.stack([load_image(self.files[self.rng.randrange(len(self.files))], self.size)
                            for _ in range(count)])


def image_source(data: str, seed: int, size: int) -> ToyImageSource | FolderImageSource:
    """The clean-image stream of an attack: toy renders or a folder's images, at the model's image size."""
    return ToyImageSource(seed, size) if data == TOY else FolderImageSource(data, seed, size)


def folder_images(root: str | Path, size: int, limit: int) -> torch.Tensor:
    """Up to `limit` of a folder's images (evenly spaced over its sorted files), (N, 3, size, size) in [-1, 1]."""
    files = image_files(root)
    step = max(1, len(files) // limit)
    return torch.stack([load_image(f, size) for f in files[::step][:limit]])
