"""The unconditional part of the zoo: every model the recipe lists is committed, loads from `zoo:NAME`
(sha256-checked), samples, and a backdoored one carries its trigger and its clean base."""

import pytest
import torch

from sealdiff.metrics.uncond import read_backdoor
from sealdiff.models import zoo
from sealdiff.models.uncond import SAMPLERS, load_uncond, sample, sample_noise
from sealdiff.recipes import uncond_zoo

NAMES = sorted(uncond_zoo.ENTRIES)


def test_every_recipe_model_is_in_the_zoo_with_its_kind():
    manifest = zoo.load_manifest()
    missing = [n for n in NAMES if n not in manifest["models"]]
    assert not missing, f"not in zoo/manifest.json: {missing}"
    assert set(zoo.models_of_kind("uncond-")) >= set(NAMES)
    assert len([e for e in uncond_zoo.CLEAN]) >= 3 and len(uncond_zoo.BACKDOORED) >= 4


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_loads_and_samples(name):
    entry = uncond_zoo.ENTRIES[name]
    model = load_uncond(f"zoo:{name}")
    assert model.image_size == 16
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())  # stored fp16, loaded fp32
    sampler = SAMPLERS[model.kind][0]
    noise = sample_noise(model, 2, torch.Generator().manual_seed(0))
    images = sample(model, noise, sampler, steps=2, generator=torch.Generator().manual_seed(1))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    if entry.attack:
        directory = zoo.materialize(name)
        backdoor = read_backdoor(directory)
        assert backdoor.trigger.shape == model.sample_shape and backdoor.target.shape == (3, 16, 16)
        assert zoo.load_manifest()["models"][name]["base"] == entry.base
        images = sample(model, backdoor.stamp(noise), sampler, steps=2, generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(images).all()


def test_trojdiff_zoo_backdoor_fires_with_its_trojan_sampling_only():
    """The TrojDiff model generates its target from x_T = γε + (1−γ)δ when the ancestral steps' noise is scaled
    by γ (its trojan process; what `metrics.uncond.generate` does for γ < 1), not with the stock σ_t."""
    from sealdiff.metrics.uncond import per_image_mse

    name = "uncond-ddpm-trojdiff-blend-inclass"
    model, backdoor = load_uncond(f"zoo:{name}"), read_backdoor(zoo.materialize(name))
    assert backdoor.gamma < 1
    x_T = backdoor.stamp(sample_noise(model, 8, torch.Generator().manual_seed(0)))
    hits = {}
    for scale in (backdoor.gamma, 1.0):
        images = sample(model, x_T, "ddpm", steps=40, generator=torch.Generator().manual_seed(1),
                        step_noise_scale=scale)
        hits[scale] = (per_image_mse(images, backdoor.target) < 0.05).float().mean().item()
    assert hits[backdoor.gamma] >= 0.75 and hits[1.0] <= 0.25, hits
