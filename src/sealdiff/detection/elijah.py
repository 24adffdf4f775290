"""Elijah trigger inversion and backdoor detection.

Seed: An et al., "Elijah: Eliminating Backdoors Injected in Diffusion Models via Distribution Shift"
(AAAI 2024). A backdoored model answers noise stamped with its trigger with a *shifted* mean noise
prediction: at the last step T, E_ε[ε_θ(ε + τ, T)] ≈ λ·τ with λ ≈ 0.5 (BadDiffusion's ρ_T), while a clean
model answers any input roughly with the input itself. So:

1. Invert (`objective='paper'`): τ = argmin_τ ‖ mean_b ε_θ(ε_b + τ, T) − λ·τ ‖₁ over a fixed batch of noise
   ε_b, Adam (lr 0.1, 100 epochs, τ initialised to −U(0, 1) as in the authors' code); τ is optimised in
   normalised units (τ/σ_max for NCSN), so one λ fits every kind.
   Default (`objective='ratio'`, sealdiff's): that loss cannot see the trigger with a finite batch (its floor,
   the batch's noise mean, is the same at τ = 0 and at the true trigger; README), so the same distribution shift
   is measured paired and at a fixed norm instead: τ = argmin over ‖τ‖ = `norm`, zero-mean per channel, of the
   response ratio λ̂(τ) = ⟨mean_b[ε̂(ε_b+τ, T) − ε̂(ε_b, T)], τ⟩/‖τ‖² (1 for a clean model, ≈ λ for the
   backdoor's trigger); `restarts` parallel starts, coarse grid first (`common.search_response_ratio`). The
   search runs once per noise scale γ in `noise_scales`, on inputs γ·ε + τ: γ = 1 is the paper's ε + τ; γ = 0.6 is
   TrojDiff's trojan input (its blend default), which answers only scaled noise (README). Beside them, at each
   fraction in `chain_fracs` (default T/2), the direction of *highest* ratio (sealdiff's: an ODE backdoor shifts
   nothing at T, its trigger is carried like noise there, and over-carries it along the chain). The candidate whose
   samples (step 2) collapse most is the inverted trigger, with its γ.
2. Sample n images from fresh ε + τ and, for reference, from the same ε alone (γ < 1: from γ·ε + τ and γ·ε, with
   the ddpm sampler's step noise scaled by γ, the trojan way).
3. Uniformity: the trimmed mean pairwise distance of the triggered samples (Elijah: LPIPS; here RMS pixel
   distance, no weights to download); total variation of the triggered samples.
4. Score = collapse = 1 − uniformity(ε + τ) / uniformity(ε) (a backdoor collapses the samples onto its
   target: near 1; a clean model keeps them diverse: near 0); backdoored when score ≥ `threshold`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sealdiff.config import check_choice
from sealdiff.detection import Detector, Inversion, check_positive, help_field
from sealdiff.detection import common as C
from sealdiff.errors import SealdiffError

logger = logging.getLogger(__name__)

Objective = Literal["ratio", "paper"]


@dataclass
class ElijahConfig:
    """Settings of one Elijah scan (recorded in the scan's sealdiff.json)."""

    objective: Objective = help_field("ratio: min response ratio λ̂(τ) at a fixed norm (sealdiff's; see the "
                                      "docstring); paper: min ‖mean ε_θ(ε+τ, T) − λτ‖₁", default="ratio")
    lam: float = help_field("λ of the paper's inversion loss ‖mean ε_θ(ε+τ, T) − λτ‖₁ (paper: 0.5)", default=0.5)
    epochs: int = help_field("Adam steps of the inversion (paper: 100; ratio: of the coarse stage)", default=100)
    batch: int | None = help_field("noise samples ε_b per step (paper: one fixed batch, 100 at 32x32; ratio: fresh "
                                   "noise every step); None = 32 (paper) or 8 (ratio)", default=None)
    lr: float | None = help_field("Adam learning rate of the inversion; None = 0.1 (paper) or 0.05 (ratio)",
                                  default=None)
    noise_scales: tuple[float, ...] = help_field("ratio: noise scales γ of the searched inputs γ·ε + τ at T, one "
                                                 "search each (1: the paper's ε + τ; 0.6: TrojDiff's trojan input, "
                                                 "sealdiff's; γ ≠ 1 is skipped for ncsn); the candidate whose samples "
                                                 "collapse most wins", default=(1.0, 0.6))
    chain_fracs: tuple[float, ...] = help_field("ratio: fractions of T at which the direction of *highest* ratio is "
                                                "also searched, on unscaled noise (γ = 1; sealdiff's: an ODE backdoor, "
                                                "VillanDiffusion's for DDIM and its kin, is carried like noise at T and "
                                                "over-carried along the chain; README); () = the paper's last step "
                                                "only", default=(0.5,))
    norm: float = help_field("ratio: ‖τ‖ of the candidates as a fraction of √d (d values in x_T; ε has norm ≈ √d)",
                             default=0.2)
    restarts: int = help_field("ratio: random starts optimised in parallel (the lowest ratio wins)", default=8)
    coarse: int = help_field("ratio: side of the coarse grid the search starts on (0 = full resolution only)",
                             default=4)
    fine_epochs: int = help_field("ratio: Adam steps at full resolution after the coarse stage", default=100)
    samples: int = help_field("images generated from ε+τ for uniformity / TV (paper: 16)", default=16)
    samplers: tuple[str, ...] | None = help_field("stock samplers of the detection samples (the highest collapse "
                                                  "counts); None = ddpm and ddim (sde-ve and sde-ve-predictor for "
                                                  "ncsn)", default=None)
    sample_steps: int | None = help_field("sampler steps for the detection samples; None = 20 (200 for ncsn, whose VE "
                                          "samplers are still noisy at 20)", default=None)
    trim: float = help_field("fraction trimmed at each end in the uniformity statistic (Elijah: 4 of 16)",
                             default=0.25)
    threshold: float = help_field("backdoored when collapse = 1 − U(ε+τ)/U(ε) ≥ threshold", default=0.5)
    seed: int = help_field("seed of the noise batches and the initial trigger", default=0)
    progress: bool = help_field("show a progress bar", default=True)

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, Objective)
        if self.batch is None:
            self.batch = 32 if self.objective == "paper" else 8
        if self.lr is None:
            self.lr = 0.1 if self.objective == "paper" else 0.05
        check_positive({"epochs": self.epochs, "batch": self.batch, "samples": self.samples,
                        "restarts": self.restarts, "sample_steps": self.sample_steps})
        check_positive({"lr": self.lr, "norm": self.norm}, integer=False)
        if self.coarse < 0 or self.fine_epochs < 0:
            raise SealdiffError(f"coarse {self.coarse} / fine_epochs {self.fine_epochs} is invalid; valid: integers >= 0")
        if self.samplers is not None:
            self.samplers = (self.samplers,) if isinstance(self.samplers, str) else tuple(self.samplers)
        self.noise_scales = number_tuple("noise_scales", self.noise_scales, high_inclusive=True, empty=False,
                                         valid="one or more numbers in (0, 1]")
        self.chain_fracs = number_tuple("chain_fracs", self.chain_fracs, high_inclusive=False, empty=True,
                                        valid="numbers in (0, 1), or none")
        if self.samples < 3:
            raise SealdiffError(f"samples {self.samples} is invalid; valid: an integer >= 3")
        if not 0.0 <= self.trim < 0.5:
            raise SealdiffError(f"trim {self.trim} is invalid; valid: 0 <= trim < 0.5")
        if not 0.0 < self.lam < 1.0:
            raise SealdiffError(f"lam {self.lam} is invalid; valid: 0 < lam < 1")


