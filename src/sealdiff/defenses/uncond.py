"""Pieces shared by the unconditional removals (`elijah.py`, `pruning.py`, `purification.py`) and the
`sealdiff remove --method elijah|diff-cleanse|diffdefend` path (`remove_uncond`).

Every removal takes the *inverted* trigger of a scan (`sealdiff scan`, or `--trigger-file` pointing at a scan's
`trigger.safetensors`), never the true one; the true trigger, when the model's sealdiff.json records it, is used
only to *measure* attack success before and after.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sealdiff.detection import common as C
from sealdiff.errors import SealdiffError
from sealdiff.models.uncond import unet_output

logger = logging.getLogger(__name__)

# `sealdiff remove --method` name -> (defense registry name, detector used when no --trigger-file is given)
UNCOND_METHODS = {"elijah": ("elijah-ft", "elijah"), "diff-cleanse": ("diff-cleanse-prune", "diff-cleanse"),
                  "diffdefend": ("diffdefend-purify", "diffdefend")}
TRIGGER_FILE = "trigger.safetensors"
TRIGGER_KEY = "trigger"
RemovalTarget = Literal["eps", "x0"]  # what a triggered input must be answered with (see `distill_loss`)


@dataclass(frozen=True)
class Shard:
    """This process's share of every batch under data parallelism (`accelerate launch`, `count` processes). A loss
    asked for `batch` rows draws `batch * count` from its seeded generator -- the same draws in every process, and the
    ones a single process draws for the whole global batch -- and keeps rows [index·batch, (index+1)·batch)."""

    index: int = 0
    count: int = 1

    def total(self, batch: int) -> int:
        return batch * self.count

    def take(self, values, batch: int):
        return values[self.index * batch:(self.index + 1) * batch]


WHOLE = Shard()  # one process: every row


def shard_of(accelerator) -> Shard:
    return Shard(accelerator.process_index, accelerator.num_processes) if accelerator is not None else WHOLE


@dataclass
class UncondRemovalResult:
    """What an unconditional removal run did (recorded in the output's sealdiff.json)."""

    method: str
    config: Any
    losses: list[float]
    seconds: float
    trainable_parameters: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        from sealdiff.io import to_jsonable

        return to_jsonable(dataclasses.asdict(self))


def sample_levels(model, count: int, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> list:
    """`count` noise levels with fractions drawn uniformly in [low, high]."""
    fracs = low + (high - low) * torch.rand(count, generator=generator)
    return [C.level(model, float(f)) for f in fracs]


def per_sample_eps(model, unet, x: torch.Tensor, levels: list) -> torch.Tensor:
    """ε̂ with one noise level per sample (one UNet call with a per-sample timestep vector), on x's device."""
    if model.kind == "ncsn":
        t = torch.tensor([lv.t for lv in levels], dtype=x.dtype, device=x.device)
        return -t.view(-1, 1, 1, 1) * unet_output(unet, x, t)
    return unet_output(unet, x, torch.tensor([int(lv.t) for lv in levels], dtype=torch.long))


def noised(levels: list, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    a = torch.tensor([lv.a for lv in levels], dtype=x0.dtype).view(-1, 1, 1, 1)
    b = torch.tensor([lv.b for lv in levels], dtype=x0.dtype).view(-1, 1, 1, 1)
    return a * x0 + b * noise


def shifts(model, levels: list) -> torch.Tensor:
    return torch.tensor([C.baddiffusion_shift(model, lv) for lv in levels]).view(-1, 1, 1, 1)


def draw_rows(model, bank: torch.Tensor, batch: int, generator: torch.Generator, shard: Shard, low: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(x0 from `bank`, unit noise, noise levels with fractions in [low, 1]) of this shard's rows."""
    total = shard.total(batch)
    idx = torch.randint(0, len(bank), (total,), generator=generator)
    noise = torch.randn((total, *bank.shape[1:]), generator=generator)
    levels = sample_levels(model, total, generator, low=low)
    return shard.take(bank[idx], batch), shard.take(noise, batch), shard.take(levels, batch)


def clean_loss(model, unet, bank: torch.Tensor, batch: int, generator: torch.Generator, shard: Shard = WHOLE
               ) -> torch.Tensor:
    """The ordinary denoising loss ‖ε̂(a·x0 + b·ε, t) − ε‖² on x0 drawn from `bank` (model samples or data)."""
    x0, noise, levels = draw_rows(model, bank, batch, generator, shard)
    return (per_sample_eps(model, unet, noised(levels, x0, noise), levels) - noise).pow(2).mean()


def trojan_scales(count: int, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """g drawn per sample uniformly in [γ, 1], shaped (count, 1, 1, 1): −(1−g)·noise added to a state scales that
    state's noise by g, so a removal for a trigger found on γ·ε + τ (TrojDiff's trojan input) covers every noise
    scale up to ε + τ."""
    return gamma + (1.0 - gamma) * torch.rand(count, 1, 1, 1, generator=generator)


def distill_loss(model, unet, teacher, bank: torch.Tensor, batch: int, generator: torch.Generator,
                 trigger: torch.Tensor | None = None, low: float = 0.0, target: RemovalTarget = "eps",
                 scales: tuple[float, float] = (1.0, 1.0), gamma: float = 1.0, channel_means: float = 0.0,
                 shard: Shard = WHOLE) -> torch.Tensor:
    """‖ε̂_θ(x_t [+ k·c_t·τ], t) − y‖²: without `trigger`, y = ε̂_teacher(x_t, t) (retention: keep the teacher's
    answers). With it (removal), the triggered input must be answered as the teacher answers the clean one:
    `target='eps'` y = ε̂_teacher(x_t, t) (the offset is ignored); `target='x0'` y = ε̂_teacher(x_t, t) + k·c_t·τ/b_t,
    so that the x̂0 implied by the triggered input is the teacher's clean x̂0 (the offset is denoised away as a clean
    model treats noise). k is drawn per sample uniformly in `scales`, so the repair also covers the trigger's
    direction at other strengths than the inverted one's. `gamma` < 1 (an inverted trojan input x_T = γ·ε + τ,
    TrojDiff's) also scales the triggered input's noise by g, drawn per sample uniformly in [γ, 1] (a backdoor that
    answers γ·ε + τ may answer ε + τ too): x_t − (1−g)·b_t·ε + k·c_t·τ; its x0 target keeps the teacher's clean x̂0,
    y = ε̂_teacher(x_t, t) − (1−g)·ε + k·c_t·τ/b_t (the eps target keeps ε̂_teacher(x_t, t)). `channel_means` > 0
    stamps τ + m instead of τ, m per sample from `channel_offsets`."""
    x0, noise, levels = draw_rows(model, bank, batch, generator, shard, low)
    if trigger is not None:
        k = shard.take(scales[0] + (scales[1] - scales[0]) * torch.rand(shard.total(batch), 1, 1, 1,
                                                                       generator=generator), batch)
        # (drawn only for γ < 1: the γ = 1 removal keeps its random stream)
        g = shard.take(trojan_scales(shard.total(batch), gamma, generator), batch) if gamma != 1.0 else None
        if channel_means > 0:  # (drawn only then, as g)
            means = channel_offsets(trigger, shard.total(batch), channel_means, generator)
            trigger = trigger + shard.take(means, batch)
    x_t = noised(levels, x0, noise)
    with torch.no_grad():
        answer = per_sample_eps(model, teacher, x_t, levels)
    if trigger is None:
        return (per_sample_eps(model, unet, x_t, levels) - answer).pow(2).mean()
    b = torch.tensor([lv.b for lv in levels], dtype=x0.dtype).view(-1, 1, 1, 1)
    offset = k * shifts(model, levels) * trigger
    if g is not None:
        offset = offset - (1.0 - g) * (b * noise)
    if target == "x0":
        answer = answer + offset / b
    return (per_sample_eps(model, unet, x_t + offset, levels) - answer).pow(2).mean()


def channel_offsets(trigger: torch.Tensor, count: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    """(count, C, 1, 1) per-channel constants drawn uniformly in ±spread·rms(τ): what a removal adds to the inverted
    τ, whose channel means the inversion cannot see (`common.sphere_triggers` removes them), while a true trigger's
    can carry the backdoor (README: box-hat's fires under DDIM on its channel means alone)."""
    rms = float(trigger.pow(2).mean().sqrt())
    return (2 * torch.rand(count, trigger.shape[0], 1, 1, generator=generator) - 1) * spread * rms


def check_channel_means(value: float) -> None:
    if value < 0:
        raise SealdiffError(f"trigger_channel_means {value} is invalid; valid: a number >= 0")


def check_trigger_scales(low: float, high: float) -> None:
    """The range of stamped trigger strengths k of a trajectory removal (`distill_loss`'s `scales`)."""
    if not 0.0 < low <= high:
        raise SealdiffError(f"trigger_scale_low {low} / trigger_scale_high {high} are invalid; valid: 0 < low <= high")


@torch.no_grad()
def generated_bank(model, count: int, steps: int, seed: int) -> torch.Tensor:
    """x̂0 sampled by the model itself from clean noise: the data-free stand-in for training data."""
    from sealdiff.detection.diffdefend import model_bank

    return model_bank(model, count, steps, torch.Generator().manual_seed(seed))


def check_trigger(model, trigger: torch.Tensor, noise_scale: float = 1.0) -> torch.Tensor:
    """The trigger as a float CPU tensor after checking its shape, values and noise scale γ (0 < γ <= 1, VP models
    only)."""
    if not isinstance(trigger, torch.Tensor) or tuple(trigger.shape) != tuple(model.sample_shape):
        shape = tuple(trigger.shape) if isinstance(trigger, torch.Tensor) else type(trigger).__name__
        raise SealdiffError(f"the trigger has shape {shape}; this model's x_T is {tuple(model.sample_shape)}")
    if not torch.isfinite(trigger).all():
        raise SealdiffError("the trigger contains NaN or inf")
    if not 0.0 < noise_scale <= 1.0 or (noise_scale != 1.0 and model.kind == "ncsn"):
        raise SealdiffError(f"noise scale {noise_scale} is invalid; valid: 0 < value <= 1 (only 1 for ncsn)")
    return trigger.detach().float().cpu()


# --------------------------------------------------------------------------------------------------
# triggers on disk


def save_trigger(trigger: torch.Tensor, directory: Path, metadata: dict[str, str] | None = None) -> None:
    """`trigger.safetensors` (key 'trigger') and `trigger.png` (the trigger, min-max scaled, as an image)."""
    from safetensors.torch import save_file

    save_file({TRIGGER_KEY: trigger.detach().float().contiguous().cpu()}, str(directory / TRIGGER_FILE),
              metadata=metadata or {})
    save_trigger_png(trigger, directory / "trigger.png")


def save_trigger_png(trigger: torch.Tensor, path: Path, upscale: int = 8) -> None:
    from PIL import Image

    t = trigger.detach().float().cpu()
    if t.shape[0] not in (1, 3):  # latent triggers: show the first three channels
        t = t[:3] if t.shape[0] > 3 else t[:1]
    lo, hi = float(t.min()), float(t.max())
    t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    array = (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    image.resize((image.width * upscale, image.height * upscale), Image.NEAREST).save(path)


def load_trigger(path: str | Path) -> tuple[torch.Tensor, float]:
    """(trigger, noise scale γ) of an inverted trigger written by `sealdiff scan` (its `trigger.safetensors`, or the
    scan's output folder; γ = 1 when the file records none). A file that a scan did not write is refused: an
    attack's own `trigger.safetensors` holds the *true* trigger, and removal must work from the inverted one."""
    from safetensors import safe_open

    from sealdiff.detection import TRIGGER_SOURCE

    path = Path(path)
    if path.is_dir():
        path = path / TRIGGER_FILE
    if not path.is_file():
        raise SealdiffError(f"trigger file {path} does not exist (give a scan's output folder or its {TRIGGER_FILE})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("source") != TRIGGER_SOURCE:
                raise SealdiffError(f"{path} was not written by `sealdiff scan` (an attack's trigger file holds the "
                                    "true trigger; removal uses an inverted one): run `sealdiff scan` first")
            if TRIGGER_KEY not in handle.keys():
                raise SealdiffError(f"{path} holds no tensor named {TRIGGER_KEY!r}")
            try:
                noise_scale = float(metadata.get("noise_scale", "1.0"))
            except ValueError:
                raise SealdiffError(f"{path} records noise_scale {metadata['noise_scale']!r}; valid: a number") from None
            return handle.get_tensor(TRIGGER_KEY).float(), noise_scale
    except SealdiffError:
        raise
    except Exception as exc:
        raise SealdiffError(f"{path} is not a valid safetensors file ({exc.__class__.__name__})") from None


def trainable_count(unet) -> int:
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def fine_tune(unet, description: str, steps: int, lr: float, loss_fn, progress: bool = True,
              after_step=None, accelerator=None) -> tuple[list[float], float]:
    """Train every weight of `unet` with AdamW on `loss_fn(net) -> loss` for `steps` steps (`net`: the module to
    call, `unet` or its data-parallel wrapper under an `accelerator`; `after_step()` runs after each update); a
    non-finite loss stops the run. Returns (losses, seconds): with several processes, each step's loss is the mean of
    theirs."""
    from sealdiff.training import run_optimizer

    start = time.perf_counter()
    unet.train()
    unet.requires_grad_(True)
    net = accelerator.prepare_model(unet) if accelerator is not None else unet  # DDP-wrapped when N > 1
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    try:
        losses = run_optimizer(optimizer, lambda: loss_fn(net), steps, description, progress, after_step,
                               accelerator=accelerator)
    finally:
        unet.eval()
    return losses, time.perf_counter() - start
