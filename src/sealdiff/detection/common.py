"""Shared numerics of the unconditional detectors and removals (one noise-level convention for all kinds).

Every model kind is read as `x_t = a_t·x0 + b_t·ε` with a noise prediction `ε̂(x_t, t)`:

| kind | a_t, b_t | ε̂ | last step T |
|---|---|---|---|
| ddpm, ldm (VP) | √ᾱ_t, √(1−ᾱ_t) | the UNet's output | t = num_train_timesteps − 1 |
| ncsn (VE) | 1, σ | −σ·score (the UNet returns the score) | σ = σ_max |

Triggers live in x_T space (what the caller adds to `sample_noise`); the inversions optimise the trigger in
*normalised* units u = τ / s with s = σ_max for ncsn and 1 otherwise, so that one learning rate and one
λ fit every kind. `ddim_x0` is a differentiable deterministic sampler (DDIM for VP, the probability-flow
Euler step for VE — the same update `x' = a'·x̂0 + b'·ε̂` in both) used where a loss must reach the trigger
through the whole sampling chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sealdiff.errors import SealdiffError
from sealdiff.models.uncond import unet_output


@dataclass(frozen=True)
class NoiseLevel:
    """One point of the schedule: the UNet's timestep argument and the coefficients a, b of x_t."""

    t: float  # timestep index (VP) or σ (VE): what the UNet is called with
    a: float
    b: float
    frac: float  # position in [0, 1]: 1 = the last training step T, 0 = the data end


def noise_scale(model) -> float:
    """s: x_T = s·ε (σ_max for ncsn, 1 otherwise)."""
    return float(model.scheduler.config.sigma_max) if model.kind == "ncsn" else 1.0


def level(model, frac: float) -> NoiseLevel:
    """The schedule at `frac` ∈ [0, 1] (1 = T). VP: t = round(frac·(N−1)); VE: σ = σ_min·(σ_max/σ_min)^frac."""
    frac = float(min(max(frac, 0.0), 1.0))
    cfg = model.scheduler.config
    if model.kind == "ncsn":
        sigma = cfg.sigma_min * (cfg.sigma_max / cfg.sigma_min) ** frac
        return NoiseLevel(t=float(sigma), a=1.0, b=float(sigma), frac=frac)
    n = int(cfg.num_train_timesteps)
    t = int(round(frac * (n - 1)))
    abar = float(model.scheduler.alphas_cumprod[t])
    return NoiseLevel(t=float(t), a=math.sqrt(abar), b=math.sqrt(1.0 - abar), frac=frac)


def last_level(model) -> NoiseLevel:
    return level(model, 1.0)


def _timestep(model, lv: NoiseLevel, batch: int, device) -> torch.Tensor:
    if model.kind == "ncsn":
        return torch.full((batch,), lv.t, device=device)
    return torch.full((batch,), int(lv.t), device=device, dtype=torch.long)


def eps_pred(model, unet, x: torch.Tensor, lv: NoiseLevel) -> torch.Tensor:
    """ε̂(x, t) of `unet` (the model's own or a copy) at noise level `lv`, on x's device."""
    out = unet_output(unet, x, _timestep(model, lv, x.shape[0], x.device))
    return -lv.b * out if model.kind == "ncsn" else out


def baddiffusion_shift(model, lv: NoiseLevel) -> float:
    """How much of an x_T trigger remains in x_t on the backdoor path (BadDiffusion's (1−√ᾱ_t) for VP;
    proportional to the noise level, b_t/σ_max, for VE). 1 at T."""
    if model.kind == "ncsn":
        return lv.b / float(model.scheduler.config.sigma_max)
    return 1.0 - lv.a


def baddiffusion_ratio(model, lv: NoiseLevel) -> float:
    """λ_t: the mean shift of ε̂ per unit of x_T trigger that a BadDiffusion-trained model shows at step t,
    ρ_t = (1−√α_t)·√(1−ᾱ_t)/β_t (0.50 at T for the standard linear schedule: Elijah's λ). VE: 0.5."""
    if model.kind == "ncsn":
        return 0.5
    t = int(lv.t)
    alpha = float(model.scheduler.alphas[t])
    beta = 1.0 - alpha
    return (1.0 - math.sqrt(alpha)) * lv.b / beta


