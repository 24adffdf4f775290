"""Captioned image sources for training: the toy world (endless, procedural) or a Hugging Face
`imagefolder` directory with `metadata.jsonl` captions (the diffusers text-to-image convention)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from sealdiff.data import toyworld
from sealdiff.data.images import IMAGE_SUFFIXES, load_image
from sealdiff.errors import SealdiffError


@dataclass
class Sample:
    image: torch.Tensor  # (3, H, W) in [0, 1]
    caption: str


class ToyWorldSource:
    """Endless toy-world samples from a seeded stream."""

    def __init__(self, seed: int, size: int = toyworld.IMAGE_SIZE) -> None:
        self.rng, self.size = random.Random(seed), size

    def sample(self) -> Sample:
        scene = toyworld.sample_scene(self.rng)
        return Sample(toyworld.render(scene, self.size), scene.caption)

    def sample_matching(self, word: str) -> Sample:
        """A sample whose caption contains `word` (e.g. an object name)."""
        for _ in range(10_000):
            sample = self.sample()
            if word in sample.caption.split():
                return sample
        raise SealdiffError(f"the toy world has no captions with {word!r}; valid objects: {', '.join(toyworld.SHAPES)}")


class ImageFolderSource:
    """Images + `metadata.jsonl` lines {"file_name": ..., "text": ...}, each resized so its shorter side is `size`
    and centre-cropped to a square (`data.images.load_image`; a non-square image is not stretched)."""

    def __init__(self, root: str | Path, seed: int, size: int, caption_column: str = "text") -> None:
        root = Path(root)
        meta = root / "metadata.jsonl"
        if not meta.is_file():
            raise SealdiffError(f"{root} is not an imagefolder dataset (no metadata.jsonl)")
        self.items: list[tuple[Path, str]] = []
        for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                file, caption = root / row["file_name"], str(row[caption_column])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SealdiffError(f"{meta}:{number} needs JSON with 'file_name' and '{caption_column}'") from None
            if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
                raise SealdiffError(f"{meta}:{number}: image {file} is missing or not an image")
            self.items.append((file, caption))
        if not self.items:
            raise SealdiffError(f"{meta} lists no images")
        self.rng, self.size = random.Random(seed), size

    def _load(self, file: Path, caption: str) -> Sample:
        return Sample((load_image(file, self.size) + 1) / 2, caption)

    def sample(self) -> Sample:
        return self._load(*self.rng.choice(self.items))

    def sample_matching(self, word: str) -> Sample:
        matching = [item for item in self.items if word in item[1].split()]
        if not matching:
            raise SealdiffError(f"no caption in the dataset mentions {word!r}")
        return self._load(*self.rng.choice(matching))


def open_source(data: str, seed: int, size: int) -> ToyWorldSource | ImageFolderSource:
    return ToyWorldSource(seed, size) if data == "toy" else ImageFolderSource(data, seed, size)
