"""Diff-Cleanse, stage 2: Taylor-importance channel pruning of the backdoor, then dual-loss fine-tuning.

Seed: Hao et al., "Diff-Cleanse: Identifying and Mitigating Backdoor Attacks in Diffusion Models".
With the trigger τ inverted by BBTI (`sealdiff.detection.diffcleanse`, never the true trigger):

1. Backdoor loss L_b = ‖ε_θ(γ·s·ε + τ, T) − sg[ε_θ(γ·s·ε, T)]‖² (how far τ moves the prediction; sg = no
   gradient; γ = 1 unless BBTI found a trojan input γ·ε + τ)
   and clean loss L_c = the denoising loss on model-generated samples (no real data needed). With
   `importance_levels='chain'` (as the public code, which sums over t ∈ [0.9, 1]·T) L_b is taken along the poisoned
   forward process instead: ‖ε_θ(x_t + c_t·τ, t) − sg[ε_θ(x_t, t)]‖², x_t noised from generated images.
2. First-order Taylor importance of every output channel c of every Conv2d but `conv_in` / `conv_out`:
   I(c) = Σ_{w in channel c} |w · ∂L/∂w| (summed over `importance_batches` batches), once for L_b and once for L_c.
3. Score by the rule `importance` (named option): `ratio` (default) = I_b/(I_c + ε) (channels that matter for the
   backdoor much more than for clean generation); `difference` = I_b/ΣI_b − I_c/ΣI_c; `backdoor` = I_b alone.
   `ratio` spares the channels clean generation leans on: on the zoo it kept the clean samples closer than
   `difference` and removed TrojDiff, which `difference` (the default until 2026-12-05) did not (README).
4. Prune the top `ratio` (1–2 %) of channels: their weights and biases are set to zero (masking, not removing:
   the model keeps its architecture, saves as a stock `UNet2DModel` with safetensors, and the zeros stay zeros).
   These are filter masks: a ResNet block's first convolution's masked channel still receives the time embedding
   and its norm's bias (structural pruning of the whole coupled group measured worse on the zoo: README).
5. Fine-tune with L_c + w·distillation from the unpruned model (‖ε_θ(x_t, t) − ε_unpruned(x_t, t)‖² on clean x_t)
   + w_u·unlearning with the inverted trigger (`unlearn_weight`, sealdiff's: `diffdefend-purify`'s removal loss;
   the paper's fine-tuning alone leaves ODE paths open on two zoo backdoors: README), 800 steps;
   gradients of pruned weights are masked and the zeros re-applied after every step, so pruned channels stay pruned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from sealdiff.config import check_choice
from sealdiff.defenses import uncond as U
from sealdiff.defenses.purification import PurificationConfig, removal_loss
from sealdiff.detection import check_positive, help_field
from sealdiff.detection import common as C
from sealdiff.errors import SealdiffError
from sealdiff.training import on_main

logger = logging.getLogger(__name__)

ImportanceRule = Literal["difference", "backdoor", "ratio"]
ImportanceLevels = Literal["last", "chain"]
# layers never pruned: the UNet's input/output convolutions (pruning them removes image channels)
NEVER_PRUNED = ("conv_in", "conv_out")


@dataclass
class PruningConfig:
    """Settings of one Diff-Cleanse pruning + fine-tuning run (recorded in sealdiff.json)."""

    ratio: float = help_field("fraction of prunable output channels to prune (paper: 1-2 %)", default=0.02)
    importance: ImportanceRule = help_field("ratio: I_b/(I_c+ε); difference: I_b/ΣI_b − I_c/ΣI_c; backdoor: I_b",
                                            default="ratio")
    importance_batches: int = help_field("batches the Taylor importance is summed over", default=4)
    importance_levels: ImportanceLevels = help_field(
        "where L_b is taken: last = at T on stamped noise; chain = on the poisoned forward process "
        "x_t + c_t·τ of generated images at t in [importance_low, 1]·T (the public code's range)", default="last")
    importance_low: float = help_field("importance_levels=chain: lowest schedule fraction (public code: 0.9)",
                                       default=0.9)
    steps: int = help_field("fine-tuning steps after pruning (0: prune only; the paper's loss: 100, more lets the "
                            "distillation teach the backdoor back: README)", default=800)
    batch: int = help_field("samples per importance batch and fine-tuning step", default=16)
    lr: float = help_field("AdamW learning rate of the fine-tuning", default=2e-4)
    distill_weight: float = help_field("w of the distillation from the unpruned model", default=1.0)
    unlearn_weight: float = help_field("w_u of a trigger-unlearning term in the fine-tuning (sealdiff's, since "
                                       "2026-12-06; 0 with steps 100 = the paper's clean + distillation loss): the "
                                       "pruned model must answer x_t + k·c_t·(τ + m) with the unpruned model's clean "
                                       "x̂0 (`diffdefend-purify`'s removal loss at its defaults)", default=1.0)
    bank_size: int = help_field("model-generated images for the clean loss", default=64)
    bank_steps: int = help_field("sampler steps of the generated bank", default=10)
    seed: int = help_field("seed of the bank, noise and timesteps", default=0)
    progress: bool = help_field("show a progress bar", default=True)

    def __post_init__(self) -> None:
        check_positive({"importance_batches": self.importance_batches, "batch": self.batch,
                        "bank_size": self.bank_size, "bank_steps": self.bank_steps})
        check_positive({"lr": self.lr}, integer=False)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise SealdiffError(f"steps {self.steps!r} is invalid; valid: an integer >= 0")
        if not 0.0 < self.ratio < 0.5:
            raise SealdiffError(f"ratio {self.ratio} is invalid; valid: 0 < ratio < 0.5 (paper: 0.01-0.02)")
        check_choice("importance", self.importance, ImportanceRule)
        check_choice("importance_levels", self.importance_levels, ImportanceLevels)
        if not 0.0 <= self.importance_low < 1.0:
            raise SealdiffError(f"importance_low {self.importance_low} is invalid; valid: 0 <= value < 1")
        for name in ("distill_weight", "unlearn_weight"):
            if getattr(self, name) < 0:
                raise SealdiffError(f"{name} {getattr(self, name)} is invalid; valid: a number >= 0")


def prunable_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Conv2d layers whose output channels may be pruned (all but the UNet's input and output convolutions)."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, nn.Conv2d) and name not in NEVER_PRUNED}


def channel_taylor(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Σ|w·∂L/∂w| per output channel (weight and bias) from the gradients currently in `.grad`."""
    out = {}
    for name, m in layers.items():
        score = torch.zeros(m.weight.shape[0], dtype=torch.float64)
        for p in (m.weight, m.bias):
            if p is not None and p.grad is not None:
                score += (p.detach() * p.grad).abs().double().flatten(1).sum(1) if p.dim() > 1 else \
                    (p.detach() * p.grad).abs().double()
        out[name] = score.cpu()
    return out


