"""Elijah trigger inversion and backdoor detection.

Seed: An et al., "Elijah: Eliminating Backdoors Injected in Diffusion Models via Distribution Shift"
(AAAI 2024). A backdoored model answers noise stamped with its trigger with a *shifted* mean noise
prediction: at the last step T, E_ε[ε_θ(ε + τ, T)] ≈ λ·τ with λ ≈ 0.5 (BadDiffusion's ρ_T), while a clean
model answers any input roughly with the input itself. So:

1. Invert: τ = argmin_τ ‖ mean_b ε_θ(ε_b + τ, T) − λ·τ ‖₁ over a fixed batch of noise ε_b, Adam
   (lr 0.1, 100 epochs, τ initialised to −U(0, 1) as in the authors' code); τ is optimised in
   normalised units (τ/σ_max for NCSN), so one λ fits every kind.
2. Sample n images from fresh ε + τ and, for reference, from the same ε alone.
3. Uniformity: the trimmed mean pairwise distance of the triggered samples (Elijah: LPIPS; here RMS pixel
   distance, no weights to download); total variation of the triggered samples.
4. Score = collapse = 1 − uniformity(ε + τ) / uniformity(ε) (a backdoor collapses the samples onto its
   target: near 1; a clean model keeps them diverse: near 0); backdoored when score ≥ `threshold`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sealdiff.detection import Detector, check_positive, help_field
from sealdiff.detection import common as C
from sealdiff.errors import SealdiffError

logger = logging.getLogger(__name__)


@dataclass
class ElijahConfig:
    """Settings of one Elijah scan (recorded in the scan's sealdiff.json)."""

    lam: float = help_field("λ of the inversion loss ‖mean ε_θ(ε+τ, T) − λτ‖₁ (paper: 0.5)", default=0.5)
    epochs: int = help_field("Adam steps of the inversion (paper: 100)", default=100)
    batch: int = help_field("noise samples ε_b averaged in the loss (paper: 100 at 32x32)", default=32)
    lr: float = help_field("Adam learning rate of the inversion (paper: 0.1)", default=0.1)
    samples: int = help_field("images generated from ε+τ for uniformity / TV (paper: 16)", default=16)
    samplers: tuple[str, ...] | None = help_field("stock samplers of the detection samples (the highest collapse "
                                                  "counts); None = ddpm and ddim (sde-ve and sde-ve-predictor for "
                                                  "ncsn)", default=None)
    sample_steps: int = help_field("sampler steps for the detection samples", default=20)
    trim: float = help_field("fraction trimmed at each end in the uniformity statistic (Elijah: 4 of 16)",
                             default=0.25)
    threshold: float = help_field("backdoored when collapse = 1 − U(ε+τ)/U(ε) ≥ threshold", default=0.5)
    seed: int = help_field("seed of the noise batches and the initial trigger", default=0)
    progress: bool = help_field("show a progress bar", default=True)

    def __post_init__(self) -> None:
        check_positive({"epochs": self.epochs, "batch": self.batch, "samples": self.samples,
                        "sample_steps": self.sample_steps})
        check_positive({"lr": self.lr}, integer=False)
        if self.samplers is not None:
            self.samplers = (self.samplers,) if isinstance(self.samplers, str) else tuple(self.samplers)
        if self.samples < 3:
            raise SealdiffError(f"samples {self.samples} is invalid; valid: an integer >= 3")
        if not 0.0 <= self.trim < 0.5:
            raise SealdiffError(f"trim {self.trim} is invalid; valid: 0 <= trim < 0.5")
        if not 0.0 < self.lam < 1.0:
            raise SealdiffError(f"lam {self.lam} is invalid; valid: 0 < lam < 1")


def elijah_loss(model, unet, noise: torch.Tensor, u: torch.Tensor, lam: float) -> torch.Tensor:
    """‖mean_b ε̂(s·(ε_b + u), T) − λ·u‖₁ (mean absolute error), u the normalised trigger."""
    s = C.noise_scale(model)
    out = C.eps_pred(model, unet, s * (noise + u), C.last_level(model))
    return F.l1_loss(out.mean(0), lam * u.squeeze(0))


def detection_statistics(model, trigger: torch.Tensor, samples: int, samplers: tuple[str, ...] | None, steps: int,
                         trim: float, seed: int) -> dict[str, float]:
    """Uniformity and total variation of samples from ε+τ, against samples from the same ε without τ, per stock
    sampler; the unsuffixed statistics are those of the sampler with the highest collapse."""
    stats: dict[str, float] = {}
    best = None
    for sampler in C.detection_samplers(model, samplers):
        gen = torch.Generator().manual_seed(seed + 1)
        x_T = C.noise_like(model, samples, gen) * C.noise_scale(model)
        triggered = C.generate(model, x_T + trigger, sampler, steps, torch.Generator().manual_seed(seed + 2))
        clean = C.generate(model, x_T, sampler, steps, torch.Generator().manual_seed(seed + 2))
        u_trig, u_clean = C.uniformity(triggered, trim), C.uniformity(clean, trim)
        tv_trig, tv_clean = C.total_variation(triggered), C.total_variation(clean)
        one = {"uniformity": u_trig, "uniformity_clean": u_clean, "collapse": 1.0 - u_trig / max(u_clean, 1e-8),
               "tv": tv_trig, "tv_clean": tv_clean,
               "tv_log_ratio": math.log(max(tv_trig, 1e-8) / max(tv_clean, 1e-8))}
        stats.update({f"{k}_{sampler}": v for k, v in one.items()})
        if best is None or one["collapse"] > best["collapse"]:
            best = one
    stats.update(best)
    stats["trigger_l2"] = float(trigger.norm())
    return stats


class ElijahDetector(Detector):
    __doc__ = __doc__
    name = "elijah"
    primary = "collapse"

    def invert(self, model) -> tuple[torch.Tensor, list[float]]:
        cfg = self.config
        unet = model.unet
        gen = torch.Generator().manual_seed(cfg.seed)
        noise = C.noise_like(model, cfg.batch, gen)
        u = (-torch.rand((1, *model.sample_shape), generator=gen)).requires_grad_(True)
        losses = C.optimize_trigger(unet, u, lambda: elijah_loss(model, unet, noise, u, cfg.lam), "Elijah inversion",
                                    cfg.epochs, cfg.lr, cfg.progress)
        return (u.detach() * C.noise_scale(model)).squeeze(0), losses

    def statistics(self, model, trigger: torch.Tensor) -> dict[str, float]:
        cfg = self.config
        return detection_statistics(model, trigger, cfg.samples, cfg.samplers, cfg.sample_steps, cfg.trim, cfg.seed)
