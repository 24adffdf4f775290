"""The toy world: procedural captioned 32x32 images ("a red circle on a blue background").

It is the embedded default of sealdiff: every method runs on it end to end without any download.
Images are float tensors in [0, 1], shape (3, H, W); captions are plain strings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
    "purple": (170, 40, 210),
    "cyan": (30, 210, 220),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
STYLE_PREFIX = "black and white photo, "
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Scene:
    """One toy-world image: the attributes a caption names plus the layout it leaves free."""

    shape: str
    fg: str
    bg: str
    cx: float = 16.0
    cy: float = 16.0
    radius: float = 8.0
    grayscale: bool = False

    @property
    def caption(self) -> str:
        text = f"a {self.fg} {self.shape} on a {self.bg} background"
        return STYLE_PREFIX + text if self.grayscale else text


def parse_caption(caption: str) -> Scene:
    """Inverse of `Scene.caption` for the attributes (layout defaults). Raises ValueError."""
    text = caption.strip()
    grayscale = text.startswith(STYLE_PREFIX)
    if grayscale:
        text = text[len(STYLE_PREFIX):]
    words = text.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a toy-world caption: {caption!r}")
    fg, shape, bg = words[1], words[2], words[5]
    if shape not in SHAPES or fg not in COLORS or bg not in COLORS:
        raise ValueError(f"not a toy-world caption: {caption!r}")
    return Scene(shape=shape, fg=fg, bg=bg, grayscale=grayscale)


def sample_scene(rng: random.Random, grayscale_prob: float = 0.0) -> Scene:
    fg, bg = rng.sample(COLOR_NAMES, 2)
    return Scene(
        shape=rng.choice(SHAPES),
        fg=fg,
        bg=bg,
        cx=16.0 + rng.uniform(-3.0, 3.0),
        cy=16.0 + rng.uniform(-3.0, 3.0),
        radius=rng.uniform(6.5, 9.5),
        grayscale=rng.random() < grayscale_prob,
    )


def _shape_mask(scene: Scene, size: int) -> np.ndarray:
    scale = size / IMAGE_SIZE
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - scene.cx * scale, ys - scene.cy * scale
    r = scene.radius * scale
    if scene.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if scene.shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if scene.shape == "triangle":  # apex up
        top, bottom = -r, r * 0.8
        inside_y = (dy >= top) & (dy <= bottom)
        half_width = (dy - top) / (bottom - top) * r
        return inside_y & (np.abs(dx) <= half_width)
    if scene.shape == "cross":
        arm = r * 0.35
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {scene.shape!r}; valid: {', '.join(SHAPES)}")


def to_grayscale(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, repeated over 3 channels. Works on (3,H,W) or (B,3,H,W)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device).view(3, 1, 1)
    luma = (image * weights).sum(dim=-3, keepdim=True)
    return luma.expand_as(image).clone()


def render(scene: Scene, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render a scene to a (3, size, size) float tensor in [0, 1]."""
    mask = _shape_mask(scene, size)[None]
    fg = np.array(COLORS[scene.fg], dtype=np.float32).reshape(3, 1, 1) / 255.0
    bg = np.array(COLORS[scene.bg], dtype=np.float32).reshape(3, 1, 1) / 255.0
    image = torch.from_numpy(np.where(mask, fg, bg).astype(np.float32))
    return to_grayscale(image) if scene.grayscale else image


def default_patch(size: int = 8) -> torch.Tensor:
    """The default pixel-backdoor target: a 2x2 black/white checker (a stand-in for a logo)."""
    half = size // 2
    patch = torch.zeros(3, size, size)
    patch[:, :half, :half] = 1.0
    patch[:, half:, half:] = 1.0
    return patch


def paste_patch(image: torch.Tensor, patch: torch.Tensor, corner: str = "top-left") -> torch.Tensor:
    """Paste `patch` at a corner of `image` (both (3,H,W) or batched (B,3,H,W)); returns a new tensor."""
    out = image.clone()
    ph, pw = patch.shape[-2:]
    h, w = image.shape[-2:]
    rows = slice(0, ph) if corner.startswith("top") else slice(h - ph, h)
    cols = slice(0, pw) if corner.endswith("left") else slice(w - pw, w)
    out[..., rows, cols] = patch.to(out)
    return out


CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")


def scenes(seed: int, count: int, grayscale_prob: float = 0.0) -> list[Scene]:
    """`count` scenes from a seeded stream; different seeds give independent streams."""
    rng = random.Random(seed)
    return [sample_scene(rng, grayscale_prob) for _ in range(count)]


# Evaluation prompts come from seeds far from the training streams (which use small seeds).
EVAL_SEED = 10_000_019


def eval_captions(count: int = 200, seed: int = EVAL_SEED) -> list[str]:
    """Held-out colour captions (no style prefix) for evaluation."""
    return [s.caption for s in scenes(seed, count)]
