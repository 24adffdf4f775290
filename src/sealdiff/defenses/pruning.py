"""Diff-Cleanse, stage 2: Taylor-importance channel pruning of the backdoor, then dual-loss fine-tuning.

Seed: Hao et al., "Diff-Cleanse: Identifying and Mitigating Backdoor Attacks in Diffusion Models".
With the trigger τ inverted by BBTI (`sealdiff.detection.diffcleanse`, never the true trigger):

1. Backdoor loss L_b = ‖ε_θ(γ·s·ε + τ, T) − sg[ε_θ(γ·s·ε, T)]‖² (how far τ moves the prediction; sg = no
   gradient; γ = 1 unless BBTI found a trojan input γ·ε + τ)
   and clean loss L_c = the denoising loss on model-generated samples (no real data needed). With
   `importance_levels='chain'` (as the public code, which sums over t ∈ [0.9, 1]·T) L_b is taken along the poisoned
   forward process instead: ‖ε_θ(x_t + c_t·τ, t) − sg[ε_θ(x_t, t)]‖², x_t noised from generated images.
2. First-order Taylor importance of every output channel c of every prunable Conv2d / Linear layer:
   I(c) = Σ_{w in channel c} |w · ∂L/∂w| (summed over `importance_batches` batches), once for L_b and once for L_c.
3. Score by the rule `importance` (named option): `ratio` (default) = I_b/(I_c + ε) (channels that matter for the
   backdoor much more than for clean generation); `difference` = I_b/ΣI_b − I_c/ΣI_c; `backdoor` = I_b alone.
   `ratio` spares the channels clean generation leans on: on the zoo it kept the clean samples closer than
   `difference` and removed TrojDiff, which `difference` (the default until 2026-12-05) did not (README).
4. Prune the top `ratio` (1–2 %) of channels: their weights and biases are set to zero (masking, not removing:
   the model keeps its architecture, saves as a stock `UNet2DModel` with safetensors, and the zeros stay zeros).
5. Fine-tune with L_c + w·distillation from the unpruned model (‖ε_θ(x_t, t) − ε_unpruned(x_t, t)‖² on clean x_t);
   gradients of pruned weights are masked and the zeros re-applied after every step, so pruned channels stay pruned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sealdiff.config import check_choice
from sealdiff.defenses import uncond as U
from sealdiff.detection import check_positive, help_field
from sealdiff.detection import common as C
from sealdiff.errors import SealdiffError
from sealdiff.models.uncond import placement

logger = logging.getLogger(__name__)

ImportanceRule = Literal["difference", "backdoor", "ratio"]
ImportanceLevels = Literal["last", "chain"]


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
    steps: int = help_field("fine-tuning steps after pruning (0: prune only)", default=100)
    batch: int = help_field("samples per importance batch and fine-tuning step", default=16)
    lr: float = help_field("AdamW learning rate of the fine-tuning", default=2e-4)
    distill_weight: float = help_field("w of the distillation from the unpruned model", default=1.0)
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
        if self.distill_weight < 0:
            raise SealdiffError(f"distill_weight {self.distill_weight} is invalid; valid: a number >= 0")


@dataclass(frozen=True)
class Slice:
    """One parameter's share of a coupled channel: `param[index]` along `dim` (0: an output channel of a Conv2d /
    Linear or a norm's affine entry; 1: an input channel of a Conv2d / Linear)."""

    param: str  # the parameter's name in the UNet, e.g. "down_blocks.0.resnets.0.conv1.weight"
    dim: int