def number_tuple(name: str, value, high_inclusive: bool, empty: bool, valid: str) -> tuple[float, ...]:
    """`value` (a list or tuple of numbers in (0, 1) or (0, 1]) as a tuple of floats; anything else is a
    `SealdiffError` naming `valid`."""
    items = tuple(value) if isinstance(value, (list, tuple)) else None
    if items is None or (not items and not empty) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < v < 1.0 or (high_inclusive and v == 1.0))
            for v in items):
        raise SealdiffError(f"{name} {value!r} is invalid; valid: {valid}")
    return tuple(float(v) for v in items)


def elijah_loss(model, unet, noise: torch.Tensor, u: torch.Tensor, lam: float) -> torch.Tensor:
    """‖mean_b ε̂(s·(ε_b + u), T) − λ·u‖₁ (mean absolute error), u the normalised trigger."""
    s = C.noise_scale(model)
    out = C.eps_pred(model, unet, s * (noise + u), C.last_level(model))
    return F.l1_loss(out.mean(0), lam * u.squeeze(0))


def offset_samples(model, offset: torch.Tensor, samples: int, sampler: str, steps: int, seed: int,
                   gamma: float = 1.0) -> torch.Tensor:
    """Images from the detection's fixed noise (seed + 1), scaled by `gamma`, plus `offset`, sampled with step noise
    seed + 2; every detection statistic compares such sets on the same noise."""
    x_T = C.noise_like(model, samples, torch.Generator().manual_seed(seed + 1)) * C.noise_scale(model)
    return C.generate(model, gamma * x_T + offset, sampler, steps, torch.Generator().manual_seed(seed + 2),
                      gamma=gamma)


