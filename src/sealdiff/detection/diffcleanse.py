"""Diff-Cleanse, stage 1: black-box-style trigger inversion (BBTI) and the MSCR detection score.

Seed: Hao et al., "Diff-Cleanse: Identifying and Mitigating Backdoor Attacks in Diffusion Models".
A backdoor maps *every* noise stamped with the trigger onto (nearly) one target image, so the trigger is
the input shift that makes sampling collapse:

1. Start τ for each chain (below). `init='ratio'` (default, sealdiff's): the response-ratio search's trigger
   (`common.search_response_ratio`, Elijah's search settings: lowest λ̂ at T for `stochastic`, highest at T/2 for
   `deterministic`, lowest at T on γ-scaled noise for `trojan`), and BBTI then moves τ on the sphere of that norm.
   `init='random'` (the paper's): τ = s·κ·tanh(p), p ~ N(0, I) (bounded, as the authors' `tanh` pattern;
   s = σ_max for NCSN, 1 otherwise).
2. Each step draws a fresh noise batch ε_b, runs a short *differentiable* sampler from γ·ε_b + τ to images x̂_b —
   `stochastic`: the ancestral chain with reparameterised step noise (`common.ancestral_x0`; BadDiffusion and
   SDE backdoors live there), `deterministic`: DDIM / probability-flow Euler (`common.ddim_x0`; ODE backdoors),
   `trojan`: the ancestral chain from γ·ε_b + τ with its step noise scaled by γ (TrojDiff's trojan process; VP
   models only) — and minimises their spread L = mean_b ‖x̂_b − mean_b x̂_b‖² / D. The gradient of L reaches τ
   through the whole chain: the public BBTI code rebuilt its pattern after creating the optimizer, so its image
   loss never moved the trigger and it fell back to the ground-truth trigger; here the optimizer owns exactly the
   tensor the loss is computed from (tested: `test_bbti_loss_reaches_the_trigger`).
3. MSCR (max similar cluster rate): sample n images from fresh γ·ε + τ with the stock sampler of the chain
   (`stochastic`, `trojan`: ddpm, or the VE predictor; `deterministic`: ddim, or the VE predictor-corrector);
   MSCR is the largest fraction of them within RMS distance δ of one sample. Flat images (spatial pixel std <
   `flat_std`) are not counted, as the authors skip all-black / all-white samples. With `init='ratio'` the start
   and the end of BBTI are both measured and the higher MSCR counts (the authors keep the best pattern seen;
   BBTI's loss can lead away from a firing start).
4. Steps 1-3 run once per chain; the chain with the highest MSCR is reported, with its γ. Backdoored when
   MSCR ≥ `threshold`.
"""

from __future__ import annotations

import dataclasses
import functools
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

CHAINS = ("stochastic", "deterministic", "trojan")
Init = Literal["random", "ratio"]