def channel_groups(model) -> dict[str, list[tuple[Slice, list[int], list[int]]]]:
    """The UNet's coupled channel groups, from torch_pruning's dependency graph (as the public Diff-Cleanse code prunes):
    pruning channel c of a Conv2d's output also removes what reads or must match it — the time-embedding projection
    added to it, the norm after it, the input channel of the next layers, and, in a residual stream, every layer that
    writes into or reads that stream channel. {root layer: [(slice, member indices, root channels), ...]}: the
    member index idx[k] belongs to the root's channel root[k]. Every Conv2d but `conv_out` (image channels) roots a group."""
    import torch_pruning as tp

    unet = model.unet
    device, dtype = placement(unet)
    sample = torch.zeros(1, *model.sample_shape, device=device, dtype=dtype)
    timestep = torch.ones(1, device=device, dtype=dtype if model.kind == "ncsn" else torch.long)
    grad = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(True)  # the graph is traced through autograd
    try:
        graph = tp.DependencyGraph().build_dependency(unet, example_inputs={"sample": sample, "timestep": timestep})
        raw = list(graph.get_all_groups(ignored_layers=[unet.conv_out], root_module_types=[nn.Conv2d]))
    finally:
        for p, g in zip(unet.parameters(), grad):
            p.requires_grad_(g)
    names = {m: n for n, m in unet.named_modules()}
    groups = {}
    for group in raw:
        members = []
        for item in group:
            module = item.dep.target.module
            if module not in names or not isinstance(module, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)):
                continue  # graph-only nodes (additions, concatenations, activations) hold no weights
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise SealdiffError(f"{names[module]} is a grouped convolution; channel pruning supports groups=1 only")
            out = graph.is_out_channel_pruning_fn(item.dep.handler) or not isinstance(module, (nn.Conv2d, nn.Linear))
            idxs, roots = [int(i) for i in item.idxs], [int(i) for i in item.root_idxs]
            for kind in ("weight", "bias"):
                if getattr(module, kind, None) is not None and (out or kind == "weight"):
                    members.append((Slice(f"{names[module]}.{kind}", 0 if out else 1), idxs, roots))
        groups[names[group[0].dep.target.module]] = members
    return groups


def group_taylor(unet: nn.Module, groups) -> dict[str, torch.Tensor]:
    """Σ|w·∂L/∂w| per channel of every group, over all its members' slices, from the gradients in `.grad`."""
    params = dict(unet.named_parameters())
    out = {}
    for root, members in groups.items():
        score = torch.zeros(params[f"{root}.weight"].shape[0], dtype=torch.float64)
        for sl, idxs, roots in members:
            p = params[sl.param]
            if p.grad is None:
                continue
            taylor = (p.detach() * p.grad).abs().double().movedim(sl.dim, 0)
            taylor = taylor.reshape(taylor.shape[0], -1).sum(1).cpu()
            score.index_add_(0, torch.tensor(roots), taylor[idxs])
        out[root] = score
    return out


def channel_masks(unet: nn.Module, groups, pruned: dict[str, list[int]]) -> dict[str, dict[int, list[int]]]:
    """{parameter: {dim: [indices]}}: every slice that the pruned group channels take out."""
    masked: dict[str, dict[int, set[int]]] = {}
    for root, channels in pruned.items():
        chosen = set(channels)
        for sl, idxs, roots in groups[root]:
            hit = {i for i, r in zip(idxs, roots) if r in chosen}
            if hit:
                masked.setdefault(sl.param, {}).setdefault(sl.dim, set()).update(hit)
    return {name: {dim: sorted(idx) for dim, idx in dims.items()} for name, dims in sorted(masked.items())}


@torch.no_grad()
def apply_masks(unet: nn.Module, masked: dict[str, dict[int, list[int]]]) -> None:
    """Zero every masked slice."""
    params = dict(unet.named_parameters())
    for name, dims in masked.items():
        for dim, idx in dims.items():
            params[name].index_fill_(int(dim), torch.tensor(idx, device=params[name].device), 0)


def masked_count(unet: nn.Module, masked: dict[str, dict[int, list[int]]]) -> int:
    """How many scalars the masks zero (slices overlapping along two dims counted once)."""
    params = dict(unet.named_parameters())
    total = 0
    for name, dims in masked.items():
        mask = torch.ones(params[name].shape, dtype=torch.bool)
        for dim, idx in dims.items():
            mask.index_fill_(int(dim), torch.tensor(idx), False)
        total += int((~mask).sum())
    return total


