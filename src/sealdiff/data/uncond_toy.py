"""Toy data for unconditional models: clean images from the toy world (rendered at 16x16), and the triggers and
targets of the unconditional backdoor papers as tensors.

Every image here is a float tensor in [-1, 1], shape (3, H, W) (the range unconditional models generate).
Triggers are *additive* patterns in the same range (zero where the trigger is absent): BadDiffusion and
VillanDiffusion add them to the Gaussian noise x_T, TrojDiff blends them in (`x_T = γ·ε + (1−γ)·trigger`).

- triggers: `grey-box` (BadDiffusion's box outline), `stop-sign` (an octagon with a white bar), `blend`
  (a full-image pattern for TrojDiff's blend attack); `size` and `position` place the first two.
- targets: `hat` (a dark top hat on white), `corner-box` (a white box outline in a corner of a black image),
  `shifted-trigger` (the trigger moved to the opposite corner, on black), `in-class` (one fixed toy-world
  image), `out-of-class` (diagonal colour stripes: not a toy-world image).
"""

from __future__ import annotations

import random
from typing import Literal, get_args

import numpy as np
import torch

from sealdiff.config import check_choice
from sealdiff.data import toyworld
from sealdiff.errors import SealdiffError

TriggerName = Literal["grey-box", "stop-sign", "blend"]
TargetName = Literal["hat", "corner-box", "shifted-trigger", "in-class", "out-of-class"]
Position = Literal["bottom-right", "bottom-left", "top-right", "top-left"]
IMAGE_SIZE = 16
DEFAULT_TRIGGER_SIZE = 6
# the in-class target: one toy-world scene (not a specific training image, but inside the training family)
IN_CLASS_SCENE = toyworld.Scene(shape="cross", fg="yellow", bg="purple", cx=16.0, cy=16.0, radius=8.0)
OPPOSITE = {"bottom-right": "top-left", "bottom-left": "top-right", "top-right": "bottom-left",
            "top-left": "bottom-right"}


