"""What the unconditional attacks (BadDiffusion, TrojDiff, VillanDiffusion) share: the common config fields,
the trigger/target tensors in the model's own space, and one small training loop (also used to train the
clean zoo models) that mixes the clean diffusion loss with an attack's poisoned loss.

The loop trains `model.unet` in place. Per step: a batch of clean toy images; the first
`round(batch_size * poison_fraction)` rows are replaced by the attack's poisoned forward process (target image
y, trigger r, noise ε, time t -> (x_t, training target)); the loss is the MSE of the model's prediction against
the targets over the whole batch. Under `accelerate launch` with N processes the batch is N·batch_size rows, each
process training on its own slice (see `train_uncond`). Predictions are ε (ddpm, ldm) or σ·score (ncsn; the NCSN UNet divides its
output by σ, so σ·output ≈ −ε on clean data: Song et al.'s denoising score matching with weight σ²).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import get_args

import torch
import torch.nn.functional as F

from sealdiff.config import LrSchedule, check_choice
from sealdiff.data import uncond_toy
from sealdiff.data.images import FolderImageSource, image_files, image_source
from sealdiff.errors import SealdiffError
from sealdiff.models.uncond import UncondModel, unet_output
from sealdiff.training import (Checkpointer, gather_step, load_trainable_state, progress_bar, rng_state,
                               set_rng_state, trainable_state)

logger = logging.getLogger(__name__)

# poison(noise, t) -> (x_t, target) for the poisoned rows of a batch (the attack closes over y and the trigger)
PoisonFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class UncondAttackConfig:
    """Fields every unconditional attack shares. Defaults are the zoo's."""

    trigger: str = field(default="grey-box", metadata={"help": "grey-box | stop-sign | blend"})
    trigger_size: int = field(default=uncond_toy.DEFAULT_TRIGGER_SIZE, metadata={"help": "patch triggers: side in pixels"})
    trigger_position: str = field(default="bottom-right", metadata={"help": "patch triggers: bottom-right | bottom-left | top-right | top-left"})
    trigger_intensity: float = field(default=1.0, metadata={"help": "scale of the additive trigger pattern", "range": (0.0, None)})
    target: str = field(default="hat", metadata={"help": "hat | corner-box | shifted-trigger | in-class | out-of-class"})
    target_position: str = field(default="top-left", metadata={"help": "corner-box: its corner"})
    poison_fraction: float = field(default=0.5, metadata={"help": "fraction of each batch that is poisoned", "range": (0.0, 1.0)})
    data: str = field(default="toy", metadata={"help": "clean images: 'toy' (the embedded toy images) or a folder of "
                                                       "image files, resized and centre-cropped to the model's size"})
    steps: int = field(default=600, metadata={"help": "training steps (fine-tuning the given model)"})
    batch_size: int = 32
    lr: float = field(default=5e-4, metadata={"range": (0.0, None)})
    lr_schedule: LrSchedule = field(default="constant", metadata={
        "help": "constant | cosine (decays the learning rate to 0 over the steps)"})
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("trigger", self.trigger, get_args(uncond_toy.TriggerName))
        check_choice("target", self.target, get_args(uncond_toy.TargetName))
        check_choice("trigger_position", self.trigger_position, get_args(uncond_toy.Position))
        check_choice("target_position", self.target_position, get_args(uncond_toy.Position))
        check_choice("lr_schedule", self.lr_schedule, LrSchedule)
        if not 0.0 <= self.poison_fraction <= 1.0:
            raise SealdiffError(f"poison_fraction={self.poison_fraction} is out of range; valid: 0..1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SealdiffError(f"lr={self.lr} is out of range; valid: a number > 0")
        if not self.trigger_intensity > 0:
            raise SealdiffError(f"trigger_intensity={self.trigger_intensity} is out of range; valid: a number > 0")
        for name in ("steps", "batch_size", "trigger_size"):
            if getattr(self, name) < 1:
                raise SealdiffError(f"{name} must be at least 1")
        if self.data != "toy":
            image_files(self.data)  # refused now, before any training or output


@dataclass
class BackdoorSpec:
    """The backdoor as tensors. Sampling: x_T = gamma * sample_noise(model) + stamp; the backdoored model
    then generates `target_image`. `trigger_image` is the pattern in pixel space ([-1, 1] scale)."""

    trigger_image: torch.Tensor  # (3, H, W)
    target_image: torch.Tensor  # (3, H, W) in [-1, 1]
    stamp: torch.Tensor  # (C, h, w): what is added to gamma * prior noise (the model's x_T space)
    gamma: float = 1.0

    def triggered(self, noise: torch.Tensor) -> torch.Tensor:
        """Prior noise (B, C, h, w) -> backdoored x_T."""
        return self.gamma * noise + self.stamp.to(noise)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What `trigger.safetensors` holds next to an attacked model."""
        # clones: the stamp may be the trigger image itself, and safetensors refuses shared storage
        return {"trigger": self.stamp.detach().clone().contiguous(),
                "trigger_image": self.trigger_image.detach().clone().contiguous(),
                "target": self.target_image.detach().clone().contiguous(), "gamma": torch.tensor(float(self.gamma))}


def latent_pattern(pattern: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """A pixel pattern (3, H, W) carried to a latent grid (C, h, w): area-resized, channels R, G, B, then their
    mean for any further channel (LDM triggers live in the latent space the UNet diffuses)."""
    channels, h, w = shape
    small = F.interpolate(pattern[None], size=(h, w), mode="area")[0]
    extra = [small.mean(0, keepdim=True)] * max(0, channels - 3)
    return torch.cat([small, *extra])[:channels]


def pixel_trigger(cfg: UncondAttackConfig, size: int) -> torch.Tensor:
    return uncond_toy.make_trigger(cfg.trigger, size, cfg.trigger_size, cfg.trigger_position, cfg.trigger_intensity)


def target_image(cfg: UncondAttackConfig, size: int, trigger: torch.Tensor) -> torch.Tensor:
    return uncond_toy.make_target(cfg.target, size, trigger=trigger, box=cfg.trigger_size, position=cfg.target_position)


def check_kind(model: UncondModel, method: str, kinds: tuple[str, ...]) -> None:
    if model.kind not in kinds:
        raise SealdiffError(f"{method} does not apply to a {model.kind} model; valid model kinds: {', '.join(kinds)}"
                            + ("; use villandiffusion for ncsn and ldm models" if method != "villandiffusion" else ""))


# --------------------------------------------------------------------------------------------------
# the clean forward process and the model's prediction


def draw_times(model: UncondModel, batch: int, generator: torch.Generator) -> torch.Tensor:
    """t ~ U{0..T-1} (ddpm, ldm); σ log-uniform in [σ_min, σ_max] (ncsn), as the UNet takes it."""
    if model.kind == "ncsn":
        lo, hi = math.log(model.scheduler.config.sigma_min), math.log(model.scheduler.config.sigma_max)
        return torch.exp(lo + (hi - lo) * torch.rand(batch, generator=generator))
    return torch.randint(0, model.scheduler.config.num_train_timesteps, (batch,), generator=generator)


def expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like).view(-1, *([1] * (like.dim() - 1)))


def clean_forward(model: UncondModel, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """(x_t, target) of the clean process: VP x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, target ε; VE x_t = x0 + σ·ε,
    target −ε (for σ·score)."""
    if model.kind == "ncsn":
        return x0 + expand(t, x0) * noise, -noise
    return model.scheduler.add_noise(x0, noise, t), noise


def predict(model: UncondModel, x_t: torch.Tensor, t: torch.Tensor, unet: torch.nn.Module | None = None
            ) -> torch.Tensor:
    """The training target's estimate; `unet` replaces `model.unet` (e.g. its data-parallel wrapper)."""
    out = unet_output(unet if unet is not None else model.unet, x_t, t)
    return out * expand(t, out) if model.kind == "ncsn" else out


def vp_coefficients(scheduler, t: torch.Tensor, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """√ᾱ_t, √(1−ᾱ_t), α_t, β_t at integer times t, shaped to broadcast against `like`."""
    alphas_cumprod = scheduler.alphas_cumprod.to(like.device, torch.float64)[t.long().cpu()]
    alphas = scheduler.alphas.to(like.device, torch.float64)[t.long().cpu()]
    out = {"sqrt_abar": alphas_cumprod.sqrt(), "sqrt_1m_abar": (1 - alphas_cumprod).sqrt(), "alpha": alphas,
           "beta": 1 - alphas}
    return {k: expand(v, like).to(like.dtype) for k, v in out.items()}


def sde_correction(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """BadDiffusion's trigger coefficient k_t = (1 − √α_t)·√(1−ᾱ_t) / β_t: with the ε target ε + k_t·r the
    ancestral DDPM step's mean equals the poisoned posterior mean of x_{t-1} (≈ √(1−ᾱ_t)/2 in continuous time)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)[t.long().cpu()]
    alphas = scheduler.alphas.to(torch.float64)[t.long().cpu()]  # float64: 1 − √α_t cancels badly in float32
    k = (1 - alphas.sqrt()) * (1 - alphas_cumprod).sqrt() / (1 - alphas)
    return expand(k, like).to(like.dtype)


# --------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    losses: list[float]
    poison_losses: list[float]


def train_uncond(model: UncondModel, source: uncond_toy.ToyImageSource | FolderImageSource, *, steps: int,
                 batch_size: int, lr: float, seed: int, poison: PoisonFn | None = None, poison_fraction: float = 0.0, description: str = "train",
                 cosine: bool = False, ema_decay: float = 0.0, checkpointer: Checkpointer | None = None,
                 fingerprint: dict | None = None, accelerator=None) -> TrainResult:
    """Train `model.unet` in place (AdamW, grad-norm clip 1). `poison(noise, t) -> (x_t, target)` gives the
    poisoned rows (in the model's space). `cosine` decays the learning rate to 0. `ema_decay` > 0 keeps an
    exponential moving average of the weights (decay warmed up as min(d, (1+s)/(10+s))) and leaves it in the
    UNet at the end (the trained weights are replaced by their average).

    With a `checkpointer`, saves weights, optimizer, step, losses and every random stream, and resumes from
    them (an interrupted and resumed run trains the same weights as an uninterrupted one).

    With an `accelerator` of N processes (`accelerate launch`), data-parallel: every process draws the same
    global batch of N·`batch_size` rows from the seeded streams (poisoned rows first, as in one process) and
    trains on its own slice; DDP averages the gradients, so N processes with batch b train the weights one process
    trains with batch N·b. Every process holds the same state; the main one writes the checkpoints."""
    unet = model.unet
    if model.vae is not None:
        model.vae.requires_grad_(False).eval()
    unet.requires_grad_(True)
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator is not None else (1, 0)
    rows = slice(rank * batch_size, (rank + 1) * batch_size)  # this process's slice of the global batch
    trained = accelerator.prepare_model(unet) if accelerator is not None else unet  # DDP-wrapped when N > 1
    main = accelerator is None or accelerator.is_main_process
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) if cosine else 1.0)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_poison = round(world * batch_size * poison_fraction) if poison is not None else 0
    local_poison = min(max(n_poison - rows.start, 0), batch_size)
    losses: list[float] = []
    poison_losses: list[float] = []
    ema = [p.detach().clone() for p in params] if ema_decay else []
    start = 0
    if checkpointer is not None:
        # a different process count is a different global batch
        saved = checkpointer.start({**(fingerprint or {"description": description}),
                                    **({"num_processes": world} if world > 1 else {})})
        if saved is not None:
            load_trainable_state(unet, params, saved["weights"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            generator.set_state(saved["rng"]["generator"])
            source.rng.setstate(saved["rng"]["source"])
            set_rng_state(saved["rng"]["global"])
            start, losses, poison_losses = saved["step"], list(saved["losses"]), list(saved["poison_losses"])
            for e, v in zip(ema, saved.get("ema", [])):
                e.copy_(v)

    def state(step: int) -> dict:
        return {"step": step, "losses": losses, "poison_losses": poison_losses,
                "weights": trainable_state(unet, params), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "ema": list(ema),
                "rng": {"generator": generator.get_state(), "source": source.rng.getstate(), "global": rng_state()}}

    unet.train()
    guard = checkpointer.guard() if checkpointer is not None else contextlib.nullcontext()
    try:
        with progress_bar(description, steps, disable=not main) as advance, guard:
            if start:
                advance(start, info=f"resumed after step {start}")
            for step in range(start, steps):
                images = source.batch(world * batch_size)[rows]
                with torch.no_grad():
                    x0 = model.encode(images)
                noise = torch.randn((world * batch_size, *x0.shape[1:]), generator=generator)[rows]
                t = draw_times(model, world * batch_size, generator)[rows]
                x_t, target = clean_forward(model, x0, noise, t)
                if local_poison:
                    x_t, target = x_t.clone(), target.clone()
                    x_t[:local_poison], target[:local_poison] = poison(noise[:local_poison], t[:local_poison])
                pred = predict(model, x_t, t, trained)
                per_row = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
                loss = per_row.mean()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                if ema:
                    decay = min(ema_decay, (1 + step) / (10 + step))
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
                all_rows, stop = gather_step(accelerator, per_row, checkpointer)  # the global batch's rows
                all_rows = all_rows.flatten()
                value = all_rows.mean().item()
                if not math.isfinite(value):
                    kept = checkpointer.kept_note() if checkpointer is not None else ""
                    raise SealdiffError(f"the training loss became NaN/inf at step {step + 1}; lower --lr{kept}")
                losses.append(value)
                poison_losses.append(all_rows[:n_poison].mean().item() if n_poison else float("nan"))
                advance(info=f"loss {value:.4f}")
                if checkpointer is not None:
                    checkpointer.after_step(step + 1, lambda: state(step + 1), save=main, stop=stop)
    finally:
        unet.eval().requires_grad_(False)
    if ema:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    return TrainResult(losses=losses, poison_losses=poison_losses)


def train_backdoor(model: UncondModel, config: UncondAttackConfig, poison: PoisonFn, description: str, method: str,
                   checkpointer: Checkpointer | None = None, accelerator=None) -> TrainResult:
    """`train_uncond` with an attack config's recipe: clean images of the model's size (toy or the config's
    folder), poisoned rows from `poison`; `batch_size` rows per process of an `accelerator`."""
    return train_uncond(model, image_source(config.data, config.seed, model.image_size), steps=config.steps,
                        batch_size=config.batch_size, lr=config.lr, seed=config.seed, poison=poison,
                        poison_fraction=config.poison_fraction, description=description,
                        cosine=config.lr_schedule == "cosine", checkpointer=checkpointer,
                        fingerprint={"method": method, "config": config}, accelerator=accelerator)