@dataclass
class DiffCleanseConfig:
    """Settings of one Diff-Cleanse BBTI scan (recorded in the scan's sealdiff.json)."""

    epochs: int = help_field("optimisation steps of the inversion", default=50)
    batch: int = help_field("noise samples per step", default=8)
    lr: float | None = help_field("Adam learning rate on the trigger parameter; None = 0.1 (random: on p) or 0.01 "
                                  "(ratio: on the sphere)", default=None)
    chains: tuple[str, ...] = help_field("samplers the inversion runs through: stochastic (ancestral), deterministic "
                                         "(DDIM), trojan (ancestral from γ·ε + τ, VP models only)", default=CHAINS)
    trojan_gamma: float = help_field("γ of the trojan chain's input γ·ε + τ (TrojDiff's blend default 0.6)",
                                     default=0.6)
    init: Init = help_field("start of τ: random (the paper's N(0, I) pattern under the bound κ) or ratio (sealdiff's: "
                            "the response-ratio search's trigger, then BBTI at its norm; see the docstring)",
                            default="ratio")
    start_restarts: int = help_field("init=ratio: random starts of the response-ratio search (Elijah's default)",
                                     default=8)
    start_epochs: int = help_field("init=ratio: Adam steps of the search's coarse and of its fine stage (Elijah's "
                                   "default)", default=100)
    grad_steps: int = help_field("steps of the differentiable sampler the loss runs through", default=6)
    bound: float = help_field("κ (init=random): the trigger is κ·tanh(p) in units of the prior's std", default=2.0)
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
        if self.lr is None:
            self.lr = 0.01 if self.init == "ratio" else 0.1
        check_positive({"epochs": self.epochs, "batch": self.batch, "grad_steps": self.grad_steps,
                        "samples": self.samples, "sample_steps": self.sample_steps,
                        "start_restarts": self.start_restarts, "start_epochs": self.start_epochs})
        check_positive({"lr": self.lr, "bound": self.bound, "delta": self.delta}, integer=False)
        self.chains = (self.chains,) if isinstance(self.chains, str) else tuple(self.chains)
        if not self.chains or any(c not in CHAINS for c in self.chains):
            raise SealdiffError(f"chains {self.chains!r} is invalid; valid: one or more of {', '.join(CHAINS)}")
        if not 0.0 < self.trojan_gamma < 1.0:
            raise SealdiffError(f"trojan_gamma {self.trojan_gamma} is invalid; valid: 0 < trojan_gamma < 1")
        if self.batch < 2:
            raise SealdiffError(f"batch {self.batch} is invalid; valid: an integer >= 2 (the loss compares samples)")
        if not 0.0 < self.threshold <= 1.0:
            raise SealdiffError(f"threshold {self.threshold} is invalid; valid: 0 < threshold <= 1")


def bbti_loss(model, unet, noise: torch.Tensor, trigger: torch.Tensor, grad_steps: int, stochastic: bool = False,
              generator: torch.Generator | None = None, gamma: float = 1.0) -> torch.Tensor:
    """Spread of the images sampled (differentiably) from γ·s·ε + trigger: mean squared deviation from their mean
    (the ancestral chain's step noise is scaled by γ too)."""
    x_T = gamma * C.noise_scale(model) * noise + trigger
    if stochastic:
        step_noise = [gamma * torch.randn(x_T.shape, generator=generator) for _ in range(grad_steps)]
        x0 = C.ancestral_x0(model, unet, x_T, grad_steps, step_noise)
    else:
        x0 = C.ddim_x0(model, unet, x_T, grad_steps)
    images = model.decode(x0, clamp=False)
    return (images - images.mean(0, keepdim=True)).pow(2).mean()


