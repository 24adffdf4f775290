"""Tiny components with the Stable Diffusion 1.x architecture, built in code.

The same classes as SD (CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel,
a DDIM scheduler), only narrower: so every code path that runs on them runs unchanged on a real
SD directory. The tokenizer is the real CLIP BPE (derived from the vocabulary that open_clip ships),
so invisible and multi-token triggers behave as they do on SD.
"""

from __future__ import annotations

import gzip
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CLIP_BOS, CLIP_EOS = 49406, 49407
CLIP_VOCAB_SIZE = 49408


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The CLIP BPE tokenizer (same ids as OpenAI CLIP) from the vocabulary shipped in the package."""
    assets = resources.files("sealdiff") / "assets" / "clip_bpe"
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("vocab.json", "merges.txt"):
            (Path(tmp) / name).write_bytes(gzip.decompress((assets / f"{name}.gz").read_bytes()))
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_length)


@dataclass(frozen=True)
class TinySpec:
    """Widths of the tiny SD-style pipeline. The defaults are the zoo's; tests use `TinySpec.test()`."""

    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (32, 64)
    unet_channels: tuple[int, ...] = (32, 64)
    unet_heads: int = 4
    norm_groups: int = 8
    image_size: int = 32

    @classmethod
    def test(cls) -> "TinySpec":
        return cls(text_hidden=32, text_layers=1, text_heads=2, vae_channels=(8, 16), unet_channels=(8, 16),
                   unet_heads=2, norm_groups=4, image_size=16)


def text_encoder(spec: TinySpec) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 4,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads, max_position_embeddings=77,
        bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS, projection_dim=spec.text_hidden,
    )
    return CLIPTextModel(config)


def vae(spec: TinySpec) -> AutoencoderKL:
    n = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels, layers_per_block=1, norm_num_groups=spec.norm_groups,
        sample_size=spec.image_size, mid_block_add_attention=False,
    )


def unet(spec: TinySpec) -> UNet2DConditionModel:
    n = len(spec.unet_channels)
    return UNet2DConditionModel(
        sample_size=spec.image_size // 2 ** (len(spec.vae_channels) - 1), in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=spec.unet_channels, layers_per_block=1, cross_attention_dim=spec.text_hidden,
        attention_head_dim=spec.unet_heads, norm_num_groups=spec.norm_groups,
    )


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon")


def sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="trailing", prediction_type="epsilon")


def pipeline(spec: TinySpec | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised tiny `StableDiffusionPipeline` (deterministic for a seed)."""
    spec = spec or TinySpec()
    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        vae=vae(spec), text_encoder=text_encoder(spec), tokenizer=clip_tokenizer(), unet=unet(spec),
        scheduler=sample_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
