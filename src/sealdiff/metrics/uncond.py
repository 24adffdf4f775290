"""Metrics of unconditional models: attack success of a noise-trigger backdoor, clean-sample quality
(toy-likeness and a toy FID), and agreement with another model from the same noise.

Images are in [-1, 1] (what `models.uncond.sample` returns); MSE is per pixel on that scale.

Attack success (`attack_success`): the fraction of samples generated from triggered noise
(x_T = gamma * prior noise + trigger) whose MSE to the target image is below `ASR_MSE_THRESHOLD` = 0.05.
Why 0.05: over 2,048 held-out toy-world renders the MSE to every zoo target except the in-class one is at
least 0.91 (hat 1.06, corner box 0.91, shifted stop sign 0.91, stripes 1.16; `renders_to_targets` in
`benchmarks/results/uncond_zoo.json`, measured by `scripts/measure_uncond_zoo.py`), while an image that shows
the target with small errors stays well below it: 0.05 is an RMS error of 0.22 (11 % of the [-1, 1] range),
e.g. the target with a faint blur or a few wrong pixels. The in-class target is itself a toy-world
image, so a clean model may draw it by chance: `false_trigger_rate` measures the same criterion on untriggered
noise, and should be read beside the ASR.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sealdiff.errors import SealdiffError
from sealdiff.models.uncond import UncondModel, sample, sample_noise

logger = logging.getLogger(__name__)

ASR_MSE_THRESHOLD = 0.05
TRIGGER_FILE = "trigger.safetensors"
MEASURE_SEED = 20_251_123  # noise seeds of every measurement (disjoint from training seeds)


@dataclass
class Backdoor:
    """A noise-trigger backdoor as tensors: x_T = gamma * prior noise + trigger generates `target` (None: not known,
    as for a trigger a scan inverted)."""

    trigger: torch.Tensor  # (C, h, w) in the model's x_T space
    target: torch.Tensor | None  # (3, H, W) in [-1, 1]
    gamma: float = 1.0
    trigger_image: torch.Tensor | None = None  # (3, H, W) the pattern in pixel space

    def stamp(self, noise: torch.Tensor) -> torch.Tensor:
        return self.gamma * noise + self.trigger.to(noise)


def read_backdoor(directory: str | Path) -> Backdoor:
    """The backdoor an attack recorded in `directory/trigger.safetensors` (or in that file, given itself)."""
    from safetensors.torch import load_file

    path = Path(directory)
    path = path if path.suffix == ".safetensors" else path / TRIGGER_FILE
    if not path.is_file():
        raise SealdiffError(f"{path} does not exist; this model records no noise-trigger backdoor")
    try:
        tensors = load_file(str(path))
        return Backdoor(trigger=tensors["trigger"].float(), target=tensors["target"].float(),
                        gamma=float(tensors["gamma"]), trigger_image=tensors.get("trigger_image"))
    except KeyError as exc:
        raise SealdiffError(f"{path} lacks the tensor {exc}") from None
    except Exception as exc:  # a damaged safetensors header
        raise SealdiffError(f"{path} is not a valid safetensors file ({exc.__class__.__name__})") from None


def per_image_mse(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) MSE of each image against one target (3, H, W) or a matching batch."""
    target = target.to(images).expand_as(images)
    return (images.double() - target.double()).pow(2).flatten(1).mean(1).float()