def backdoor_loss(model, unet, trigger: torch.Tensor, batch: int, generator: torch.Generator,
                  gamma: float = 1.0) -> torch.Tensor:
    """‖ε_θ(γ·s·ε + τ, T) − sg[ε_θ(γ·s·ε, T)]‖²: how far τ moves the prediction (γ < 1: a trojan input)."""
    s = C.noise_scale(model)
    noise = gamma * s * C.noise_like(model, batch, generator)
    last = C.last_level(model)
    with torch.no_grad():
        clean = C.eps_pred(model, unet, noise, last)
    return (C.eps_pred(model, unet, noise + trigger, last) - clean).pow(2).mean()


def chain_backdoor_loss(model, unet, trigger: torch.Tensor, bank: torch.Tensor, batch: int,
                        generator: torch.Generator, low: float, gamma: float = 1.0) -> torch.Tensor:
    """‖ε_θ(x_t + c_t·τ, t) − sg[ε_θ(x_t, t)]‖² with x_t = a_t·x0 + γ·b_t·ε on generated x0 and t in [low, 1]·T:
    the trigger's pull along the poisoned forward process (c_t: BadDiffusion's 1 − √ᾱ_t; 1 at T)."""
    x0, noise, levels = U.draw_rows(model, bank, batch, generator, U.WHOLE, low)
    x_t = U.noised(levels, x0, gamma * noise)
    with torch.no_grad():
        clean = U.per_sample_eps(model, unet, x_t, levels)
    return (U.per_sample_eps(model, unet, x_t + U.shifts(model, levels) * trigger, levels) - clean).pow(2).mean()


