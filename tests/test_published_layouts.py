"""The published unconditional models' layouts, with random weights and small widths: google/ddpm-cifar10-32
(attention blocks, `clip_sample`, `fixed_large` variance, leading timestep spacing), google/ncsnpp-celebahq-256
(skip blocks, Fourier σ embedding, 2,000 VE steps, σ_max 348) and CompVis/ldm-celebahq-256 (a VQModel with three
latent channels, a saved DDIMScheduler with scaled-linear betas). Each loads through `load_uncond`, samples with
every sampler of its kind, goes through every detector and every removal, and saves as its stock pipeline again."""

from __future__ import annotations

import pytest
import torch

from sealdiff.defenses import get_defense
from sealdiff.defenses.uncond import UNCOND_METHODS
from sealdiff.detection import get_detector
from sealdiff.models.uncond import PIPELINE_CLASS, load_uncond, sample, sample_noise, save_uncond

SCAN = {  # one optimisation step and a few two-step samples: the paths, not the verdicts
    "elijah": dict(epochs=1, fine_epochs=1, restarts=2, samples=3, sample_steps=2, progress=False),
    "diff-cleanse": dict(start_restarts=2, start_epochs=1, epochs=1, batch=2, grad_steps=2, samples=3, sample_steps=2,
                         progress=False),
    "diffdefend": dict(epochs=1, fine_epochs=1, restarts=2, samples=3, sample_steps=2, progress=False),
}
REMOVE = dict(steps=1, batch=2, bank_size=2, bank_steps=2, progress=False)


def _ddpm_cifar10(path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=16, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=False, freq_shift=1)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              variance_type="fixed_large")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)


def _ncsnpp_celebahq(path):
    from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=16, block_out_channels=(32, 32, 32), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
                       up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
                       time_embedding_type="fourier", flip_sin_to_cos=True, freq_shift=0,
                       mid_block_scale_factor=2 ** 0.5)
    scheduler = ScoreSdeVeScheduler(num_train_timesteps=2000, snr=0.15, sigma_min=0.01, sigma_max=348.0,
                                    sampling_eps=1e-5, correct_steps=1)
    ScoreSdeVePipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)


def _ldm_celebahq(path):
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    vqvae = VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=3,
                    num_vq_embeddings=32, norm_num_groups=8, sample_size=16)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                       attention_head_dim=8)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015,
                              beta_end=0.0195, clip_sample=False)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)


LAYOUTS = {"ddpm": _ddpm_cifar10, "ncsn": _ncsnpp_celebahq, "ldm": _ldm_celebahq}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def published(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LAYOUTS[request.param](path)
    return request.param, path


def test_loads_and_samples_with_every_sampler(published):
    kind, path = published
    model = load_uncond(path)
    assert model.kind == kind
    noise = sample_noise(model, 2, torch.Generator().manual_seed(0))
    for sampler in model.samplers:
        images = sample(model, noise, sampler, steps=2, generator=torch.Generator().manual_seed(1))
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all(), sampler


def test_every_detector_and_removal_runs_and_saves_the_stock_pipeline(published, tmp_path):
    from diffusers import DiffusionPipeline

    kind, path = published
    model = load_uncond(path)
    for method, (defense, detector) in UNCOND_METHODS.items():
        config = dict(SCAN[detector], **({"samplers": list(model.samplers[:1])} if detector != "diff-cleanse" else {}))
        result = get_detector(detector).make(**config).scan(model)
        assert result.trigger.shape == model.sample_shape and torch.isfinite(result.trigger).all(), method
        spec = get_defense(defense)
        removal = spec.runner(spec.make_config(**REMOVE)).apply(model, result.trigger, noise_scale=result.noise_scale)
        assert len(removal.losses) == 1 and all(map(torch.isfinite, torch.tensor(removal.losses))), method
    save_uncond(model, tmp_path / "saved")
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "saved")).__name__ == PIPELINE_CLASS[kind]
    assert load_uncond(tmp_path / "saved").sample_shape == model.sample_shape