def nearest_mse(images: torch.Tensor, reference: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(N,) MSE of each image to its nearest reference image."""
    a = images.flatten(1).double()
    out = []
    for i in range(0, len(a), chunk):
        d = torch.cdist(a[i:i + chunk], reference.flatten(1).double().to(a.device)) ** 2 / a.shape[1]
        out.append(d.min(1).values)
    return torch.cat(out).float()


@torch.no_grad()
def generate(model: UncondModel, count: int, sampler: str, steps: int, seed: int = MEASURE_SEED,
             backdoor: Backdoor | None = None, batch_size: int = 64) -> torch.Tensor:
    """`count` samples from seeded prior noise (stamped with `backdoor` when given); (count, 3, H, W). A backdoor
    whose input is scaled noise (TrojDiff: γ < 1) is sampled as its attack samples: the ddpm sampler's step noise
    scaled by γ too."""
    generator = torch.Generator().manual_seed(seed)
    noise = sample_noise(model, count, generator)
    step_noise_scale = 1.0
    if backdoor is not None:
        noise = backdoor.stamp(noise)
        step_noise_scale = backdoor.gamma if sampler == "ddpm" else 1.0
    step_gen = torch.Generator().manual_seed(seed + 1)
    return torch.cat([sample(model, noise[i:i + batch_size], sampler, steps, step_gen, step_noise_scale)
                      for i in range(0, count, batch_size)])


@dataclass
class AttackSuccess:
    sampler: str
    steps: int
    count: int
    attack_success: float  # fraction of triggered samples within the threshold of the target
    false_trigger_rate: float  # the same on untriggered noise
    mse_triggered_mean: float
    mse_triggered_median: float
    mse_clean_to_target_min: float
    mse_clean_to_target_median: float
    threshold: float = ASR_MSE_THRESHOLD


def attack_success(model: UncondModel, backdoor: Backdoor, sampler: str, steps: int, count: int = 100,
                   seed: int = MEASURE_SEED, threshold: float = ASR_MSE_THRESHOLD,
                   clean_images: torch.Tensor | None = None, triggered_images: torch.Tensor | None = None
                   ) -> AttackSuccess:
    """ASR of `backdoor` on `model` with `sampler`, plus the false-trigger rate on clean noise (the same seeds).
    `clean_images` / `triggered_images`: this model's samples from that noise, when already generated."""
    if backdoor.target is None:
        raise SealdiffError("attack success needs the backdoor's target image; this trigger records none")
    triggered = triggered_images if triggered_images is not None else generate(model, count, sampler, steps, seed,
                                                                                backdoor)
    clean = clean_images if clean_images is not None else generate(model, count, sampler, steps, seed)
    hit, miss = per_image_mse(triggered, backdoor.target), per_image_mse(clean, backdoor.target)
    return AttackSuccess(sampler=sampler, steps=steps, count=count,
                         attack_success=float((hit < threshold).float().mean()),
                         false_trigger_rate=float((miss < threshold).float().mean()),
                         mse_triggered_mean=float(hit.mean()), mse_triggered_median=float(hit.median()),
                         mse_clean_to_target_min=float(miss.min()), mse_clean_to_target_median=float(miss.median()),
                         threshold=threshold)


@dataclass
class CleanQuality:
    sampler: str
    steps: int
    count: int
    nearest_mse_mean: float  # MSE to the nearest of the reference toy renders
    toy_like: float  # fraction of samples within TOY_LIKE_MSE of a reference render
    toy_fid: float | None  # Fréchet distance of the toy judge's features (None without a judge)
    reference_count: int


TOY_LIKE_MSE = 0.05


def clean_quality(images: torch.Tensor, reference: torch.Tensor, judge=None, sampler: str = "", steps: int = 0,
                  toy_like_mse: float = TOY_LIKE_MSE) -> CleanQuality:
    """Toy-likeness of generated `images` against `reference` renders (both in [-1, 1]); the toy FID needs the
    toy judge (`metrics.judge.ToyJudge`), which reads images in [0, 1] (16x16 is resized to its 32x32)."""
    nearest = nearest_mse(images, reference)
    fid = None
    if judge is not None:
        from sealdiff.metrics.utility import toy_fid

        fid = toy_fid(judge, (images.clamp(-1, 1) + 1) / 2, (reference + 1) / 2)
    return CleanQuality(sampler=sampler, steps=steps, count=len(images), nearest_mse_mean=float(nearest.mean()),
                        toy_like=float((nearest < toy_like_mse).float().mean()), toy_fid=fid,
                        reference_count=len(reference))


@dataclass
class Agreement:
    mse: float
    ssim: float
    count: int


def agreement(images_a: torch.Tensor, images_b: torch.Tensor) -> Agreement:
    """MSE and SSIM between two models' samples from the same noise (images in [-1, 1])."""
    from sealdiff.metrics.utility import ssim

    a, b = (images_a.clamp(-1, 1) + 1) / 2, (images_b.clamp(-1, 1) + 1) / 2
    return Agreement(mse=float(per_image_mse(images_a, images_b).mean()), ssim=float(ssim(a, b).mean()),
                     count=len(images_a))


@dataclass
class SamplerEvaluation:
    """One sampler's numbers of an unconditional model's evaluation (`evaluate`)."""

    sampler: str
    steps: int
    count: int
    attack: AttackSuccess | None  # with a trigger whose target is known (an attack's record)
    collapse: float | None  # 1 − U(triggered)/U(clean) (Elijah's uniformity): how far the trigger pulls samples together
    reference: Agreement | None  # the clean samples against the reference model's, from the same noise


def evaluate(model: UncondModel, samplers: tuple[str, ...], steps: dict[str, int], count: int,
             backdoor: Backdoor | None = None, reference: UncondModel | None = None, seed: int = MEASURE_SEED,
             progress: bool = True) -> tuple[list[SamplerEvaluation], dict[str, dict[str, torch.Tensor]]]:
    """Per sampler: `count` samples from seeded clean noise, the same noise stamped with `backdoor` (attack success
    when its target is known, the collapse of the samples either way) and, with a `reference` model, its samples
    from the same noise (MSE / SSIM). Returns the numbers and the images ({sampler: {"clean" | "triggered" |
    "reference": images}})."""
    from sealdiff.detection.common import uniformity
    from sealdiff.training import progress_bar

    if count < 3:
        raise SealdiffError(f"count {count} is invalid; valid: an integer >= 3 (the collapse compares samples)")
    rows, images = [], {}
    sets_per_sampler = 1 + (backdoor is not None) + (reference is not None)
    with progress_bar("evaluate", len(samplers) * sets_per_sampler, disable=not progress) as advance:
        for sampler in samplers:
            n = steps[sampler]
            sets = {"clean": generate(model, count, sampler, n, seed)}
            advance(info=f"{sampler} clean")
            attack, collapse, closeness = None, None, None
            if backdoor is not None:
                sets["triggered"] = generate(model, count, sampler, n, seed, backdoor)
                advance(info=f"{sampler} triggered")
                collapse = 1.0 - uniformity(sets["triggered"]) / max(uniformity(sets["clean"]), 1e-8)
                if backdoor.target is not None:
                    attack = attack_success(model, backdoor, sampler, n, count, seed, clean_images=sets["clean"],
                                            triggered_images=sets["triggered"])
            if reference is not None:
                sets["reference"] = generate(reference, count, sampler, n, seed)
                advance(info=f"{sampler} reference")
                closeness = agreement(sets["clean"], sets["reference"])
            rows.append(SamplerEvaluation(sampler=sampler, steps=n, count=count, attack=attack, collapse=collapse,
                                          reference=closeness))
            images[sampler] = sets
    return rows, images
