"""DiffDefend purification: distribution-guided fine-tuning against a frozen clean reference, no real data.

Seed: "DiffDefend" (seeds/abstract-diffdefend.txt): freeze a clean reference model and optimise a removal loss
and a retention loss, eliminating the backdoor without real data while keeping generation quality. With the
trigger τ inverted by `sealdiff.detection.diffdefend` (never the true one):

1. Reference ε_ref = a frozen copy of the model before purification (it behaves cleanly on clean inputs).
2. Data-free inputs: x_t = a_t·x̂0 + b_t·ε with x̂0 sampled by the reference itself.
3. Removal loss (the distribution shift the backdoor propagates step by step is cancelled at every step where it
   lives): L_rm = ‖ε_θ(x_t + k·c_t·τ, t) − y‖², t drawn from the upper `removal_low..1` of the schedule,
   c_t = 1 − √ᾱ_t (BadDiffusion's share of the trigger in x_t; b_t/σ_max for VE), k drawn in
   `trigger_scale_low..high` (an inverted trigger rarely has the true one's strength). With `removal_target='x0'`
   y = ε_ref(x_t, t) + k·c_t·τ/b_t: the triggered input must imply the reference's clean x̂0, as a clean model
   denoises an offset it has no use for; `'eps'` y = ε_ref(x_t, t) (the offset is ignored and so kept to x_0).
   The stamp is τ + m, m a random per-channel constant (`trigger_channel_means`): the inversion cannot see a
   trigger's channel means, and a backdoor can answer them (README, "what the inverted trigger misses").
4. Retention loss: L_keep = ‖ε_θ(x_t, t) − ε_ref(x_t, t)‖², t over the whole schedule.
5. Minimise w_rm·L_rm + w_keep·L_keep with AdamW.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sealdiff.config import check_choice
from sealdiff.defenses import uncond as U
from sealdiff.detection import check_positive, help_field
from sealdiff.detection import common as C
from sealdiff.errors import SealdiffError
from sealdiff.training import on_main

logger = logging.getLogger(__name__)


@dataclass
class PurificationConfig:
    """Settings of one DiffDefend purification run (recorded in sealdiff.json)."""

    steps: int = help_field("optimizer steps", default=800)
    batch: int = help_field("samples per step (each of the two losses)", default=16)
    lr: float = help_field("AdamW learning rate", default=2e-4)
    removal_weight: float = help_field("w_rm of the removal loss", default=1.0)
    retention_weight: float = help_field("w_keep of the retention loss", default=1.0)
    removal_low: float = help_field("lowest schedule fraction of the removal loss (1 = T only)", default=0.3)
    removal_target: U.RemovalTarget = help_field("eps: the triggered input gets the reference's ε̂ of the clean one; "
                                               "x0: it gets the reference's x̂0 (the offset is denoised away)",
                                               default="x0")
    trigger_scale_low: float = help_field("lowest strength k of the stamped k·τ (drawn uniformly up to "
                                          "trigger_scale_high)", default=0.5)
    trigger_scale_high: float = help_field("highest strength k of the stamped k·τ", default=6.0)
    trigger_channel_means: float = help_field("each stamp is k·c_t·(τ + m), m per channel drawn uniformly in ±this "
                                              "times τ's RMS (0: τ alone, the default until 2026-12-06): the "
                                              "inverted τ has no channel means", default=1.0)
    bank_size: int = help_field("reference-generated images (no real data)", default=64)
    bank_steps: int = help_field("sampler steps of the generated bank", default=10)
    seed: int = help_field("seed of the bank, noise and timesteps", default=0)
    progress: bool = help_field("show a progress bar", default=True)

    def __post_init__(self) -> None:
        check_positive({"steps": self.steps, "batch": self.batch, "bank_size": self.bank_size,
                        "bank_steps": self.bank_steps})
        check_positive({"lr": self.lr}, integer=False)
        for name in ("removal_weight", "retention_weight"):
            if getattr(self, name) < 0:
                raise SealdiffError(f"{name} {getattr(self, name)} is invalid; valid: a number >= 0")
        check_choice("removal_target", self.removal_target, U.RemovalTarget)
        U.check_trigger_scales(self.trigger_scale_low, self.trigger_scale_high)
        U.check_channel_means(self.trigger_channel_means)
        if not 0.0 <= self.removal_low <= 1.0:
            raise SealdiffError(f"removal_low {self.removal_low} is invalid; valid: 0 <= value <= 1")


def removal_loss(cfg: PurificationConfig, model, unet, reference, bank: torch.Tensor, batch: int,
                 generator: torch.Generator, trigger: torch.Tensor, gamma: float, shard: U.Shard) -> torch.Tensor:
    """The removal loss at `cfg`'s settings (`uncond.distill_loss` with the trigger): x_t + k·c_t·(τ + m) from
    `removal_low`·T down must get the reference's answer to x_t. Diff-Cleanse's unlearning term reuses it."""
    return U.distill_loss(model, unet, reference, bank, batch, generator, trigger=trigger, low=cfg.removal_low,
                          target=cfg.removal_target, scales=(cfg.trigger_scale_low, cfg.trigger_scale_high),
                          gamma=gamma, channel_means=cfg.trigger_channel_means, shard=shard)


class DiffDefendPurification:
    __doc__ = __doc__
    name = "diffdefend-purify"

    def __init__(self, config: PurificationConfig) -> None:
        self.config = config

    def apply(self, model, trigger: torch.Tensor, images: torch.Tensor | None = None,
              noise_scale: float = 1.0, accelerator=None) -> U.UncondRemovalResult:
        """Purify `model.unet` in place; `accelerator`: data-parallel over its processes (`batch` rows each)."""
        cfg = self.config
        if images is not None:
            raise SealdiffError("DiffDefend purification uses no real data; call it without images")
        trigger = U.check_trigger(model, trigger, noise_scale)
        unet = model.unet
        reference = C.frozen_copy(unet)
        bank = on_main(accelerator, lambda: U.generated_bank(model, cfg.bank_size, cfg.bank_steps, cfg.seed))
        gen, shard = torch.Generator().manual_seed(cfg.seed + 1), U.shard_of(accelerator)

        def loss(net) -> torch.Tensor:
            removal = removal_loss(cfg, model, net, reference, bank, cfg.batch, gen, trigger, noise_scale, shard)
            keep = U.distill_loss(model, net, reference, bank, cfg.batch, gen, shard=shard)
            return cfg.removal_weight * removal + cfg.retention_weight * keep

        losses, seconds = U.fine_tune(unet, "DiffDefend purification", cfg.steps, cfg.lr, loss, cfg.progress,
                                      accelerator=accelerator)
        return U.UncondRemovalResult(method=self.name, config=cfg, losses=losses, seconds=seconds,
                                     trainable_parameters=U.trainable_count(unet), extra={"data": "none (reference samples)"})