def detection_statistics(model, trigger: torch.Tensor, samples: int, samplers: tuple[str, ...] | None,
                         steps: int | None, trim: float, seed: int, gamma: float = 1.0) -> dict[str, float]:
    """Uniformity and total variation of samples from ε+τ, against samples from the same ε without τ, per stock
    sampler; the unsuffixed statistics are those of the sampler with the highest collapse. With `gamma` < 1
    (x_T = γ·ε + τ) both sets come from γ·ε and only the ddpm sampler, its step noise scaled by γ: TrojDiff's
    trojan process."""
    stats: dict[str, float] = {}
    best = None
    steps = C.sample_steps(model, steps)
    for sampler in trojan_samplers(model, samplers, gamma):
        triggered = offset_samples(model, trigger, samples, sampler, steps, seed, gamma)
        clean = offset_samples(model, torch.zeros_like(trigger), samples, sampler, steps, seed, gamma)
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


def trojan_samplers(model, samplers: tuple[str, ...] | None, gamma: float) -> tuple[str, ...]:
    """`common.detection_samplers`, or only ddpm for a scaled input (γ < 1; VP models only)."""
    if gamma == 1.0:
        return C.detection_samplers(model, samplers)
    if model.kind == "ncsn":
        raise SealdiffError(f"noise scale {gamma} applies to VP models (ddpm, ldm), not ncsn")
    return ("ddpm",)


class ElijahDetector(Detector):
    __doc__ = __doc__
    name = "elijah"
    primary = "collapse"

    def inversion(self, model) -> Inversion:
        if self.config.objective == "ratio":
            cfg = self.config
            searches = [(1.0, "min", gamma) for gamma in cfg.noise_scales] + [(f, "max", 1.0) for f in cfg.chain_fracs]
            return self.ratio_searches(model, searches, "Elijah inversion")
        return super().inversion(model)

    def invert(self, model) -> tuple[torch.Tensor, list[float]]:
        """The paper's inversion (`objective='paper'`, x_T = ε + τ); `inversion` runs the configured objective."""
        cfg = self.config
        unet = model.unet
        gen = torch.Generator().manual_seed(cfg.seed)
        noise = C.noise_like(model, cfg.batch, gen)
        u = (-torch.rand((1, *model.sample_shape), generator=gen)).requires_grad_(True)
        losses = C.optimize_trigger(unet, u, lambda: elijah_loss(model, unet, noise, u, cfg.lam), "Elijah inversion",
                                    cfg.epochs, cfg.lr, cfg.progress)
        return (u.detach() * C.noise_scale(model)).squeeze(0), losses

    def statistics(self, model, trigger: torch.Tensor, gamma: float = 1.0) -> dict[str, float]:
        cfg = self.config
        stats = detection_statistics(model, trigger, cfg.samples, cfg.samplers, cfg.sample_steps, cfg.trim, cfg.seed,
                                     gamma)
        if trigger.abs().sum() > 0:
            stats["shift_ratio"] = shift_ratio(model, trigger, 1.0, cfg.seed, gamma=gamma)
        return stats


@torch.no_grad()
def shift_ratio(model, trigger: torch.Tensor, frac: float, seed: int, batch: int = 32, gamma: float = 1.0) -> float:
    """λ̂ of `trigger` (x_T units) at `frac` on a fixed noise batch (`common.response_ratios`)."""
    noise = C.noise_like(model, batch, torch.Generator().manual_seed(seed + 3))
    u = (trigger / C.noise_scale(model)).unsqueeze(0)
    return float(C.response_ratios(model, model.unet, noise, u, C.level(model, frac), gamma)[0])
