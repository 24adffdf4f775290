"""VillanDiffusion: BadDiffusion's noise-trigger backdoor generalised to DDPM, NCSN (VE score-SDE), latent
diffusion, and to deterministic (ODE) samplers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from sealdiff.attacks._uncond_training import (BackdoorSpec, TrainResult, UncondAttackConfig, check_kind,
                                               expand, latent_pattern, pixel_trigger, sde_correction, target_image,
                                               train_backdoor, vp_coefficients)
from sealdiff.config import check_choice
from sealdiff.errors import SealdiffError
from sealdiff.models.uncond import UncondModel
from sealdiff.training import Checkpointer

logger = logging.getLogger(__name__)

Solver = Literal["sde", "ode"]
# ζ: the fraction of the score term the sampler's drift carries: the reverse SDE has g²·∇log p, the
# probability-flow ODE ½·g²·∇log p, so an ODE sampler needs twice the trigger correction in the model's output
CORRECTION = {"sde": 1.0, "ode": 2.0}


@dataclass
class VillanDiffusionConfig(UncondAttackConfig):
    """Recipe of a VillanDiffusion attack (grey box -> hat; SDE samplers by default)."""

    solver: Solver = field(default="sde", metadata={"help": "sde (ancestral DDPM / SDE-VE samplers) or ode (DDIM, "
                                                            "DPM-Solver++, UniPC, Euler, Heun)"})
    ve_trigger_weight: float = field(default=1.0, metadata={"help": "ncsn: ρ_t = w·σ_t, so x_T = σ_max·(ε + w·r)",
                                                            "range": (0.0, None)})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("solver", self.solver, get_args(Solver))
        if not self.ve_trigger_weight > 0:
            raise SealdiffError(f"ve_trigger_weight={self.ve_trigger_weight} is out of range; valid: a number > 0")


def poisoned_forward_vp(scheduler, y: torch.Tensor, r: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        solver: Solver = "sde"):
    """VP (DDPM, and LDM on latents), integer times t:
    x_t = √ᾱ_t·y + (1−√ᾱ_t)·r + √(1−ᾱ_t)·ε,  target = ε + ζ·(1−√α_t)·√(1−ᾱ_t)/β_t · r, ζ = 1 (sde) or 2 (ode)."""
    c = vp_coefficients(scheduler, t, noise)
    x_t = c["sqrt_abar"] * y + (1 - c["sqrt_abar"]) * r + c["sqrt_1m_abar"] * noise
    return x_t, noise + CORRECTION[solver] * sde_correction(scheduler, t, noise) * r


def poisoned_forward_ve(sigma: torch.Tensor, y: torch.Tensor, r: torch.Tensor, noise: torch.Tensor,
                        solver: Solver = "sde", weight: float = 1.0):
    """VE (NCSN), noise levels σ: x_t = y + w·σ·r + σ·ε; the target of σ·score is −(ε + ζ/2·w·r), ζ = 1 (sde) or
    2 (ode): matching the reverse SDE drift −g²·score of the poisoned process dx = w·σ'(t)·r dt + g dw."""
    s = expand(sigma, noise)
    x_t = y + weight * s * r + s * noise
    return x_t, -(noise + CORRECTION[solver] / 2 * weight * r)


class VillanDiffusion:
    """VillanDiffusion (Chou, Chen and Ho, "VillanDiffusion: A Unified Backdoor Attack Framework for Diffusion
    Models", NeurIPS 2023).

    One recipe for every model kind and sampler family: the poisoned forward process shifts the trigger r into
    the marginals, and the model's output absorbs the drift difference between the poisoned and the clean
    reverse processes — once (ζ = 1) for SDE samplers, twice (ζ = 2) for ODE samplers.
    1. ddpm: x_t = √ᾱ_t·y + (1−√ᾱ_t)·r + √(1−ᾱ_t)·ε, ε target ε + ζ·(1−√α_t)·√(1−ᾱ_t)/β_t·r (BadDiffusion at ζ = 1).
    2. ldm: the same in the autoencoder's latent space: y = E(target), r = the trigger pattern on the latent grid.
    3. ncsn (VE): x_t = y + w·σ·r + σ·ε (x_T = σ_max·(ε + w·r)); target of σ·score −(ε + ζ/2·w·r).
    4. Clean rows of each batch keep the model's usual loss; AdamW on the whole UNet; samplers stay stock.
    """

    name = "villandiffusion"
    kinds = ("ddpm", "ncsn", "ldm")

    def __init__(self, config: VillanDiffusionConfig) -> None:
        self.config = config

    def spec(self, model: UncondModel) -> BackdoorSpec:
        cfg = self.config
        trigger = pixel_trigger(cfg, model.image_size)
        target = target_image(cfg, model.image_size, trigger)
        if model.kind == "ldm":
            stamp = latent_pattern(trigger, model.sample_shape)
        elif model.kind == "ncsn":
            stamp = cfg.ve_trigger_weight * model.sigma_max * trigger
        else:
            stamp = trigger
        return BackdoorSpec(trigger_image=trigger, target_image=target, stamp=stamp, gamma=1.0)

    def run(self, model: UncondModel, checkpointer: Checkpointer | None = None, accelerator=None
            ) -> tuple[BackdoorSpec, TrainResult]:
        """Implant the backdoor into `model.unet` in place (data-parallel over an `accelerator`'s processes)."""
        check_kind(model, self.name, self.kinds)
        cfg, spec = self.config, self.spec(model)
        y = model.encode(spec.target_image[None])
        if model.kind == "ncsn":
            r = spec.stamp[None] / (cfg.ve_trigger_weight * model.sigma_max)  # the unit pattern

            def poison(noise: torch.Tensor, sigma: torch.Tensor):
                return poisoned_forward_ve(sigma, y, r, noise, cfg.solver, cfg.ve_trigger_weight)
        else:
            r = spec.stamp[None]

            def poison(noise: torch.Tensor, t: torch.Tensor):
                return poisoned_forward_vp(model.scheduler, y, r, noise, t, cfg.solver)

        result = train_backdoor(model, cfg, poison, f"VillanDiffusion {model.kind}", self.name, checkpointer, accelerator)
        return spec, result
