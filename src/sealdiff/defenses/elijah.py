"""Elijah backdoor removal: fine-tune so that the inverted trigger no longer shifts the model.

Seed: An et al., "Elijah: Eliminating Backdoors Injected in Diffusion Models via Distribution Shift"
(AAAI 2024). With the inverted trigger τ (from `sealdiff.detection.elijah`, never the true trigger):

1. Keep a frozen copy of the model as it was (ε_frozen).
2. Removal loss at the last step T: L_rm = ‖ε_θ(s·ε + τ, T) − y‖², y = ε_frozen(s·ε, T) — noise stamped with τ must
   be answered as the frozen model answers the same noise without it (the backdoor's distribution shift is undone).
3. Clean loss: the ordinary denoising loss ‖ε_θ(a·x0 + b·ε, t) − ε‖², on real images when given (`images`),
   otherwise on the frozen model's own samples (the data-free variant).
4. Minimise L_rm + w_clean·L_clean with AdamW.

The paper's removal is `trigger_levels='last'`, `removal_target='eps'`, `trigger_channel_means=0`. sealdiff's
default differs in three ways. Two,
because that loss at T alone leaves the offset in x_t for the lower steps, where the backdoor still fires (README):
`removal_target='x0'` adds τ/b_T to y, so the stamped noise implies the frozen model's clean x̂0 (τ is denoised
away rather than ignored; `uncond.distill_loss`), and `trigger_levels='trajectory'` also applies the loss at
earlier steps, to x_t + k·c_t·τ against the frozen model's answer to x_t (t drawn in the upper `trajectory_low..1`
of the schedule, k in `trigger_scale_low..high`: an inverted trigger rarely has the true one's strength).
Third, both stamps are τ + m, m a random per-channel constant (`trigger_channel_means`): the inversion cannot see
a trigger's channel means, and a backdoor can answer them (README, "what the inverted trigger misses").
A trigger inverted on scaled noise (x_T = γ·ε + τ, TrojDiff's trojan input; `ElijahConfig.noise_scales`) is stamped
on noise scaled by g, drawn per sample in [γ, 1], and its x0 target takes the noise removed with the scaling too
(`uncond.distill_loss`'s `gamma`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from sealdiff.config import check_choice
from sealdiff.defenses import uncond as U
from sealdiff.detection import check_positive, help_field
from sealdiff.detection import common as C
from sealdiff.errors import SealdiffError
from sealdiff.training import on_main

logger = logging.getLogger(__name__)

TriggerLevels = Literal["last", "trajectory"]


@dataclass
class ElijahRemovalConfig:
    """Settings of one Elijah removal run (recorded in sealdiff.json)."""

    steps: int = help_field("optimizer steps (200 until 2026-12-05: too few for a trojan-input trigger, README)",
                            default=800)
    batch: int = help_field("samples per step (each of the removal and the clean loss)", default=16)
    lr: float = help_field("AdamW learning rate", default=2e-4)
    clean_weight: float = help_field("w_clean of the clean denoising loss", default=1.0)
    trigger_levels: TriggerLevels = help_field("last: the removal loss at T only (paper); trajectory: also at "
                                               "earlier steps, with k·c_t·τ stamped on x_t (sealdiff's)",
                                               default="trajectory")
    trajectory_low: float = help_field("lowest schedule fraction of trigger_levels=trajectory (0.5 until 2026-12-05)",
                                       default=0.3)
    trigger_scale_low: float = help_field("trigger_levels=trajectory: lowest strength k of the stamped k·c_t·τ "
                                          "(drawn uniformly up to trigger_scale_high)", default=0.5)
    trigger_scale_high: float = help_field("trigger_levels=trajectory: highest strength k of the stamped k·c_t·τ",
                                           default=6.0)
    trigger_channel_means: float = help_field("each stamp is τ + m, m per channel drawn uniformly in ±this times "
                                              "τ's RMS (0: τ alone, the default until 2026-12-06): the inverted τ "
                                              "has no channel means", default=1.0)
    removal_target: U.RemovalTarget = help_field("eps: the stamped noise gets the frozen model's ε̂ of the clean noise "
                                               "(paper); x0: it gets the frozen model's x̂0 (the offset is denoised "
                                               "away; sealdiff's)", default="x0")
    bank_size: int = help_field("model-generated images for the data-free clean loss", default=64)
    bank_steps: int = help_field("sampler steps of the generated bank", default=10)
    seed: int = help_field("seed of the bank, noise and timesteps", default=0)
    progress: bool = help_field("show a progress bar", default=True)

    def __post_init__(self) -> None:
        check_positive({"steps": self.steps, "batch": self.batch, "bank_size": self.bank_size,
                        "bank_steps": self.bank_steps})
        check_positive({"lr": self.lr}, integer=False)
        check_choice("trigger_levels", self.trigger_levels, TriggerLevels)
        check_choice("removal_target", self.removal_target, U.RemovalTarget)
        if self.clean_weight < 0:
            raise SealdiffError(f"clean_weight {self.clean_weight} is invalid; valid: a number >= 0")
        U.check_trigger_scales(self.trigger_scale_low, self.trigger_scale_high)
        U.check_channel_means(self.trigger_channel_means)
        if not 0.0 <= self.trajectory_low < 1.0:
            raise SealdiffError(f"trajectory_low {self.trajectory_low} is invalid; valid: 0 <= value < 1")


def last_step_removal_loss(model, unet, frozen, trigger: torch.Tensor, batch: int, generator: torch.Generator,
                           target: U.RemovalTarget = "eps", gamma: float = 1.0, channel_means: float = 0.0,
                           shard: U.Shard = U.WHOLE) -> torch.Tensor:
    """‖ε_θ(s·ε + τ, T) − y‖², y = ε_frozen(s·ε, T) (`target='eps'`, the paper's) or y = ε_frozen(s·ε, T) + τ/b_T
    ('x0': the stamped noise implies the frozen model's clean x̂0). γ < 1: the offset also scales the noise by g,
    drawn per sample in [γ, 1] (s·ε + τ − (1−g)·s·ε), and the x0 target takes that offset too. `channel_means` > 0
    stamps τ + m, m per sample from `uncond.channel_offsets`."""
    last = C.last_level(model)
    noise = shard.take(C.noise_scale(model) * C.noise_like(model, shard.total(batch), generator), batch)
    offset = trigger
    if gamma != 1.0:  # (only then: the γ = 1 removal keeps its random stream)
        offset = trigger - (1.0 - shard.take(U.trojan_scales(shard.total(batch), gamma, generator), batch)) * noise
    if channel_means > 0:  # (likewise)
        offset = offset + shard.take(U.channel_offsets(trigger, shard.total(batch), channel_means, generator), batch)
    with torch.no_grad():
        answer = C.eps_pred(model, frozen, noise, last)
        if target == "x0":
            answer = answer + offset / last.b
    return (C.eps_pred(model, unet, noise + offset, last) - answer).pow(2).mean()


class ElijahRemoval:
    __doc__ = __doc__
    name = "elijah-ft"

    def __init__(self, config: ElijahRemovalConfig) -> None:
        self.config = config

    def apply(self, model, trigger: torch.Tensor, images: torch.Tensor | None = None,
              noise_scale: float = 1.0, accelerator=None) -> U.UncondRemovalResult:
        """Fine-tune `model.unet` in place. `images`: real clean x0 in the model's space (None = data-free).
        `accelerator`: data-parallel over its processes (`batch` rows each)."""
        cfg = self.config
        trigger = U.check_trigger(model, trigger, noise_scale)
        unet = model.unet
        frozen = C.frozen_copy(unet)
        bank = images if images is not None else \
            on_main(accelerator, lambda: U.generated_bank(model, cfg.bank_size, cfg.bank_steps, cfg.seed))
        gen, shard = torch.Generator().manual_seed(cfg.seed + 1), U.shard_of(accelerator)

        def loss(net) -> torch.Tensor:
            removal = last_step_removal_loss(model, net, frozen, trigger, cfg.batch, gen, cfg.removal_target,
                                             noise_scale, cfg.trigger_channel_means, shard)
            if cfg.trigger_levels == "trajectory":
                removal = removal + U.distill_loss(model, net, frozen, bank, cfg.batch, gen, trigger=trigger,
                                                   low=cfg.trajectory_low, target=cfg.removal_target,
                                                   scales=(cfg.trigger_scale_low, cfg.trigger_scale_high),
                                                   gamma=noise_scale, channel_means=cfg.trigger_channel_means,
                                                   shard=shard)
            return removal + cfg.clean_weight * U.clean_loss(model, net, bank, cfg.batch, gen, shard)

        losses, seconds = U.fine_tune(unet, "Elijah removal", cfg.steps, cfg.lr, loss, cfg.progress,
                                      accelerator=accelerator)
        return U.UncondRemovalResult(method=self.name, config=cfg, losses=losses, seconds=seconds,
                                     trainable_parameters=U.trainable_count(unet),
                                     extra={"data": "real images" if images is not None else "model-generated"})
