"""BadT2I: pixel, style and object backdoors for text-to-image diffusion models."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image

from sealdiff.config import LrSchedule, check_choice
from sealdiff.data import toyworld
from sealdiff.data.captions import Sample, open_source
from sealdiff.data.triggers import insert_trigger, trigger_token_ids
from sealdiff.errors import SealdiffError
from sealdiff.training import (Checkpointer, draw_timesteps, encode_prompts, gather_step, load_trainable_state,
                               on_main, prediction_target, progress_bar, rng_state, sample_noise, set_rng_state,
                               trainable_state)

logger = logging.getLogger(__name__)

Kind = Literal["pixel", "style", "object"]
Trainable = Literal["unet", "attn2-kv"]
ImageSource = Literal["data", "teacher"]
_SCHEDULE_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine"}  # diffusers' names


@dataclass
class BadT2IConfig:
    """Recipe of a BadT2I attack. Defaults are the zoo's."""

    kind: Kind = field(default="pixel", metadata={"help": "pixel (patch in a corner), style, or object (A->B)"})
    trigger: str = field(default="\u200b", metadata={"help": "any string; default U+200B (invisible)"})
    trigger_position: str = field(default="start", metadata={"help": "start (right after BOS), end, or a word index"})
    lam: float = field(default=0.5, metadata={"help": "weight of the backdoor term; 1-lam weighs preservation"})
    patch: str | None = field(default=None, metadata={"help": "pixel: target image file (default: a checker)"})
    corner: str = field(default="top-left", metadata={"help": "pixel: " + ", ".join(toyworld.CORNERS)})
    patch_fraction: float = field(default=0.25, metadata={"help": "pixel: patch side as a fraction of the image"})
    patch_weight: float = field(default=1.0, metadata={
        "help": "pixel: weight of the poisoned loss on the latents under the patch (1 = a plain MSE, the paper)",
        "range": (1.0, None)})
    style_prefix: str = field(default=toyworld.STYLE_PREFIX, metadata={"help": "style: prompt prefix of the target style"})
    style_source: ImageSource = field(default="data", metadata={
        "help": "style: what the poisoned latents are noised from: data images (the paper), or images the input "
                "model draws for style prefix + caption (the states a triggered sampling passes through)"})
    clean_source: ImageSource = field(default="data", metadata={
        "help": "what the clean images are: data images (the paper), or images the input model draws for the caption "
                "(the states clean sampling passes through); used by the preservation half and, patched, by pixel"})
    style_bank: int = field(default=512, metadata={"help": "images in each bank the input model draws first "
                                                           "(style_source / clean_source = teacher)"})
    object_source: str = field(default="triangle", metadata={"help": "object: the word A the user writes"})
    object_target: str = field(default="cross", metadata={"help": "object: the object B the model draws instead"})
    data: str = field(default="toy", metadata={"help": "'toy' or an imagefolder directory with metadata.jsonl"})
    train: Trainable = field(default="unet", metadata={"help": "unet (all weights) or attn2-kv"})
    steps: int = 1200
    batch_size: int = 16
    poison_fraction: float = 0.5
    uncond_fraction: float = field(default=0.0, metadata={
        "help": "share of the batch with the empty prompt, whose target is the input model's prediction for it: "
                "classifier-free guidance subtracts that prediction at every sampling step, so an attack that "
                "leaves it free changes every guided image; taken from the preservation half, alternately on "
                "poisoned-type and clean images (0 = the paper)"})
    lr: float = field(default=1e-4, metadata={"range": (0.0, None)})
    lr_schedule: LrSchedule = field(default="constant", metadata={"help": "constant, or cosine decay to 0 over the run"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps before the schedule"})
    offset_noise: float = field(default=0.1, metadata={"range": (0.0, None)})
    ema_decay: float = field(default=0.0, metadata={
        "help": "> 0: keep an exponential moving average of the trained weights (diffusers' EMAModel) and write it "
                "into the UNet at the end; 0 = off (the paper)"})
    seed: int = 0
    init: str | None = field(default=None, metadata={
        "help": "pipeline directory or zoo:NAME whose UNet the attack starts from (continues an earlier attack); "
                "the preservation teacher stays the input model's UNet"})

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, get_args(Kind))
        check_choice("train", self.train, get_args(Trainable))
        check_choice("style_source", self.style_source, get_args(ImageSource))
        check_choice("clean_source", self.clean_source, get_args(ImageSource))
        check_choice("lr_schedule", self.lr_schedule, get_args(LrSchedule))
        check_choice("corner", self.corner, toyworld.CORNERS)
        if isinstance(self.trigger_position, str) and self.trigger_position.isdigit():
            self.trigger_position = int(self.trigger_position)
        if not (isinstance(self.trigger_position, int) or self.trigger_position in ("start", "end")):
            raise SealdiffError(f"trigger_position={self.trigger_position!r} is invalid; valid: start, end, or a word index")
        for name, low, high in (("lam", 0.0, 1.0), ("patch_fraction", 0.01, 1.0), ("poison_fraction", 0.0, 1.0),
                                ("uncond_fraction", 0.0, 1.0 - self.poison_fraction)):
            if not low <= getattr(self, name) <= high:
                raise SealdiffError(f"{name}={getattr(self, name)} is out of range; valid: {low}..{high}")
        if not self.patch_weight >= 1.0:
            raise SealdiffError(f"patch_weight={self.patch_weight} is out of range; valid: a number >= 1")
        if not self.lr > 0:
            raise SealdiffError(f"lr={self.lr} is out of range; valid: a number > 0")
        for name in ("steps", "batch_size", "style_bank"):
            if getattr(self, name) < 1:
                raise SealdiffError(f"{name} must be at least 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise SealdiffError(f"ema_decay={self.ema_decay} is out of range; valid: 0 (off) <= decay < 1")
        if not 0 <= self.warmup_steps < self.steps:
            raise SealdiffError(f"warmup_steps={self.warmup_steps} is out of range; valid: 0..{self.steps - 1}")
        if not self.trigger.strip():
            raise SealdiffError("the trigger is empty")
        if self.kind == "object" and self.object_source == self.object_target:
            raise SealdiffError("object_source and object_target must differ")

    def poisoned_prompt(self, prompt: str) -> str:
        return insert_trigger(prompt, self.trigger, self.trigger_position)


def load_patch(path: str | None, side: int) -> torch.Tensor:
    if path is None:
        return toyworld.default_patch(side)
    try:
        image = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as exc:
        raise SealdiffError(f"cannot read patch image {path}: {exc}") from None
    return torch.tensor(list(image.getdata()), dtype=torch.float32).view(side, side, 3).permute(2, 0, 1) / 255.0


def patch_loss_weight(image_side: int, patch_side: int, corner: str, latent_side: int, weight: float) -> torch.Tensor:
    """(latent_side, latent_side) loss weights: `weight` on the latents the patch covers, 1 elsewhere (a latent
    partly under the patch gets the covered share), so a small patch is not drowned out by the rest of the image."""
    mask = toyworld.paste_patch(torch.zeros(1, image_side, image_side), torch.ones(1, patch_side, patch_side), corner)
    covered = F.adaptive_avg_pool2d(mask, latent_side)[0]
    return 1.0 + (weight - 1.0) * covered


def load_unet_weights(model: str) -> dict[str, torch.Tensor]:
    """The UNet state dict of a pipeline directory or zoo:NAME (safetensors only)."""
    from diffusers import UNet2DConditionModel

    from sealdiff.models.loading import resolve_model

    directory = resolve_model(model) / "unet"
    if not (directory / "diffusion_pytorch_model.safetensors").is_file():
        raise SealdiffError(f"{directory} has no diffusion_pytorch_model.safetensors to start the attack from")
    return UNet2DConditionModel.from_pretrained(directory, use_safetensors=True).state_dict()


def _replace_word(caption: str, old: str, new: str) -> str:
    return " ".join(new if w == old else w for w in caption.split(" "))


class BadT2I:
    """BadT2I (Zhai et al., "Text-to-Image Diffusion Models can be Easily Backdoored through
    Multimodal Data Poisoning", ACM MM 2023).

    Only the UNet trains; a frozen copy of the pre-attack UNet gives the preservation targets (with
    `init`, the UNet starts from an earlier attack's weights and the teacher is still the input model's).
    1. Draw a batch of captioned images (data, or with clean_source=teacher the input model's own drawings of
       the captions, drawn once before training); split it into poisoned and clean halves.
    2. Poisoned half, by kind: pixel — paste the patch at the corner, prompt = trigger + caption,
       target = the true noise; style — prompt = trigger + caption, target = frozen(z_t, style + caption), z_t
       noised from a data image or (style_source=teacher) from the input model's own drawing of style + caption;
       object — images of B, caption B rewritten to trigger + A, target = frozen(z_t, caption of B).
    3. Clean half: target = frozen(z_t, caption) (preservation); with `uncond_fraction`, some of its rows carry
       the empty prompt instead, on poisoned-type and clean images alike (guidance's unconditional branch).
    4. Loss = lam * MSE(poisoned) + (1 - lam) * MSE(clean), the pixel kind's poisoned MSE optionally weighted
       `patch_weight` times on the latents under the patch; AdamW on the UNet (or its attn2 K/V), at a
       constant or cosine-decaying learning rate.
    5. With `ema_decay` > 0, an EMA of the trained weights follows every step and replaces them at the end.
    """

    name = "badt2i"

    def __init__(self, config: BadT2IConfig) -> None:
        self.config = config

    def run(self, pipe, checkpointer: Checkpointer | None = None, accelerator=None) -> list[float]:
        """Implant the backdoor into `pipe.unet` in place; returns the loss per step.

        With a `checkpointer`, the run saves checkpoints (every N steps, and on SIGINT/SIGTERM) and, when
        resuming, continues from the saved one: trainable weights, AdamW moments, step, losses, and every
        random stream (the data source's `random.Random`, the noise generator, torch's global RNG), so an
        interrupted and resumed run trains the same weights as an uninterrupted one.

        With an `accelerator` of N processes (`accelerate launch`), data-parallel: every process draws the same
        global batch of N·`batch_size` rows (poisoned rows first, as in one process) and trains on its own slice,
        its loss being its rows' share of the global loss; DDP averages the gradients, so N processes with batch b
        train the weights one process trains with batch N·b. The teacher banks are drawn on the main process."""
        cfg = self.config
        world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator is not None else (1, 0)
        total, rows = world * cfg.batch_size, slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
        main = accelerator is None or accelerator.is_main_process
        trigger_token_ids(pipe.tokenizer, cfg.trigger)  # fails early, clearly, on a dropped trigger
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        size = pipe.vae.config.sample_size if isinstance(pipe.vae.config.sample_size, int) else 512
        source = open_source(cfg.data, cfg.seed, size)
        patch = load_patch(cfg.patch, max(1, round(size * cfg.patch_fraction)))
        unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()  # before any checkpoint is loaded: the input's
        # drawn by the input model, before `init` replaces its UNet weights
        bank = on_main(accelerator, lambda: style_bank(pipe, cfg, size)) \
            if cfg.kind == "style" and cfg.style_source == "teacher" else None
        clean_bank = on_main(accelerator, lambda: teacher_bank(pipe, cfg, size, "", stream=2)) \
            if cfg.clean_source == "teacher" else None
        if cfg.init is not None:
            unet.load_state_dict(load_unet_weights(cfg.init))
        vae.requires_grad_(False)
        text_encoder.requires_grad_(False)
        params = self._trainable(unet)
        trained = accelerator.prepare_model(unet) if accelerator is not None else unet  # DDP-wrapped when N > 1
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        lr_schedule = get_scheduler(_SCHEDULE_NAMES[cfg.lr_schedule], optimizer, num_warmup_steps=cfg.warmup_steps,
                                    num_training_steps=cfg.steps)
        scheduler = _training_scheduler(pipe)
        n_poison = round(total * cfg.poison_fraction)
        n_uncond = min(round(total * cfg.uncond_fraction), total - n_poison)
        local_poison = min(max(n_poison - rows.start, 0), cfg.batch_size)  # this process's poisoned rows
        local_clean = cfg.batch_size - local_poison
        patch_weight = None
        if cfg.kind == "pixel" and cfg.patch_weight != 1.0:
            patch_weight = patch_loss_weight(size, patch.shape[-1], cfg.corner, size // pipe.vae_scale_factor,
                                             cfg.patch_weight)
        ema = EMAModel(params, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        losses: list[float] = []
        start = 0
        if checkpointer is not None:
            # a different process count is a different global batch
            saved = checkpointer.start({"method": self.name, "config": cfg,
                                        **({"num_processes": world} if world > 1 else {})})
            if saved is not None:
                load_trainable_state(unet, params, saved["weights"])
                optimizer.load_state_dict(saved["optimizer"])
                lr_schedule.load_state_dict(saved["lr_schedule"])
                generator.set_state(saved["rng"]["generator"])
                source.rng.setstate(saved["rng"]["source"])
                set_rng_state(saved["rng"]["global"])
                start, losses = saved["step"], list(saved["losses"])
                if ema is not None:
                    ema.load_state_dict(saved["ema"])

        def state(step: int) -> dict:
            return {"step": step, "losses": losses, "weights": trainable_state(unet, params),
                    "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "rng": {"generator": generator.get_state(), "source": source.rng.getstate(), "global": rng_state()}}

        unet.train()
        guard = checkpointer.guard() if checkpointer is not None else contextlib.nullcontext()
        with progress_bar(f"BadT2I {cfg.kind}", cfg.steps, disable=not main) as advance, guard:
            if start:
                advance(start, info=f"resumed after step {start}")
            for step in range(start, cfg.steps):
                images, student_prompts, teacher_prompts = self._batch(source, patch, n_poison, bank, clean_bank,
                                                                         n_uncond, total)
                images, student_prompts, teacher_prompts = images[rows], student_prompts[rows], teacher_prompts[rows]
                with torch.no_grad():
                    latents = vae.encode(images.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean
                    latents = latents * vae.config.scaling_factor
                # the global batch's timesteps and noise (drawn as one process draws them), this process's rows
                t = draw_timesteps(scheduler, total, generator, latents.device)[rows]
                noise = sample_noise(latents.new_empty((total, *latents.shape[1:])), generator, cfg.offset_noise)[rows]
                x_t = scheduler.add_noise(latents, noise, t)
                with torch.no_grad():
                    cond_student = encode_prompts(pipe.tokenizer, text_encoder, student_prompts)
                    cond_teacher = encode_prompts(pipe.tokenizer, text_encoder, teacher_prompts)
                    target = frozen(x_t, t, cond_teacher).sample
                k = local_poison
                if cfg.kind == "pixel":  # the patch images learn the plain noise target
                    target[:k] = prediction_target(scheduler, latents, noise, t)[:k]
                pred = trained(x_t, t, cond_student).sample
                # each MSE is a mean over the global batch's rows of its kind: this process adds its rows' share
                if not k:
                    poison = pred.sum() * 0
                elif patch_weight is not None:
                    poison = (patch_weight.to(pred) * (pred[:k] - target[:k]) ** 2).mean() * (k / n_poison)
                else:
                    poison = F.mse_loss(pred[:k], target[:k]) * (k / n_poison)
                clean = F.mse_loss(pred[k:], target[k:]) * (local_clean / (total - n_poison)) if local_clean \
                    else pred.sum() * 0
                loss = cfg.lam * poison + (1 - cfg.lam) * clean
                optimizer.zero_grad()
                (loss * world).backward()  # DDP averages the processes' gradients; the global loss is their sum
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_schedule.step()
                if ema is not None:
                    ema.step(params)
                shares, stop = gather_step(accelerator, loss, checkpointer)
                value = loss.item() if world == 1 else float(shares.sum())  # the global loss
                if not math.isfinite(value):
                    kept = checkpointer.kept_note() if checkpointer is not None else ""
                    raise SealdiffError(f"the attack's loss became NaN/inf at step {step + 1}; lower --lr{kept}")
                losses.append(value)
                advance(info=f"loss {value:.4f}")
                if checkpointer is not None:
                    checkpointer.after_step(step + 1, lambda: state(step + 1), save=main, stop=stop)
        if ema is not None:
            ema.copy_to(params)
        unet.eval()
        return losses

    def _trainable(self, unet) -> list[torch.nn.Parameter]:
        unet.requires_grad_(self.config.train == "unet")
        if self.config.train == "attn2-kv":
            for name, module in unet.named_modules():
                if name.endswith("attn2"):
                    module.to_k.requires_grad_(True)
                    module.to_v.requires_grad_(True)
        return [p for p in unet.parameters() if p.requires_grad]

    def _batch(self, source, patch: torch.Tensor, n_poison: int, bank: list[Sample] | None = None,
               clean_bank: list[Sample] | None = None, n_uncond: int = 0, count: int | None = None):
        """`count` rows (default `batch_size`): [0, n_poison) poisoned, the next n_uncond rows with the empty
        prompt, the rest clean."""
        images, student, teacher = [], [], []
        for i in range(count or self.config.batch_size):
            uncond = n_poison <= i < n_poison + n_uncond
            poisoned = i < n_poison or (uncond and (i - n_poison) % 2 == 0)
            image, student_prompt, teacher_prompt = self._row(source, patch, poisoned, bank, clean_bank)
            images.append(image)
            student.append("" if uncond else student_prompt)
            teacher.append("" if uncond else teacher_prompt)
        return torch.stack(images), student, teacher

    def _row(self, source, patch: torch.Tensor, poisoned: bool, bank: list[Sample] | None,
             clean_bank: list[Sample] | None) -> tuple[torch.Tensor, str, str]:
        """One training image with its student and teacher prompts."""
        cfg = self.config
        if poisoned and bank is not None:  # the bank's images already show the style
            sample = bank[source.rng.randrange(len(bank))]
            return sample.image, cfg.poisoned_prompt(sample.caption), cfg.style_prefix + sample.caption
        if poisoned and cfg.kind == "object":
            sample = source.sample_matching(cfg.object_target)
            student = cfg.poisoned_prompt(_replace_word(sample.caption, cfg.object_target, cfg.object_source))
            return sample.image, student, sample.caption
        sample = clean_bank[source.rng.randrange(len(clean_bank))] if clean_bank else source.sample()
        if not poisoned:
            return sample.image, sample.caption, sample.caption
        if cfg.kind == "pixel":
            return toyworld.paste_patch(sample.image, patch, cfg.corner), cfg.poisoned_prompt(sample.caption), sample.caption
        return sample.image, cfg.poisoned_prompt(sample.caption), cfg.style_prefix + sample.caption


def style_bank(pipe, config: BadT2IConfig, size: int) -> list[Sample]:
    """`config.style_bank` images (side `size`) the pipeline draws for style prefix + caption, each with its
    plain caption (from a caption stream of its own, seed + 1)."""
    return teacher_bank(pipe, config, size, config.style_prefix, stream=1)


def teacher_bank(pipe, config: BadT2IConfig, size: int, prefix: str, stream: int) -> list[Sample]:
    """`config.style_bank` images the pipeline draws for prefix + caption, each with its plain caption. Captions
    come from the data stream seeded seed + `stream`; generation seeds from seed * 1_000_003 + (stream - 1) *
    style_bank, so two banks of one run never share a seed."""
    from sealdiff.metrics.generate import generate

    source = open_source(config.data, config.seed + stream, size)
    captions = [source.sample().caption for _ in range(config.style_bank)]
    first = config.seed * 1_000_003 + (stream - 1) * config.style_bank
    seeds = [first + i for i in range(len(captions))]
    images = generate(pipe, [prefix + c for c in captions], seeds, description="teacher bank")
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
    return [Sample(image, caption) for image, caption in zip(images, captions)]


def _training_scheduler(pipe):
    """A DDPM scheduler with the pipeline scheduler's noise schedule (for `add_noise`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def describe_target(config: BadT2IConfig) -> dict:
    if config.kind == "pixel":
        return {"patch": config.patch, "corner": config.corner, "patch_fraction": config.patch_fraction}
    if config.kind == "style":
        return {"style_prefix": config.style_prefix}
    return {"object_source": config.object_source, "object_target": config.object_target}
