"""Diff-Cleanse, stage 1: black-box-style trigger inversion (BBTI) and the MSCR detection score.

Seed: Hao et al., "Diff-Cleanse: Identifying and Mitigating Backdoor Attacks in Diffusion Models".
A backdoor maps *every* noise stamped with the trigger onto (nearly) one target image, so the trigger is
the input shift that makes sampling collapse:

1. Parameterise τ = s·κ·tanh(p) (bounded, as the authors' `tanh` pattern; s = σ_max for NCSN, 1 otherwise),
   p ~ N(0, I) (`init='ratio'`: p starts at the response-ratio search's trigger, see `common.search_response_ratio`).
2. Each step draws a fresh noise batch ε_b, runs a short *differentiable* sampler from ε_b + τ to images x̂_b —
   `stochastic`: the ancestral chain with reparameterised step noise (`common.ancestral_x0`; BadDiffusion, TrojDiff
   and SDE backdoors live there), `deterministic`: DDIM / probability-flow Euler (`common.ddim_x0`; ODE
   backdoors) — and minimises their spread
   L = mean_b ‖x̂_b − mean_b x̂_b‖² / D. The gradient of L reaches p through the whole chain: the public BBTI
   code rebuilt its pattern after creating the optimizer, so its image loss never moved the trigger and it fell
   back to the ground-truth trigger; here the optimizer owns exactly the tensor the loss is computed from
   (tested: `test_bbti_loss_reaches_the_trigger`).
3. MSCR (max similar cluster rate): sample n images from fresh ε + τ with the stock sampler; MSCR is the
   largest fraction of them within RMS distance δ of one sample. Flat images (spatial pixel std < `flat_std`) are
   not counted, as the authors skip all-black / all-white samples. The samples come from the stock sampler of the
   chain (ddpm or sde-ve for `stochastic`, ddim for `deterministic`).
4. With several `chains`, steps 1-3 run once per chain and the chain with the highest MSCR is reported.
   Backdoored when MSCR ≥ `threshold`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch

from sealdiff.config import check_choice
from sealdiff.detection import Detector, ScanResult, check_positive, help_field
from sealdiff.detection import common as C
from sealdiff.detection.elijah import ElijahConfig
from sealdiff.errors import SealdiffError

logger = logging.getLogger(__name__)

Chain = Literal["stochastic", "deterministic"]
Init = Literal["random", "ratio"]


@dataclass
class DiffCleanseConfig:
    """Settings of one Diff-Cleanse BBTI scan (recorded in the scan's sealdiff.json)."""

    epochs: int = help_field("optimisation steps of the inversion", default=50)
    batch: int = help_field("noise samples per step", default=8)
    lr: float = help_field("Adam learning rate on the trigger parameter p", default=0.1)
    chains: tuple[str, ...] = help_field("differentiable samplers the inversion runs through: stochastic "
                                         "(ancestral) and/or deterministic (DDIM)",
                                         default=("stochastic", "deterministic"))
    init: Init = help_field("start of p: random (the paper's N(0, I)) or ratio (sealdiff's: the response-ratio search's "
                            "trigger, lowest λ̂ at T for the stochastic chain, highest at T/2 for the deterministic "
                            "one, with Elijah's search settings)", default="random")
    grad_steps: int = help_field("steps of the differentiable sampler the loss runs through", default=6)
    bound: float = help_field("κ: the trigger is κ·tanh(p) in units of the prior's std", default=2.0)
    samples: int = help_field("images sampled from ε+τ for MSCR", default=32)
    sample_steps: int | None = help_field("stock sampler steps for the MSCR samples; None = 20 (200 for ncsn, whose VE "
                                          "samplers are still noisy at 20)", default=None)
    delta: float = help_field("δ: RMS pixel distance ([0, 1] scale) under which two samples are 'the same'",
                              default=0.08)
    flat_std: float = help_field("samples whose spatial pixel std (mean over channels, [0, 1] scale) is below this "
                                 "are flat and not counted", default=0.05)
    threshold: float = help_field("backdoored when MSCR ≥ threshold", default=0.5)
    seed: int = help_field("seed of the initial pattern and the noise batches", default=0)
    progress: bool = help_field("show a progress bar", default=True)

    def __post_init__(self) -> None:
        check_choice("init", self.init, Init)
        check_positive({"epochs": self.epochs, "batch": self.batch, "grad_steps": self.grad_steps,
                        "samples": self.samples, "sample_steps": self.sample_steps})
        check_positive({"lr": self.lr, "bound": self.bound, "delta": self.delta}, integer=False)
        self.chains = (self.chains,) if isinstance(self.chains, str) else tuple(self.chains)
        if not self.chains or any(c not in ("stochastic", "deterministic") for c in self.chains):
            raise SealdiffError(f"chains {self.chains!r} is invalid; valid: stochastic, deterministic (one or both)")
        if self.batch < 2:
            raise SealdiffError(f"batch {self.batch} is invalid; valid: an integer >= 2 (the loss compares samples)")
        if not 0.0 < self.threshold <= 1.0:
            raise SealdiffError(f"threshold {self.threshold} is invalid; valid: 0 < threshold <= 1")


def bbti_loss(model, unet, noise: torch.Tensor, trigger: torch.Tensor, grad_steps: int, stochastic: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Spread of the images sampled (differentiably) from s·ε + trigger: mean squared deviation from their mean."""
    x_T = C.noise_scale(model) * noise + trigger
    images = C.to_images(model, C.chain_x0(model, unet, x_T, grad_steps, stochastic, generator), clamp=False)
    return (images - images.mean(0, keepdim=True)).pow(2).mean()


def stock_sampler(model, chain: str) -> str:
    if model.kind == "ncsn":
        return "sde-ve"
    return "ddpm" if chain == "stochastic" else "ddim"


def mscr(images: torch.Tensor, delta: float, flat_std: float) -> float:
    """MSCR over the non-flat images (0 when all are flat)."""
    keep = ((images + 1) / 2).flatten(2).std(dim=2).mean(dim=1) >= flat_std  # spatial std, mean over channels
    if keep.sum() == 0:
        return 0.0
    counted = C.max_similar_cluster_rate(images[keep], delta)
    return counted * float(keep.sum()) / len(images)


class DiffCleanseDetector(Detector):
    __doc__ = __doc__
    name = "diff-cleanse"
    primary = "mscr"

    def trigger_of(self, model, p: torch.Tensor) -> torch.Tensor:
        return C.noise_scale(model) * self.config.bound * torch.tanh(p)

    def invert(self, model, chain: str = "stochastic") -> tuple[torch.Tensor, list[float]]:
        cfg = self.config
        unet = model.unet
        gen = torch.Generator().manual_seed(cfg.seed)
        if cfg.init == "ratio":
            scaled = self.ratio_trigger(model, chain, gen) / (C.noise_scale(model) * cfg.bound)
            p = torch.atanh(scaled.clamp(-0.999, 0.999)).unsqueeze(0).requires_grad_(True)
        else:
            p = torch.randn((1, *model.sample_shape), generator=gen).requires_grad_(True)

        def loss() -> torch.Tensor:
            noise = C.noise_like(model, cfg.batch, gen)
            return bbti_loss(model, unet, noise, self.trigger_of(model, p), cfg.grad_steps, chain == "stochastic", gen)

        losses = C.optimize_trigger(unet, p, loss, f"Diff-Cleanse BBTI ({chain})", cfg.epochs, cfg.lr, cfg.progress)
        return self.trigger_of(model, p.detach()).squeeze(0), losses

    def ratio_trigger(self, model, chain: str, gen: torch.Generator) -> torch.Tensor:
        """The response-ratio search's trigger (x_T units) that BBTI starts from (`init='ratio'`)."""
        frac, direction = (1.0, "min") if chain == "stochastic" else (0.5, "max")
        trigger, _, _ = C.best_ratio_trigger(model, ElijahConfig(), frac, direction, gen,
                                             f"Diff-Cleanse start ({chain})", self.config.progress)
        return trigger

    def statistics(self, model, trigger: torch.Tensor, chain: str = "stochastic") -> dict[str, float]:
        cfg = self.config
        sampler = stock_sampler(model, chain)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        x_T = C.noise_like(model, cfg.samples, gen) * C.noise_scale(model)
        steps = C.sample_steps(model, cfg.sample_steps)
        triggered = C.generate(model, x_T + trigger, sampler, steps, torch.Generator().manual_seed(cfg.seed + 2))
        clean = C.generate(model, x_T, sampler, steps, torch.Generator().manual_seed(cfg.seed + 2))
        return {"mscr": mscr(triggered, cfg.delta, cfg.flat_std), "mscr_clean": mscr(clean, cfg.delta, cfg.flat_std),
                "uniformity": C.uniformity(triggered), "uniformity_clean": C.uniformity(clean),
                "trigger_l2": float(trigger.norm())}

    def scan(self, model) -> ScanResult:
        cfg = self.config
        start = time.perf_counter()
        best = None
        per_chain = {}
        for chain in cfg.chains:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                trigger, losses = self.invert(model, chain)
                trigger = trigger.detach().to("cpu", torch.float32)
                scores = self.statistics(model, trigger, chain)
            per_chain[chain] = scores["mscr"]
            if best is None or scores["mscr"] > best[0]["mscr"]:
                best = (scores, trigger, losses, chain)
        scores, trigger, losses, chain = best
        scores = {**scores, **{f"mscr_{c}": v for c, v in per_chain.items()}}
        score = float(scores[self.primary])
        config = dataclasses.asdict(cfg)
        config["chosen_chain"] = chain
        return ScanResult(method=self.name, backdoored=score >= cfg.threshold, score=score, threshold=float(cfg.threshold),
                          scores=scores, trigger=trigger, seconds=time.perf_counter() - start, config=config,
                          losses=losses)