def ddim_levels(model, steps: int) -> list[NoiseLevel]:
    """`steps` levels from T down to the data end ('trailing' spacing), plus the final (a=1, b=0) end point."""
    if steps < 1:
        raise SealdiffError(f"steps={steps} is invalid; valid: an integer >= 1")
    levels = [level(model, 1.0 - i / steps) for i in range(steps)]
    return levels + [NoiseLevel(t=0.0, a=1.0, b=0.0, frac=0.0)]


def ddim_x0(model, unet, x_T: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Deterministic `steps`-step sampling in the model's own space, differentiable end to end; returns x̂0
    (pixels in [-1, 1] for ddpm, [0, 1] for ncsn, scaled latents for ldm)."""
    levels = ddim_levels(model, steps)
    x = x_T
    for cur, nxt in zip(levels[:-1], levels[1:]):
        eps = eps_pred(model, unet, x, cur)
        x0 = (x - cur.b * eps) / cur.a
        x = nxt.a * x0 + nxt.b * eps
    return x


def ancestral_x0(model, unet, x_T: torch.Tensor, steps: int, noises: list[torch.Tensor]) -> torch.Tensor:
    """Stochastic `steps`-step sampling with the step noise given (`noises[i]`, reparameterised so the chain is
    differentiable in x_T): the DDPM ancestral step with skips for VP (posterior q(x_s | x_t, x̂0)), the reverse-
    diffusion predictor for VE (x' = x + (σ² − σ'²)·score + √(σ² − σ'²)·z). The backdoors trained for the
    ancestral sampler (BadDiffusion, TrojDiff, VillanDiffusion-SDE) only show through this chain."""
    levels = ddim_levels(model, steps)
    x = x_T
    for i, (cur, nxt) in enumerate(zip(levels[:-1], levels[1:])):
        eps = eps_pred(model, unet, x, cur)
        if model.kind == "ncsn":
            var = cur.b ** 2 - nxt.b ** 2
            x = x + var * (-eps / cur.b)
            if nxt.b > 0:
                x = x + math.sqrt(var) * noises[i]
            continue
        x0 = (x - cur.b * eps) / cur.a
        abar_t, abar_s = cur.a ** 2, nxt.a ** 2
        alpha_ts = abar_t / abar_s
        beta_ts = 1.0 - alpha_ts
        mean = (math.sqrt(abar_s) * beta_ts / (1 - abar_t)) * x0 + (math.sqrt(alpha_ts) * (1 - abar_s) / (1 - abar_t)) * x
        if nxt.b > 0:
            mean = mean + math.sqrt((1 - abar_s) / (1 - abar_t) * beta_ts) * noises[i]
        x = mean
    return x


def noise_like(model, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """Unit Gaussian noise of the model's x_T shape (multiply by `noise_scale` for x_T)."""
    return torch.randn((batch, *model.sample_shape), generator=generator)


def default_sampler(model) -> str:
    return "sde-ve" if model.kind == "ncsn" else "ddim"


def sample_steps(model, steps: int | None) -> int:
    """Steps of the detection samples: `steps`, or 20 (200 for ncsn: its VE samplers are still noisy at 20)."""
    return steps or (200 if model.kind == "ncsn" else 20)


def detection_samplers(model, samplers: tuple[str, ...] | None) -> tuple[str, ...]:
    """The stock samplers detection samples are drawn with: both families for VP models (an SDE backdoor such as
    BadDiffusion shows only under the ancestral sampler, an ODE backdoor only under DDIM); for VE the
    predictor-corrector and the predictor alone (a Langevin corrector undoes a VillanDiffusion backdoor)."""
    if samplers:
        from sealdiff.models.uncond import check_sampler

        for sampler in samplers:
            check_sampler(model.kind, sampler)
        return tuple(samplers)
    return ("sde-ve", "sde-ve-predictor") if model.kind == "ncsn" else ("ddpm", "ddim")


def generate(model, x_T: torch.Tensor, sampler: str | None = None, steps: int = 10,
             generator: torch.Generator | None = None, batch_size: int = 64, gamma: float = 1.0) -> torch.Tensor:
    """Images in [-1, 1] from the given x_T through the model's stock sampler (`sealdiff.models.uncond.sample`).
    `gamma` < 1 (x_T = γ·ε + τ, TrojDiff's trojan input) also scales the ddpm sampler's step noise, as
    `metrics.uncond.generate` samples such a backdoor."""
    from sealdiff.models.uncond import sample

    sampler = sampler or default_sampler(model)
    step_noise_scale = gamma if sampler == "ddpm" else 1.0
    parts = [sample(model, x_T[i:i + batch_size], sampler=sampler, steps=steps, generator=generator,
                    step_noise_scale=step_noise_scale)
             for i in range(0, len(x_T), batch_size)]
    return torch.cat(parts)


def pairwise_distances(images: torch.Tensor) -> torch.Tensor:
    """(N, N) root-mean-square pixel distances between images mapped to [0, 1]."""
    flat = ((images.double() + 1) / 2).flatten(1)
    return torch.cdist(flat, flat) / math.sqrt(flat.shape[1])


def uniformity(images: torch.Tensor, trim: float = 0.25) -> float:
    """Elijah's uniformity statistic: per image, the trimmed mean of its distances to the others; then the
    trimmed mean over images (`trim` of each end dropped; Elijah drops 4 of 16 at each end). Low = uniform.
    The distance is RMS in pixels ([0, 1]); Elijah uses LPIPS, which needs weights sealdiff cannot download."""
    d = pairwise_distances(images)
    n = d.shape[0]
    if n < 3:
        raise SealdiffError(f"uniformity needs at least 3 samples, got {n}")
    d = d[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    k = int((n - 1) * trim)
    rows = torch.sort(d, dim=1).values[:, k:(n - 1) - k].mean(dim=1)
    k = int(n * trim)
    return float(torch.sort(rows).values[k:n - k].mean())


def total_variation(images: torch.Tensor) -> float:
    """Mean over images of the anisotropic total variation (sum of absolute neighbour differences) of the
    images mapped to [0, 1] — torchmetrics' `TotalVariation(reduction='mean')`, as Elijah uses it."""
    x = (images.double() + 1) / 2
    tv = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().sum(dim=(1, 2, 3)) + \
         (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().sum(dim=(1, 2, 3))
    return float(tv.mean())


def max_similar_cluster_rate(images: torch.Tensor, threshold: float = 0.05) -> float:
    """Diff-Cleanse's MSCR: the largest fraction of samples within RMS distance `threshold` of one sample
    (itself included). 1/N for all-different samples, 1 when every sample collapses onto one image."""
    d = pairwise_distances(images)
    return float((d <= threshold).double().sum(dim=1).max() / d.shape[0])


def frozen_copy(unet: torch.nn.Module) -> torch.nn.Module:
    import copy

    ref = copy.deepcopy(unet).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def optimize_trigger(unet: torch.nn.Module, trigger: torch.Tensor, loss_fn, description: str, epochs: int,
                     lr: float, progress: bool = True) -> list[float]:
    """Adam on the leaf tensor `trigger` (the model stays frozen, its requires_grad flags are restored) for
    `epochs` steps of `loss_fn() -> loss`; returns the losses."""
    from sealdiff.training import run_optimizer

    requires = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    try:
        return run_optimizer(torch.optim.Adam([trigger], lr=lr), loss_fn, epochs, description, progress)
    finally:
        for p, r in zip(unet.parameters(), requires):
            p.requires_grad_(r)


# ---------------------------------------------------------------------------------------------- response ratio


def response_ratios(model, unet, noise: torch.Tensor, u: torch.Tensor, lv: NoiseLevel,
                    gamma: float = 1.0) -> torch.Tensor:
    """λ̂ of each candidate trigger u_k (normalised units, shape (K, C, H, W)) at level `lv`: how much of the offset
    c_t·s·u_k that the trigger leaves in x_t the noise prediction carries,
    λ̂_k = b_t·⟨mean_b[ε̂(γ·b_t·ε_b + c_t·s·u_k) − ε̂(γ·b_t·ε_b)], u_k⟩ / (c_t·s·‖u_k‖²).
    Paired on the same noise, so the batch's own noise mean cancels (it does not in Elijah's loss). A model that
    reads any offset as noise gives 1; BadDiffusion's backdoor 0.5 at T (Elijah's λ) along its trigger. `gamma`
    scales the noise (TrojDiff's trojan input x_T = γ·ε + τ)."""
    k, b = u.shape[0], noise.shape[0]
    c = baddiffusion_shift(model, lv) * noise_scale(model)
    x = gamma * lv.b * noise
    stamped = (x.unsqueeze(0) + c * u.unsqueeze(1)).flatten(0, 1)
    eps = eps_pred(model, unet, torch.cat([stamped, x]), lv)
    shift = (eps[:k * b].view(k, b, *noise.shape[1:]) - eps[k * b:].unsqueeze(0)).mean(1)
    return lv.b * (shift * u).flatten(1).sum(1) / (c * u.flatten(1).pow(2).sum(1))


def sphere_triggers(v: torch.Tensor, shape: tuple[int, ...], norm: float) -> torch.Tensor:
    """Candidates of norm `norm` from parameters v (K, C, h, w): the per-channel mean removed (a uniform offset
    is partly invisible behind the UNet's group norms, so every model answers it weakly), then bilinearly
    upsampled to `shape` when h, w are coarser."""
    v = v - v.mean(dim=(2, 3), keepdim=True)
    if tuple(v.shape[2:]) != tuple(shape[1:]):
        v = torch.nn.functional.interpolate(v, size=tuple(shape[1:]), mode="bilinear", align_corners=False)
    return norm * v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def search_response_ratio(model, frac: float, direction: str, norm: float, restarts: int, coarse: int,
                          epochs: int, fine_epochs: int, batch: int, lr: float, generator: torch.Generator,
                          description: str, progress: bool = True, gamma: float = 1.0
                          ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The zero-mean directions of norm `norm` (normalised units) whose response ratio λ̂ at `frac` is lowest
    (`direction='min'`) or highest ('max'): `restarts` random starts optimised in parallel by Adam, first on a
    `coarse`×`coarse` grid (0 = skip), then at full resolution, with fresh noise every step. Returns the
    candidates (K, C, H, W), their ratios on one held-out noise batch, and the losses. `gamma` scales the noise
    (`response_ratios`)."""
    if direction not in ("min", "max"):
        raise SealdiffError(f"direction {direction!r} is invalid; valid: min, max")
    sign = 1.0 if direction == "min" else -1.0
    unet, lv, shape = model.unet, level(model, frac), tuple(model.sample_shape)
    channels = shape[0]
    losses: list[float] = []
    v = torch.randn((restarts, channels, coarse, coarse) if coarse else (restarts, *shape), generator=generator)
    for stage, steps in (("coarse", epochs if coarse else 0), ("fine", fine_epochs if coarse else epochs)):
        if steps == 0:
            continue
        if stage == "fine" and coarse:
            v = sphere_triggers(v, shape, norm)
        v = v.detach().clone().requires_grad_(True)

        def loss(v=v) -> torch.Tensor:
            u = sphere_triggers(v, shape, norm)
            return sign * response_ratios(model, unet, noise_like(model, batch, generator), u, lv, gamma).sum() / restarts

        losses += optimize_trigger(unet, v, loss, f"{description} ({stage})", steps, lr, progress)
    with torch.no_grad():
        u = sphere_triggers(v.detach(), shape, norm)
        held_out = noise_like(model, max(batch, 32), generator)
        ratios = response_ratios(model, unet, held_out, u, lv, gamma)
    return u, ratios, losses


def best_ratio_trigger(model, settings, frac: float, direction: str, generator: torch.Generator, description: str,
                       progress: bool, gamma: float = 1.0) -> tuple[torch.Tensor, float, list[float]]:
    """`search_response_ratio` with a detector config's search fields (`norm` as a fraction of √d, `restarts`,
    `coarse`, `epochs`, `fine_epochs`, `batch`, `lr`): the winning candidate in x_T units, its held-out ratio, and
    the losses."""
    norm = settings.norm * math.sqrt(math.prod(model.sample_shape))
    u, ratios, losses = search_response_ratio(model, frac, direction, norm, settings.restarts, settings.coarse,
                                              settings.epochs, settings.fine_epochs, settings.batch, settings.lr,
                                              generator, description, progress, gamma)
    pick = int(ratios.argmin() if direction == "min" else ratios.argmax())
    return u[pick] * noise_scale(model), float(ratios[pick]), losses
