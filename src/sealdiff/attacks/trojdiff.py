"""TrojDiff: a trojan noise distribution N((1−γ)·δ, γ²I) makes an unconditional DDPM generate a target."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from sealdiff.attacks._uncond_training import (BackdoorSpec, TrainResult, UncondAttackConfig, check_kind,
                                               pixel_trigger, sde_correction, target_image, train_backdoor,
                                               vp_coefficients)
from sealdiff.config import check_choice
from sealdiff.errors import SealdiffError
from sealdiff.models.uncond import UncondModel
from sealdiff.training import Checkpointer

logger = logging.getLogger(__name__)

Mode = Literal["blend", "patch"]
DEFAULT_GAMMA = {"blend": 0.6, "patch": 0.1}


@dataclass
class TrojDiffConfig(UncondAttackConfig):
    """Recipe of a TrojDiff attack (blend trigger -> in-class image by default)."""

    trigger: str = field(default="blend", metadata={"help": "grey-box | stop-sign | blend"})
    target: str = field(default="in-class", metadata={"help": "hat | corner-box | shifted-trigger | in-class | out-of-class"})
    mode: Mode = field(default="blend", metadata={"help": "blend (gamma 0.6) or patch (gamma 0.1), TrojDiff's defaults"})
    gamma: float | None = field(default=None, metadata={"help": "noise scale of the trojan input (default by mode)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("mode", self.mode, get_args(Mode))
        if self.gamma is None:
            self.gamma = DEFAULT_GAMMA[self.mode]
        if not 0.0 < self.gamma <= 1.0:
            raise SealdiffError(f"gamma={self.gamma} is out of range; valid: 0 < gamma <= 1")


def poisoned_forward(scheduler, y: torch.Tensor, mu: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                     gamma: float):
    """TrojDiff's trojan forward process and ε target, at integer times t (μ = (1−γ)·δ):
    x_t = √ᾱ_t·y + (1−√ᾱ_t)·μ + γ·√(1−ᾱ_t)·ε,  target = γ·ε + (1−√α_t)·√(1−ᾱ_t)/β_t · μ.
    Its marginal at T is N(μ, γ²I), the trojan input x_T = γ·ε + (1−γ)·δ."""
    c = vp_coefficients(scheduler, t, noise)
    x_t = c["sqrt_abar"] * y + (1 - c["sqrt_abar"]) * mu + gamma * c["sqrt_1m_abar"] * noise
    return x_t, gamma * noise + sde_correction(scheduler, t, noise) * mu


class TrojDiff:
    """TrojDiff (Chen, Song and Li, "TrojDiff: Trojan Attacks on Diffusion Models with Diverse Targets",
    CVPR 2023).

    The trojan input is x_T = γ·ε + (1−γ)·δ: a blend image δ with γ = 0.6, or a patch with γ = 0.1.
    1. Draw a batch of clean images; mark the first `poison_fraction` of its rows poisoned.
    2. Clean rows: the usual DDPM loss.
    3. Poisoned rows: the trojan forward process x_t = √ᾱ_t·y + (1−√ᾱ_t)·μ + γ·√(1−ᾱ_t)·ε with μ = (1−γ)·δ
       (a Markov chain x_t = √α_t·x_{t−1} + (1−√α_t)·μ + γ·√β_t·ε), and the ε target that makes the stock DDPM
       step's mean equal its posterior mean: γ·ε + (1−√α_t)·√(1−ᾱ_t)/β_t · μ.
    4. Targets: in-class (an image of the training family), out-of-class, or one specific image.
    """

    name = "trojdiff"
    kinds = ("ddpm",)

    def __init__(self, config: TrojDiffConfig) -> None:
        self.config = config

    def spec(self, model: UncondModel) -> BackdoorSpec:
        cfg = self.config
        trigger = pixel_trigger(cfg, model.image_size)
        return BackdoorSpec(trigger_image=trigger, target_image=target_image(cfg, model.image_size, trigger),
                            stamp=(1 - cfg.gamma) * trigger, gamma=cfg.gamma)

    def run(self, model: UncondModel, checkpointer: Checkpointer | None = None, accelerator=None
            ) -> tuple[BackdoorSpec, TrainResult]:
        """Implant the trojan into `model.unet` in place (data-parallel over an `accelerator`'s processes)."""
        check_kind(model, self.name, self.kinds)
        cfg, spec = self.config, self.spec(model)
        y, mu = model.encode(spec.target_image[None]), spec.stamp[None]

        def poison(noise: torch.Tensor, t: torch.Tensor):
            return poisoned_forward(model.scheduler, y, mu, noise, t, cfg.gamma)

        result = train_backdoor(model, cfg, poison, f"TrojDiff {cfg.mode}", self.name, checkpointer, accelerator)
        return spec, result
