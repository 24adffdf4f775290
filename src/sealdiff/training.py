"""Small pieces every training loop shares: prompt encoding, noising, progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Token embeddings (B, L, D) as the UNet's `encoder_hidden_states`, like `StableDiffusionPipeline`."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0]


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; `offset` adds per-channel constant noise (lets the model shift mean colour)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset:
        noise = noise + offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator,
                                             device=latents.device, dtype=latents.dtype)
    return noise


def noisy_latents(scheduler, latents: torch.Tensor, generator: torch.Generator | None, offset: float = 0.0,
                  timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, noise, t) for uniformly drawn t, via `scheduler.add_noise`."""
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator, device=latents.device)
    noise = sample_noise(latents, generator, offset)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


@contextlib.contextmanager
def progress_bar(description: str, total: int, disable: bool = False) -> Iterator:
    """A rich progress bar; yields `advance(n=1, **fields)`."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=disable, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            progress.update(task, advance=n, info=info)

        yield advance
