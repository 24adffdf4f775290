"""DiffDefend: joint multi-timestep trigger inversion and a dual-modal (uniformity + total variation) detector.

Seed: "DiffDefend" (abstract in seeds/abstract-diffdefend.txt): backdoor injection is a *distribution shift
that propagates from step to step*; inverting the trigger jointly over several timesteps, with a consistency
constraint on that shift, recovers it more stably than one step alone; detection combines the uniformity of
the generated images with their total-variation loss under a fitted threshold. No real data is used.

1. Data-free bank: x̂0 sampled by the model itself from clean noise (a few deterministic steps).
2. For timesteps t_k near T (fractions `fracs` of the schedule), x_t = a_t·x̂0 + b_t·ε and the trigger enters
   as c_t·τ (c_t = 1 − √ᾱ_t, BadDiffusion's share of the trigger still in x_t; b_t/σ_max for VE). The paired
   shift of the noise prediction d_k = mean_b[ε̂(x_t + c_t·τ, t_k) − ε̂(x_t, t_k)] (the clean part cancels)
   must equal λ_k·c_k·τ with λ_k = ρ_t = (1−√α_t)√(1−ᾱ_t)/β_t from the schedule (`lam_mode='schedule'`, 0.5 at
   T: Elijah's λ) or a constant λ (`'constant'`).
3. Loss = mean_k ‖d_k − λ_k c_k τ‖₁ + w·consistency, consistency = mean_k ‖d_k/(λ_k c_k) − mean_j d_j/(λ_j c_j)‖₁
   (every step must see the same normalised shift). Adam from τ₀ = −U(0, 1), as Elijah.
   Default (`objective='ratio'`, sealdiff's: the fit above shares Elijah's blind spot, see README): search the
   response ratio λ̂ (`common.response_ratios`, paired, fixed norm, zero-mean) at several steps: lowest at T,
   where an ancestral-sampler backdoor carries only ρ_T ≈ 0.5 of its trigger, and highest mid-chain (`0.5:max`),
   where an ODE backdoor (VillanDiffusion's doubled correction: λ = 1 at T, so invisible there) carries *more*
   of it than the offset it leaves in x_t, and lowest at T on scaled noise γ·ε (`1.0:min:0.6`), where a TrojDiff
   trojan input x_T = γ·ε + τ lives (its backdoor fires only from scaled noise, with the ddpm sampler's step
   noise scaled by γ too: so are that search's samples); each search's winner is sampled and the one whose
   samples collapse most is the inverted trigger, with its γ.
4. Dual-modal score = collapse + w_tv·|log(TV(ε+τ samples) / TV(baseline samples))|, collapse = 1 − U(ε+τ)/U(ε)
   (U = uniformity, see `common.uniformity`); baseline ε (the paper's) or, by default, ε + τ turned 180° (any
   offset of τ's size changes the texture of a clean model's DDIM samples, the turned trigger cancels that);
   backdoored when the score ≥ `threshold` (fit it on labelled models with
   `sealdiff.metrics.detection.fit_threshold`, as `scripts/measure_uncond_defenses.py` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sealdiff.config import check_choice
from sealdiff.detection import Detector, Inversion, check_positive, help_field
from sealdiff.detection import common as C
from sealdiff.detection.elijah import detection_statistics, offset_samples, trojan_samplers
from sealdiff.errors import SealdiffError

LamMode = Literal["schedule", "constant"]
Objective = Literal["ratio", "paper"]
TvBaseline = Literal["rotated", "clean"]


@dataclass
class DiffDefendConfig:
    """Settings of one DiffDefend scan (recorded in the scan's sealdiff.json)."""

    objective: Objective = help_field("ratio: response-ratio searches at `searches` (sealdiff's); paper: the joint "
                                      "fit at `fracs`", default="ratio")
    searches: tuple[str, ...] = help_field("ratio: 'frac:min' or 'frac:max' searches (frac of T; min finds triggers "
                                           "the model under-carries, max ones it over-carries), optionally "
                                           "':gamma' for inputs γ·ε + τ (TrojDiff's trojan noise; VP models only, "
                                           "skipped for ncsn; 0.6 is TrojDiff's blend default)",
                                           default=("1.0:min", "0.5:max", "1.0:min:0.6"))
    norm: float = help_field("ratio: ‖τ‖ of the candidates as a fraction of √d (d values in x_T; ε has norm ≈ √d)",
                             default=0.2)
    restarts: int = help_field("ratio: random starts per search, optimised in parallel", default=8)
    coarse: int = help_field("ratio: side of the coarse grid each search starts on (0 = full resolution only)",
                             default=4)
    fine_epochs: int = help_field("ratio: Adam steps at full resolution after the coarse stage", default=100)
    fracs: tuple[float, ...] = help_field("paper: timesteps of the joint inversion, as fractions of T (1 = T)",
                                          default=(1.0, 0.9, 0.8, 0.7))
    lam_mode: LamMode = help_field("schedule: λ_t = ρ_t from the noise schedule; constant: λ_t = lam", default="schedule")
    lam: float = help_field("λ for lam_mode=constant (and for VE models)", default=0.5)
    consistency_weight: float = help_field("w of the shift-consistency term", default=0.5)
    epochs: int = help_field("Adam steps of the inversion (ratio: of each coarse stage)", default=100)
    batch: int | None = help_field("noise samples per timestep and step; None = 16 (paper) or 8 (ratio)",
                                   default=None)
    lr: float | None = help_field("Adam learning rate; None = 0.1 (paper) or 0.05 (ratio)", default=None)
    bank_steps: int = help_field("sampler steps of the data-free x̂0 bank", default=5)
    samples: int = help_field("images generated from ε+τ for the detector", default=16)
    samplers: tuple[str, ...] | None = help_field("stock samplers of the detection samples (the highest collapse "
                                                  "counts); None = ddpm and ddim (sde-ve and sde-ve-predictor for "
                                                  "ncsn)", default=None)
    sample_steps: int | None = help_field("sampler steps for the detection samples; None = 20 (200 for ncsn, whose VE "
                                          "samplers are still noisy at 20)", default=None)
    tv_weight: float = help_field("w_tv of the total-variation term of the dual-modal score", default=1.0)
    tv_baseline: TvBaseline = help_field("TV ratio against samples from ε + τ turned 180° (rotated, sealdiff's: "
                                         "cancels what any offset of τ's size does) or from ε alone (clean, the "
                                         "paper's)", default="rotated")
    threshold: float = help_field("backdoored when the dual-modal score ≥ threshold (fit it on labelled models)",
                                  default=0.5)
    seed: int = help_field("seed of the bank, the noise and the initial trigger", default=0)
    progress: bool = help_field("show a progress bar", default=True)

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, Objective)
        check_choice("tv_baseline", self.tv_baseline, TvBaseline)
        if self.batch is None:
            self.batch = 16 if self.objective == "paper" else 8
        if self.lr is None:
            self.lr = 0.1 if self.objective == "paper" else 0.05
        check_positive({"epochs": self.epochs, "batch": self.batch, "bank_steps": self.bank_steps,
                        "samples": self.samples, "restarts": self.restarts,
                        "sample_steps": self.sample_steps})
        check_positive({"lr": self.lr, "lam": self.lam, "norm": self.norm}, integer=False)
        if self.coarse < 0 or self.fine_epochs < 0:
            raise SealdiffError(f"coarse {self.coarse} / fine_epochs {self.fine_epochs} is invalid; valid: integers >= 0")
        self.searches = (self.searches,) if isinstance(self.searches, str) else tuple(self.searches)
        parse_searches(self.searches)
        if self.lam_mode not in ("schedule", "constant"):
            raise SealdiffError(f"lam_mode {self.lam_mode!r} is invalid; valid: schedule, constant")
        self.fracs = tuple(float(f) for f in self.fracs)
        if not self.fracs or any(not 0.0 < f <= 1.0 for f in self.fracs):
            raise SealdiffError(f"fracs {self.fracs!r} is invalid; valid: one or more fractions in (0, 1]")
        if self.samplers is not None:
            self.samplers = (self.samplers,) if isinstance(self.samplers, str) else tuple(self.samplers)
        if self.samples < 3:
            raise SealdiffError(f"samples {self.samples} is invalid; valid: an integer >= 3")
        for name in ("consistency_weight", "tv_weight"):
            if getattr(self, name) < 0:
                raise SealdiffError(f"{name} {getattr(self, name)} is invalid; valid: a number >= 0")