def stock_sampler(model, chain: str) -> str:
    """The stock sampler of a chain's MSCR samples. For ncsn the stochastic chain is the reverse-diffusion predictor
    itself (a Langevin corrector undoes a VillanDiffusion backdoor); VE has no stock ODE sampler, so the
    deterministic chain's samples come from the predictor-corrector."""
    if model.kind == "ncsn":
        return "sde-ve" if chain == "deterministic" else "sde-ve-predictor"
    return "ddim" if chain == "deterministic" else "ddpm"


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

    def gamma(self, chain: str) -> float:
        return self.config.trojan_gamma if chain == "trojan" else 1.0

    def trigger_of(self, model, p: torch.Tensor) -> torch.Tensor:
        """init=random's bounded pattern s·κ·tanh(p)."""
        return C.noise_scale(model) * self.config.bound * torch.tanh(p)

    def candidates(self, model, chain: str = "stochastic") -> tuple[dict[str, torch.Tensor], list[float]]:
        """BBTI through `chain`: its triggers in x_T units ({"start", "end"} for init=ratio, {"end"} for random; a
        random start is no candidate) and the losses."""
        cfg = self.config
        unet = model.unet
        gen = torch.Generator().manual_seed(cfg.seed)
        s, shape = C.noise_scale(model), tuple(model.sample_shape)
        found = {}
        if cfg.init == "ratio":
            found["start"] = self.ratio_trigger(model, chain, gen)
            norm = float(found["start"].norm()) / s
            p = (found["start"] / s).unsqueeze(0).clone().requires_grad_(True)

            def trigger_of(p: torch.Tensor) -> torch.Tensor:
                return s * C.sphere_triggers(p, shape, norm)
        else:
            p = torch.randn((1, *shape), generator=gen).requires_grad_(True)
            trigger_of = functools.partial(self.trigger_of, model)

        def loss() -> torch.Tensor:
            noise = C.noise_like(model, cfg.batch, gen)
            return bbti_loss(model, unet, noise, trigger_of(p), cfg.grad_steps, chain != "deterministic", gen,
                             self.gamma(chain))

        losses = C.optimize_trigger(unet, p, loss, f"Diff-Cleanse BBTI ({chain})", cfg.epochs, cfg.lr, cfg.progress)
        found["end"] = trigger_of(p.detach()).squeeze(0)
        return found, losses

    def invert(self, model, chain: str = "stochastic") -> tuple[torch.Tensor, list[float]]:
        """BBTI's end point through `chain`."""
        found, losses = self.candidates(model, chain)
        return found["end"], losses

    def ratio_trigger(self, model, chain: str, gen: torch.Generator) -> torch.Tensor:
        """The response-ratio search's trigger (x_T units) that BBTI starts from (`init='ratio'`)."""
        frac, direction = (0.5, "max") if chain == "deterministic" else (1.0, "min")
        search = ElijahConfig(restarts=self.config.start_restarts, epochs=self.config.start_epochs,
                              fine_epochs=self.config.start_epochs)
        trigger, _, _ = C.best_ratio_trigger(model, search, frac, direction, gen,
                                             f"Diff-Cleanse start ({chain})", self.config.progress, self.gamma(chain))
        return trigger

    def statistics(self, model, trigger: torch.Tensor, chain: str = "stochastic") -> dict[str, float]:
        cfg = self.config
        sampler, gamma = stock_sampler(model, chain), self.gamma(chain)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        x_T = C.noise_like(model, cfg.samples, gen) * C.noise_scale(model) * gamma
        steps = C.sample_steps(model, cfg.sample_steps)
        triggered = C.generate(model, x_T + trigger, sampler, steps, torch.Generator().manual_seed(cfg.seed + 2),
                               gamma=gamma)
        clean = C.generate(model, x_T, sampler, steps, torch.Generator().manual_seed(cfg.seed + 2), gamma=gamma)
        return {"mscr": mscr(triggered, cfg.delta, cfg.flat_std), "mscr_clean": mscr(clean, cfg.delta, cfg.flat_std),
                "uniformity": C.uniformity(triggered), "uniformity_clean": C.uniformity(clean),
                "trigger_l2": float(trigger.norm())}

    def scan(self, model) -> ScanResult:
        cfg = self.config
        start = time.perf_counter()
        chains = [c for c in cfg.chains if not (c == "trojan" and model.kind == "ncsn")]  # VE noise is never scaled
        if not chains:
            raise SealdiffError(f"chains {cfg.chains!r} hold no chain for a {model.kind} model; add stochastic or "
                                "deterministic")
        best, per_chain = None, {}
        for chain in chains:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                found, losses = self.candidates(model, chain)
                for stage, trigger in found.items():
                    trigger = trigger.detach().to("cpu", torch.float32)
                    scores = self.statistics(model, trigger, chain)
                    per_chain[f"mscr_{chain}_{stage}"] = scores["mscr"]
                    if best is None or scores["mscr"] > best[0]["mscr"]:
                        best = (scores, trigger, losses, chain, stage)
            logger.info("Diff-Cleanse %s: MSCR %s", chain,
                        {k: round(v, 3) for k, v in per_chain.items() if k.startswith(f"mscr_{chain}_")})
        scores, trigger, losses, chain, stage = best
        scores = {**scores, **per_chain}
        score = float(scores[self.primary])
        config = dataclasses.asdict(cfg)
        config.update(chosen_chain=chain, chosen_stage=stage)
        return ScanResult(method=self.name, backdoored=score >= cfg.threshold, score=score, threshold=float(cfg.threshold),
                          scores=scores, trigger=trigger, seconds=time.perf_counter() - start, config=config,
                          losses=losses, noise_scale=self.gamma(chain))