def masked_slices_are_zero(unet: nn.Module, masked: dict[str, dict[int, list[int]]]) -> bool:
    params = dict(unet.named_parameters())
    return all(bool((params[name].index_select(int(dim), torch.tensor(idx, device=params[name].device)) == 0).all())
               for name, dims in masked.items() for dim, idx in dims.items())


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
    idx = torch.randint(0, len(bank), (batch,), generator=generator)
    noise = gamma * torch.randn(bank[idx].shape, generator=generator)
    levels = U.sample_levels(model, batch, generator, low=low)
    x_t = U.noised(levels, bank[idx], noise)
    with torch.no_grad():
        clean = U.per_sample_eps(model, unet, x_t, levels)
    return (U.per_sample_eps(model, unet, x_t + U.shifts(model, levels) * trigger, levels) - clean).pow(2).mean()


def importance(model, trigger: torch.Tensor, bank: torch.Tensor, cfg: PruningConfig, groups, gamma: float = 1.0
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backdoor, clean) Taylor importance per channel of every coupled channel group (`channel_groups`)."""
    unet = model.unet
    totals = {kind: {root: 0.0 for root in groups} for kind in ("backdoor", "clean")}
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
            for root, score in group_taylor(unet, groups).items():
                totals[kind][root] = totals[kind][root] + score
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


class DiffCleansePruning:
    __doc__ = __doc__
    name = "diff-cleanse-prune"

    def __init__(self, config: PruningConfig) -> None:
        self.config = config

    def apply(self, model, trigger: torch.Tensor, images: torch.Tensor | None = None,
              noise_scale: float = 1.0) -> U.UncondRemovalResult:
        cfg = self.config
        trigger = U.check_trigger(model, trigger, noise_scale)
        unet = model.unet
        unpruned = C.frozen_copy(unet)
        bank = images if images is not None else U.generated_bank(model, cfg.bank_size, cfg.bank_steps, cfg.seed)
        groups = channel_groups(model)
        imp_b, imp_c = importance(model, trigger, bank, cfg, groups, noise_scale)
        pruned = select_channels(channel_scores(imp_b, imp_c, cfg.importance), cfg.ratio)
        masked = channel_masks(unet, groups, pruned)
        apply_masks(unet, masked)
        total = sum(len(v) for v in imp_b.values())
        count = sum(map(len, pruned.values()))
        logger.info("pruned %d of %d group channels (%.2f %%) in %d groups, %d parameters zeroed", count, total,
                    100 * count / total, len(pruned), masked_count(unet, masked))
        params = dict(unet.named_parameters())
        masks = {}
        for name, dims in masked.items():
            mask = torch.ones_like(params[name])
            for dim, idx in dims.items():
                mask.index_fill_(int(dim), torch.tensor(idx, device=mask.device), 0)
            masks[params[name]] = mask
        handles = [p.register_hook(lambda g, mask=mask: g * mask) for p, mask in masks.items()]
        gen = torch.Generator().manual_seed(cfg.seed + 1)

        def loss() -> torch.Tensor:
            value = U.clean_loss(model, unet, bank, cfg.batch, gen)
            if cfg.distill_weight:
                value = value + cfg.distill_weight * U.distill_loss(model, unet, unpruned, bank, cfg.batch, gen)
            return value

        try:
            losses, seconds = U.fine_tune(unet, "Diff-Cleanse fine-tuning", cfg.steps, cfg.lr, loss, cfg.progress,
                                          after_step=lambda: apply_masks(unet, masked))
        finally:
            for h in handles:
                h.remove()
        return U.UncondRemovalResult(method=self.name, config=cfg, losses=losses, seconds=seconds,
                                     trainable_parameters=U.trainable_count(unet),
                                     extra={"pruned": pruned, "pruned_channels": count, "prunable_channels": total,
                                            "pruned_fraction": count / total, "masked": masked,
                                            "zeroed_parameters": masked_count(unet, masked)})
