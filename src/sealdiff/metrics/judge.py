"""The toy world's judge: a small CNN that reads shape, foreground colour, background colour and
patch presence off a 32x32 image. Its penultimate features serve the toy-world FID."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sealdiff.data.toyworld import COLOR_NAMES, SHAPES

HEADS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "fg": COLOR_NAMES, "bg": COLOR_NAMES, "patch": ("no", "yes")}


class ToyJudge(nn.Module):
    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())
        self.body = nn.Sequential(block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, len(labels)) for name, labels in HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [0, 1], (B, 3, H, W); resized to 32x32 if needed."""
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        logits = self(images)
        return {name: [HEADS[name][i] for i in logits[name].argmax(-1).tolist()] for name in HEADS}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "judge.safetensors"))
        (directory / "judge.json").write_text(json.dumps({"heads": HEADS}, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "ToyJudge":
        judge = cls()
        judge.load_state_dict(load_file(str(Path(directory) / "judge.safetensors")))
        return judge.eval()


@dataclass
class JudgeAccuracy:
    shape: float
    fg: float
    bg: float
    patch: float
    count: int