def importance(model, trigger: torch.Tensor, bank: torch.Tensor, cfg: PruningConfig, gamma: float = 1.0
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backdoor, clean) Taylor importance per output channel of every prunable layer."""
    unet = model.unet
    layers = prunable_layers(unet)
    totals = {"backdoor": {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in layers.items()},
              "clean": {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in layers.items()}}
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    unet.requires_grad_(True)
    for _ in range(cfg.importance_batches):
        for kind in ("backdoor", "clean"):
            unet.zero_grad(set_to_none=True)
            if kind == "clean":
                loss = U.clean_loss(model, unet, bank, cfg.batch, gen)
            elif cfg.importance_levels == "chain":
                loss = chain_backdoor_loss(model, unet, trigger, bank, cfg.batch, gen, cfg.importance_low, gamma)
            else:
                loss = backdoor_loss(model, unet, trigger, cfg.batch, gen, gamma)
            loss.backward()
            for name, score in channel_taylor(layers).items():
                totals[kind][name] += score
    unet.zero_grad(set_to_none=True)
    return totals["backdoor"], totals["clean"]


def channel_scores(backdoor: dict[str, torch.Tensor], clean: dict[str, torch.Tensor], rule: str
                   ) -> dict[str, torch.Tensor]:
    if rule == "backdoor":
        return backdoor
    if rule == "ratio":
        return {n: backdoor[n] / (clean[n] + 1e-12) for n in backdoor}
    total_b = sum(float(v.sum()) for v in backdoor.values()) or 1.0
    total_c = sum(float(v.sum()) for v in clean.values()) or 1.0
    return {n: backdoor[n] / total_b - clean[n] / total_c for n in backdoor}


def select_channels(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, list[int]]:
    """The top `ratio` of all channels by score (at least one), as {layer: [channel, ...]}; a layer never loses
    all its channels."""
    flat = [(float(v), name, i) for name, vec in scores.items() for i, v in enumerate(vec)]
    count = max(1, int(round(ratio * len(flat))))
    chosen: dict[str, list[int]] = {}
    for _, name, i in sorted(flat, key=lambda e: (-e[0], e[1], e[2])):
        if sum(map(len, chosen.values())) >= count:
            break
        if len(chosen.get(name, [])) + 1 >= len(scores[name]):
            continue
        chosen.setdefault(name, []).append(i)
    return {name: sorted(idx) for name, idx in sorted(chosen.items())}


@torch.no_grad()
def apply_masks(unet: nn.Module, pruned: dict[str, list[int]]) -> None:
    """Zero the weights and biases of the pruned output channels."""
    modules = dict(unet.named_modules())
    for name, channels in pruned.items():
        m = modules[name]
        m.weight[channels] = 0
        if m.bias is not None:
            m.bias[channels] = 0


def pruned_channels_are_zero(unet: nn.Module, pruned: dict[str, list[int]]) -> bool:
    modules = dict(unet.named_modules())
    return all(bool((modules[n].weight[c] == 0).all()) and (modules[n].bias is None or
                                                            bool((modules[n].bias[c] == 0).all()))
               for n, c in pruned.items())


class DiffCleansePruning:
    __doc__ = __doc__
    name = "diff-cleanse-prune"

    def __init__(self, config: PruningConfig) -> None:
        self.config = config

    def apply(self, model, trigger: torch.Tensor, images: torch.Tensor | None = None,
              noise_scale: float = 1.0, accelerator=None) -> U.UncondRemovalResult:
        """Prune and fine-tune `model.unet` in place; `accelerator`: the importance on its main process, the
        fine-tuning data-parallel over its processes (`batch` rows each)."""
        cfg = self.config
        trigger = U.check_trigger(model, trigger, noise_scale)
        unet = model.unet
        unpruned = C.frozen_copy(unet)
        shard = U.shard_of(accelerator)

        def bank_and_selection():  # the importance batches are global batches, as in one process
            bank = images if images is not None else U.generated_bank(model, cfg.bank_size, cfg.bank_steps, cfg.seed)
            imp_b, imp_c = importance(model, trigger, bank, replace(cfg, batch=shard.total(cfg.batch)), noise_scale)
            return bank.cpu(), select_channels(channel_scores(imp_b, imp_c, cfg.importance), cfg.ratio)

        bank, pruned = on_main(accelerator, bank_and_selection)  # every process prunes the same channels
        apply_masks(unet, pruned)
        total = sum(m.weight.shape[0] for m in prunable_layers(unet).values())
        count = sum(map(len, pruned.values()))
        logger.info("pruned %d of %d channels (%.2f %%) in %d layers", count, total, 100 * count / total, len(pruned))
        modules = dict(unet.named_modules())
        masks = {}
        for name, channels in pruned.items():
            m = modules[name]
            for p in (m.weight, m.bias):
                if p is not None:
                    mask = torch.ones_like(p)
                    mask[channels] = 0
                    masks[p] = mask
        handles = [p.register_hook(lambda g, mask=mask: g * mask) for p, mask in masks.items()]
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        unlearning = PurificationConfig(progress=False)  # DiffDefend's removal loss at its defaults

        def loss(net) -> torch.Tensor:
            value = U.clean_loss(model, net, bank, cfg.batch, gen, shard)
            if cfg.distill_weight:
                value = value + cfg.distill_weight * U.distill_loss(model, net, unpruned, bank, cfg.batch, gen,
                                                                    shard=shard)
            if cfg.unlearn_weight:
                value = value + cfg.unlearn_weight * removal_loss(unlearning, model, net, unpruned, bank, cfg.batch,
                                                                  gen, trigger, noise_scale, shard)
            return value

        try:
            losses, seconds = U.fine_tune(unet, "Diff-Cleanse fine-tuning", cfg.steps, cfg.lr, loss, cfg.progress,
                                          after_step=lambda: apply_masks(unet, pruned), accelerator=accelerator)
        finally:
            for h in handles:
                h.remove()
        return U.UncondRemovalResult(method=self.name, config=cfg, losses=losses, seconds=seconds,
                                     trainable_parameters=U.trainable_count(unet),
                                     extra={"pruned": pruned, "pruned_channels": count, "prunable_channels": total,
                                            "pruned_fraction": count / total})