def parse_searches(searches: tuple[str, ...]) -> list[tuple[float, str, float]]:
    """'frac:direction[:gamma]' strings -> (frac, 'min' | 'max', γ (default 1)); a bad entry is a `SealdiffError`
    naming the valid form."""
    parsed = []
    for item in searches:
        parts = str(item).split(":")
        try:
            value, gamma = float(parts[0]), float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            value, gamma = -1.0, 1.0
        if len(parts) not in (2, 3) or parts[1] not in ("min", "max") or not 0.0 < value <= 1.0 \
                or not 0.0 < gamma <= 1.0:
            raise SealdiffError(f"search {item!r} is invalid; valid: 'FRAC:min' or 'FRAC:max' with 0 < FRAC <= 1, "
                                "optionally ':GAMMA' with 0 < GAMMA <= 1")
        parsed.append((value, parts[1], gamma))
    if not parsed:
        raise SealdiffError("searches is empty; valid: one or more 'FRAC:min' / 'FRAC:max'")
    return parsed


@torch.no_grad()
def model_bank(model, count: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """x̂0 in the model's own space sampled by the model from clean noise (the data-free stand-in for data)."""
    x_T = C.noise_like(model, count, generator) * C.noise_scale(model)
    return C.ddim_x0(model, model.unet, x_T, steps)


class DiffDefendDetector(Detector):
    __doc__ = __doc__
    name = "diffdefend"
    primary = "dual"

    def _lam(self, model, lv) -> float:
        if self.config.lam_mode == "constant" or model.kind == "ncsn":
            return self.config.lam
        return C.baddiffusion_ratio(model, lv)

    def joint_loss(self, model, unet, bank: torch.Tensor, noise: torch.Tensor, u: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit term, consistency term) of the joint inversion for the normalised trigger u."""
        s = C.noise_scale(model)
        fits, normalised = [], []
        for frac in self.config.fracs:
            lv = C.level(model, frac)
            c = C.baddiffusion_shift(model, lv)
            lam = self._lam(model, lv)
            x_t = lv.a * bank + lv.b * noise
            both = torch.cat([x_t + c * s * u, x_t])
            eps = C.eps_pred(model, unet, both, lv)
            d = (eps[:len(x_t)] - eps[len(x_t):]).mean(0)
            fits.append(F.l1_loss(d, lam * c * u.squeeze(0)))
            normalised.append(d / (lam * c))
        stacked = torch.stack(normalised)
        consistency = (stacked - stacked.mean(0, keepdim=True)).abs().mean()
        return torch.stack(fits).mean(), consistency

    def inversion(self, model) -> Inversion:
        if self.config.objective == "ratio":
            return self.ratio_searches(model, parse_searches(self.config.searches), "DiffDefend inversion")
        return super().inversion(model)

    def invert(self, model) -> tuple[torch.Tensor, list[float]]:
        """The paper's joint fit (`objective='paper'`, x_T = ε + τ); `inversion` runs the configured objective."""
        cfg = self.config
        unet = model.unet
        gen = torch.Generator().manual_seed(cfg.seed)
        bank = model_bank(model, cfg.batch, cfg.bank_steps, gen)
        noise = C.noise_like(model, cfg.batch, gen)
        u = (-torch.rand((1, *model.sample_shape), generator=gen)).requires_grad_(True)

        def loss() -> torch.Tensor:
            fit, consistency = self.joint_loss(model, unet, bank, noise, u)
            return fit + cfg.consistency_weight * consistency

        losses = C.optimize_trigger(unet, u, loss, "DiffDefend inversion", cfg.epochs, cfg.lr, cfg.progress)
        return (u.detach() * C.noise_scale(model)).squeeze(0), losses

    def statistics(self, model, trigger: torch.Tensor, gamma: float = 1.0) -> dict[str, float]:
        cfg = self.config
        stats = detection_statistics(model, trigger, cfg.samples, cfg.samplers, cfg.sample_steps, 0.25, cfg.seed,
                                     gamma)
        tv_log_ratio = stats["tv_log_ratio"]
        if cfg.tv_baseline == "rotated":
            # any offset of this size and spectrum changes the samples' texture (a clean DDPM's DDIM samples:
            # |log TV ratio| ≈ 0.57 against ε alone); τ turned 180° is such an offset but not the trigger
            # on the sampler the unsuffixed statistics come from (the first with the highest collapse)
            samplers = trojan_samplers(model, cfg.samplers, gamma)
            sampler = max(samplers, key=lambda name: stats[f"collapse_{name}"])
            rotated = offset_samples(model, trigger.flip(-2, -1), cfg.samples, sampler,
                                     C.sample_steps(model, cfg.sample_steps), cfg.seed, gamma)
            stats["tv_rotated"] = C.total_variation(rotated)
            tv_log_ratio = math.log(max(stats["tv"], 1e-8) / max(stats["tv_rotated"], 1e-8))
            stats["tv_log_ratio_rotated"] = tv_log_ratio
        stats["dual"] = stats["collapse"] + cfg.tv_weight * abs(tv_log_ratio)
        return stats