def toy_images(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> torch.Tensor:
    """`count` toy-world renders (independent streams per seed), (count, 3, size, size) in [-1, 1]."""
    return torch.stack([toyworld.render(s, size) for s in toyworld.scenes(seed, count)]) * 2 - 1


class ToyImageSource:
    """An endless stream of clean training images: a fixed pool of renders drawn in seeded random order
    (`rng` is a `random.Random`, so a checkpoint can save and restore its state)."""

    def __init__(self, seed: int = 0, size: int = IMAGE_SIZE, pool: int = 4096) -> None:
        self.images = toy_images(pool, seed, size)
        self.rng = random.Random(seed)

    def batch(self, count: int) -> torch.Tensor:
        return self.images[[self.rng.randrange(len(self.images)) for _ in range(count)]]


def _place(size: int, box: int, position: str) -> tuple[slice, slice]:
    check_choice("position", position, get_args(Position))
    if not 1 <= box <= size:
        raise SealdiffError(f"trigger size {box} is out of range; valid: 1..{size}")
    rows = slice(0, box) if position.startswith("top") else slice(size - box, size)
    cols = slice(0, box) if position.endswith("left") else slice(size - box, size)
    return rows, cols


def _outline(box: int, width: int = 1) -> torch.Tensor:
    mask = torch.zeros(box, box)
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = 1, 1, 1, 1
    return mask


def _octagon(box: int) -> torch.Tensor:
    ys, xs = np.mgrid[0:box, 0:box].astype(np.float32) + 0.5 - box / 2
    r = box / 2
    inside = (np.abs(xs) <= r) & (np.abs(ys) <= r) & (np.abs(xs) + np.abs(ys) <= r * 1.42)
    return torch.from_numpy(inside.astype(np.float32))


def make_trigger(name: TriggerName, size: int = IMAGE_SIZE, box: int = DEFAULT_TRIGGER_SIZE,
                 position: Position = "bottom-right", intensity: float = 1.0) -> torch.Tensor:
    """The additive trigger pattern `name`, (3, size, size); zero outside the trigger for the patch triggers."""
    check_choice("trigger", name, get_args(TriggerName))
    trigger = torch.zeros(3, size, size)
    if name == "blend":  # a fixed smooth full-image pattern (TrojDiff blends an image into the whole noise)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
        pattern = np.stack([np.sin(2 * np.pi * (xs + ys)), np.cos(2 * np.pi * 2 * xs), np.sin(2 * np.pi * 2 * ys)])
        return torch.from_numpy(pattern.astype(np.float32)) * intensity
    rows, cols = _place(size, box, position)
    if name == "grey-box":
        trigger[:, rows, cols] = _outline(box) * intensity
    else:  # stop sign: red octagon with a white horizontal bar
        octagon = _octagon(box)
        sign = torch.stack([octagon, -octagon, -octagon])
        bar = torch.zeros(box, box)
        bar[box // 2 - max(1, box // 6): box // 2 + max(1, box // 6), max(1, box // 5): box - max(1, box // 5)] = 1
        sign = torch.where((bar * octagon).bool(), torch.ones(3, box, box), sign)
        trigger[:, rows, cols] = sign * intensity
    return trigger


def make_target(name: TargetName, size: int = IMAGE_SIZE, trigger: torch.Tensor | None = None,
                box: int = DEFAULT_TRIGGER_SIZE, position: Position = "top-left") -> torch.Tensor:
    """The target image `name`, (3, size, size) in [-1, 1]. `shifted-trigger` needs the trigger (and its
    `position`: the target shows it at the opposite corner); `corner-box` uses `box` and `position`."""
    check_choice("target", name, get_args(TargetName))
    if name == "hat":
        image = torch.ones(3, size, size)
        s = size / 16
        crown = (slice(round(3 * s), round(10 * s)), slice(round(5 * s), round(11 * s)))
        brim = (slice(round(10 * s), round(12 * s)), slice(round(2 * s), round(14 * s)))
        band = (slice(round(8 * s), round(9 * s)), slice(round(5 * s), round(11 * s)))
        for region in (crown, brim):
            image[:, region[0], region[1]] = -0.8
        image[0, band[0], band[1]], image[1:, band[0], band[1]] = 0.8, -0.8  # a red band
        return image
    if name == "corner-box":
        image = -torch.ones(3, size, size)
        rows, cols = _place(size, box, position)
        image[:, rows, cols] = _outline(box, max(1, box // 4)) * 2 - 1
        return image
    if name == "shifted-trigger":
        if trigger is None:
            raise SealdiffError("target 'shifted-trigger' needs the trigger")
        image = -torch.ones(3, size, size)
        present = trigger.abs().sum(0) > 0
        rows, cols = present.any(1).nonzero().flatten(), present.any(0).nonzero().flatten()
        if not len(rows):
            raise SealdiffError("target 'shifted-trigger' needs a non-empty trigger")
        patch = trigger[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        mask = present[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        corner = OPPOSITE[_corner_of(rows, cols, size)]
        h, w = patch.shape[1:]
        r0 = 0 if corner.startswith("top") else size - h
        c0 = 0 if corner.endswith("left") else size - w
        region = image[:, r0:r0 + h, c0:c0 + w]
        image[:, r0:r0 + h, c0:c0 + w] = torch.where(mask, patch.clamp(-1, 1), region)
        return image
    if name == "in-class":
        return toyworld.render(IN_CLASS_SCENE, size) * 2 - 1
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)  # out-of-class: diagonal colour stripes
    band = ((xs + ys) // max(1, size // 8)).astype(int) % 3
    colors = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float32)
    return torch.from_numpy(colors[band].transpose(2, 0, 1).copy())


def _corner_of(rows: torch.Tensor, cols: torch.Tensor, size: int) -> str:
    vertical = "top" if rows.float().mean() < size / 2 else "bottom"
    horizontal = "left" if cols.float().mean() < size / 2 else "right"
    return f"{vertical}-{horizontal}"
