"""Seeded, batched image generation: image i always comes from seed `seeds[i]`, whatever the batch size."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sealdiff.training import progress_bar

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0


def initial_latents(pipe, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def image_size(pipe) -> int:
    size = pipe.unet.config.sample_size
    return (size if isinstance(size, int) else size[0]) * pipe.vae_scale_factor


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 50, description: str = "generate",
             **pipe_kwargs) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] on the CPU."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    size = image_size(pipe)
    out = []
    with progress_bar(description, len(prompts), disable=len(prompts) <= batch_size) as advance:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            latents = initial_latents(pipe, seeds[start:start + batch_size], size, size)
            result = pipe(chunk, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                          latents=latents.to(pipe.device, pipe.unet.dtype), output_type="pt", **pipe_kwargs)
            out.append(result.images.float().cpu().clamp(0, 1))
            advance(len(chunk))
    return torch.cat(out)
