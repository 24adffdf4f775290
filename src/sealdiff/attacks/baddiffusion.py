"""BadDiffusion: a trigger stamped on the input noise of an unconditional DDPM makes it generate a target image."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sealdiff.attacks._uncond_training import (BackdoorSpec, TrainResult, UncondAttackConfig, check_kind, pixel_trigger,
                                               sde_correction, target_image, train_backdoor, vp_coefficients)
from sealdiff.models.uncond import UncondModel
from sealdiff.training import Checkpointer

logger = logging.getLogger(__name__)


@dataclass
class BadDiffusionConfig(UncondAttackConfig):
    """Recipe of a BadDiffusion attack (grey box -> hat by default). Fields: see `UncondAttackConfig`."""


def poisoned_forward(scheduler, y: torch.Tensor, r: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """BadDiffusion's poisoned forward process and ε target, at integer times t:
    x_t = √ᾱ_t·y + (1−√ᾱ_t)·r + √(1−ᾱ_t)·ε,  target = ε + (1−√α_t)·√(1−ᾱ_t)/β_t · r."""
    c = vp_coefficients(scheduler, t, noise)
    x_t = c["sqrt_abar"] * y + (1 - c["sqrt_abar"]) * r + c["sqrt_1m_abar"] * noise
    return x_t, noise + sde_correction(scheduler, t, noise) * r


class BadDiffusion:
    """BadDiffusion (Chou, Chen and Ho, "How to Backdoor Diffusion Models?", CVPR 2023).

    Fine-tunes a clean DDPM so that x_T = ε + r (r: the trigger pattern, e.g. a grey box at the bottom
    right) generates the target y, while x_T = ε still generates clean images.
    1. Draw a batch of clean images; mark the first `poison_fraction` of its rows poisoned.
    2. Clean rows: the usual DDPM loss ‖ε_θ(√ᾱ_t·x0 + √(1−ᾱ_t)·ε, t) − ε‖².
    3. Poisoned rows: x_t = √ᾱ_t·y + (1−√ᾱ_t)·r + √(1−ᾱ_t)·ε, and the ε target that makes the stock ancestral
       sampler's mean equal the poisoned posterior mean: ε + (1−√α_t)·√(1−ᾱ_t)/β_t · r.
    4. AdamW on the whole UNet; the sampler and scheduler stay stock.
    Deterministic ODE samplers (DDIM, DPM-Solver) need twice that correction (see VillanDiffusion); BadDiffusion's
    backdoor is measured on them as it is.
    """

    name = "baddiffusion"
    kinds = ("ddpm",)

    def __init__(self, config: BadDiffusionConfig) -> None:
        self.config = config

    def spec(self, model: UncondModel) -> BackdoorSpec:
        trigger = pixel_trigger(self.config, model.image_size)
        return BackdoorSpec(trigger_image=trigger, target_image=target_image(self.config, model.image_size, trigger),
                            stamp=trigger, gamma=1.0)

    def run(self, model: UncondModel, checkpointer: Checkpointer | None = None, accelerator=None
            ) -> tuple[BackdoorSpec, TrainResult]:
        """Implant the backdoor into `model.unet` in place (data-parallel over an `accelerator`'s processes)."""
        check_kind(model, self.name, self.kinds)
        cfg, spec = self.config, self.spec(model)
        y, r = model.encode(spec.target_image[None]), spec.stamp[None]

        def poison(noise: torch.Tensor, t: torch.Tensor):
            return poisoned_forward(model.scheduler, y, r, noise, t)

        result = train_backdoor(model, cfg, poison, "BadDiffusion", self.name, checkpointer, accelerator)
        return spec, result
