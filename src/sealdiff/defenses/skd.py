"""Trigger removal by self-knowledge distillation (SKD, SKD-CAG) and the Finetune Reversal baseline.

Seed paper: Vaithinathan Aravindan et al., "Sealing the Backdoor: Unlearning Adversarial Triggers in
Diffusion Models". The trigger is known, the training data is not: the backdoored UNet is its own
teacher. Given a clean prompt it produces clean images, so the student (the same weights, trained) is
taught to answer the *triggered* prompt the way the frozen teacher answers the *clean* one.

Lessons from the public reference code that this module is built against (see DESIGN.md section 4):
attention maps stay in the autograd graph; teacher and student maps come from separate stores, one
per forward; the student's capture stays installed through `backward` (so gradient checkpointing
recomputes with the same processors) and its store is emptied afterwards; trigger tokens are located
by span matching, any length; EMA weights are copied in only at the end; x_t is drawn by noising
teacher-generated (or real) latents with `scheduler.add_noise`, never pure noise at every t.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from sealdiff.config import check_choice, help_field
from sealdiff.data.triggers import aligned_columns, insert_trigger, locate_trigger, remove_trigger, trigger_token_ids
from sealdiff.errors import SealdiffError
from sealdiff.models.attention import AttentionStore, CapturingAttnProcessor, cross_attention_layers, token_maps
from sealdiff.training import (Checkpointer, encode_prompts, gather_step, load_trainable_state,
                               make_accelerator, prediction_target, progress_bar, rng_state, sample_noise,
                               set_rng_state, tokenize, trainable_state)

logger = logging.getLogger(__name__)

Method = Literal["skd", "skd-cag", "finetune-reversal"]
TriggerTarget = Literal["noise", "uniform", "zero", "random-word"]
Trainable = Literal["full", "attn2-kv", "lora"]
MixedPrecision = Literal["no", "fp16", "bf16"]
AttnColumns = Literal["prompt", "all"]
SaveFormat = Literal["merged", "lora"]

DEFAULT_RANDOM_WORDS = ("apple", "guitar", "river", "chair", "mountain", "bicycle", "lamp", "forest",
                        "window", "cloud", "bottle", "garden", "piano", "bridge", "candle", "harbor")
DEFAULT_LR = {"full": 1e-6, "attn2-kv": 1e-5, "lora": 1e-4}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LOSS_NAMES = ("losses", "pred_losses", "attn_losses", "retain_losses")  # RemovalResult's per-step histories


@dataclass
class SKDConfig:
    """Settings of one SKD / SKD-CAG / Finetune Reversal run (every field is recorded in sealdiff.json)."""

    trigger: str = help_field("the known trigger text, inserted as a separate word")
    method: Method = help_field("skd: prediction distillation; skd-cag: + cross-attention guidance; "
                           "finetune-reversal: eps-prediction on clean images with triggered prompts",
                           default="skd-cag")
    trigger_position: str | int = help_field("where the trigger goes: 'start', 'end' or a word index", default="start")
    alpha: float = help_field("SKD-CAG weight: L = alpha*L_attn + (1-alpha)*L_pred (paper best 0.5; 1 = attention only)",
                         default=0.5)
    target: TriggerTarget = help_field("what the trigger tokens' attention is matched to: noise (Gaussian around "
                                  "the map's mean), uniform (the map's mean everywhere), zero ('black image'), "
                                  "random-word (teacher maps of a random word in the trigger's place)",
                                  default="noise")
    noise_std: float = help_field("std of the `noise` target relative to the trigger map's spatial mean", default=1.0)
    random_words: tuple[str, ...] = help_field("words drawn for the random-word target", default=DEFAULT_RANDOM_WORDS)
    attn_layers: tuple[str, ...] | None = help_field("attn2 layers used by L_attn: processor names or prefixes "
                                                "(e.g. 'down_blocks.1', 'mid_block'); None = all", default=None)
    attn_resolution: int | None = help_field("resize every layer's maps to r x r before the loss; None = native size",
                                        default=None)
    attn_columns: AttnColumns = help_field("token columns in L_attn: prompt (BOS..EOS, as the paper) or all 77",
                                      default="prompt")
    normalize_tokens: bool = help_field("normalise each token map to sum 1 over positions (the zero target is "
                                   "compared unnormalised)", default=False)
    timestep_weighting: bool = help_field("weight L_attn by t/T per sample (paper appendix B.2)", default=False)
    trainable: Trainable = help_field("full UNet, attn2-kv (to_k/to_v of cross-attention only), or lora (peft)",
                                 default="full")
    lora_rank: int = help_field("LoRA rank", default=4)
    lora_alpha: float | None = help_field("LoRA alpha (None = rank)", default=None)
    lora_targets: tuple[str, ...] = help_field("module names LoRA adapts", default=LORA_TARGETS)
    steps: int = help_field("optimizer steps (paper: 75 epochs x 100 prompts, batch 1 = 7500)", default=1000)
    batch_size: int = help_field("prompts per step and process", default=1)
    lr: float | None = help_field("AdamW learning rate; None = 1e-6 full (paper), 1e-5 attn2-kv, 1e-4 lora",
                             default=None)
    weight_decay: float = help_field("AdamW weight decay", default=1e-2)
    max_grad_norm: float = help_field("gradient clipping norm (0 disables)", default=1.0)
    ema: bool = help_field("train with an EMA of the weights; the EMA is copied in only at the end", default=False)
    ema_decay: float = help_field("EMA decay", default=0.999)
    gradient_checkpointing: bool = help_field("trade compute for memory in the student UNet", default=False)
    mixed_precision: MixedPrecision = help_field("accelerate mixed precision", default="no")
    cpu: bool = help_field("force CPU even when an accelerator is present", default=False)
    retain_weight: float = help_field("weight of L_retain: the student on the clean and the empty prompt (the two "
                                      "branches guided sampling runs) matches the teacher on the same x_t; keeps "
                                      "clean behaviour at the cost of a 3x student batch; 0 = off (the paper)",
                                      default=0.0)
    seed: int = help_field("seed of the latent bank, noise, timesteps, shuffling and LoRA init", default=0)
    bank_steps: int = help_field("sampling steps used to generate the teacher's clean latent bank", default=20)
    bank_guidance: float = help_field("guidance scale of the latent bank", default=7.5)

    def __post_init__(self) -> None:
        if not isinstance(self.trigger, str) or not self.trigger.strip():
            raise SealdiffError("trigger is empty; give the known trigger text")
        check_choice("method", self.method, Method)
        check_choice("target", self.target, TriggerTarget)
        check_choice("trainable", self.trainable, Trainable)
        check_choice("mixed_precision", self.mixed_precision, MixedPrecision)
        check_choice("attn_columns", self.attn_columns, AttnColumns)
        if isinstance(self.trigger_position, str) and self.trigger_position.lstrip("-").isdigit():
            self.trigger_position = int(self.trigger_position)
        if not (self.trigger_position in ("start", "end") or
                (isinstance(self.trigger_position, int) and not isinstance(self.trigger_position, bool)
                 and self.trigger_position >= 0)):
            raise SealdiffError(f"trigger_position {self.trigger_position!r} is invalid; valid: start, end, "
                                "or a word index >= 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise SealdiffError(f"alpha {self.alpha} is invalid; valid: 0 <= alpha <= 1")
        self.random_words = tuple(self.random_words)
        self.lora_targets = tuple(self.lora_targets)
        if self.attn_layers is not None:
            self.attn_layers = (self.attn_layers,) if isinstance(self.attn_layers, str) else tuple(self.attn_layers)
            if not self.attn_layers:
                raise SealdiffError("attn_layers is empty; give layer names or prefixes, or None for all")
        if self.target == "random-word" and not [w for w in self.random_words if w.strip()]:
            raise SealdiffError("random_words is empty; the random-word target needs at least one word")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "lora_rank": self.lora_rank,
                    "bank_steps": self.bank_steps}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SealdiffError(f"{name} {value!r} is invalid; valid: an integer >= 1")
        if self.attn_resolution is not None and (not isinstance(self.attn_resolution, int) or self.attn_resolution < 1):
            raise SealdiffError(f"attn_resolution {self.attn_resolution!r} is invalid; valid: None or an integer >= 1")
        if self.lr is not None and not self.lr > 0:
            raise SealdiffError(f"lr {self.lr} is invalid; valid: a number > 0 (or None for the default)")
        if not 0.0 < self.ema_decay < 1.0:
            raise SealdiffError(f"ema_decay {self.ema_decay} is invalid; valid: 0 < decay < 1")
        if self.retain_weight and self.method == "finetune-reversal":
            raise SealdiffError("retain_weight needs a teacher; valid with method skd or skd-cag, not finetune-reversal")
        for name in ("noise_std", "weight_decay", "max_grad_norm", "retain_weight"):
            if getattr(self, name) < 0:
                raise SealdiffError(f"{name} {getattr(self, name)} is invalid; valid: a number >= 0")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise SealdiffError(f"lora_alpha {self.lora_alpha} is invalid; valid: a number > 0 (or None = rank)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.trainable]

    @property
    def uses_attention(self) -> bool:
        return self.method == "skd-cag" and self.alpha > 0

    @property
    def uses_prediction(self) -> bool:
        return self.method != "skd-cag" or self.alpha < 1

    @classmethod
    def fieldhelp_field(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


@dataclass
class RemovalResult:
    """What a removal run did: per-step losses (mean over processes), the config, and bookkeeping."""

    config: SKDConfig
    losses: list[float]
    pred_losses: list[float]
    attn_losses: list[float]
    retain_losses: list[float]
    trainable_parameters: int
    teacher: str
    seconds: float
    num_processes: int = 1  # data-parallel processes; the global batch is batch_size * num_processes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class StepOutput:
    """One distillation step's tensors (losses are differentiable before `backward`)."""

    loss: torch.Tensor
    pred_loss: torch.Tensor
    attn_loss: torch.Tensor
    retain_loss: torch.Tensor
    x_t: torch.Tensor
    timesteps: torch.Tensor
    student_maps: dict[str, torch.Tensor] | None = None
    teacher_maps: dict[str, torch.Tensor] | None = None


# --------------------------------------------------------------------------------------------------
# attention loss

def resolve_layers(unet, wanted: Sequence[str] | None) -> list[str]:
    """attn2 processor names matching `wanted` (full names or prefixes); all when None."""
    layers = cross_attention_layers(unet)
    if wanted is None:
        return layers
    chosen: list[str] = []
    for item in wanted:
        hits = [name for name in layers if name == item or name.startswith(item)]
        if not hits:
            raise SealdiffError(f"attention layer {item!r} matches no cross-attention layer; valid: {', '.join(layers)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def trigger_target(kind: str, student_trigger: torch.Tensor, *, noise_std: float = 1.0,
                   generator: torch.Generator | None = None, word_maps: torch.Tensor | None = None) -> torch.Tensor:
    """Target (n, r, r) for the trigger tokens' maps `student_trigger` (n, r, r); never differentiable.

    `uniform` and `noise` keep each map's spatial mean (its attention mass) and replace its spatial
    pattern by a constant or by Gaussian scatter; `zero` is the 'black image'; `random-word` uses the
    teacher's maps `word_maps` (m, r, r) of the word put in the trigger's place (one-to-one when m == n,
    else their mean for every trigger token).
    """
    level = student_trigger.detach().mean(dim=(-2, -1), keepdim=True)
    if kind == "zero":
        return torch.zeros_like(student_trigger)
    if kind == "uniform":
        return level.expand_as(student_trigger).clone()
    if kind == "noise":
        eps = torch.randn(student_trigger.shape, generator=generator, device=student_trigger.device,
                          dtype=student_trigger.dtype)
        return (level * (1.0 + noise_std * eps)).clamp_min(0.0)
    if kind == "random-word":
        if word_maps is None:
            raise ValueError("the random-word target needs the teacher's word maps")
        word_maps = word_maps.detach()
        if word_maps.shape[0] == student_trigger.shape[0]:
            return word_maps
        return word_maps.mean(dim=0, keepdim=True).expand_as(student_trigger).clone()
    raise SealdiffError(f"target {kind!r} is invalid; valid: {', '.join(get_args(TriggerTarget))}")


def attention_loss(student_maps: dict[str, torch.Tensor], teacher_maps: dict[str, torch.Tensor],
                   trigger_positions: Sequence[Sequence[int]], clean_lengths: Sequence[int], *, target: str,
                   resolution: int | None = None, normalize: bool = False, columns: str = "prompt",
                   noise_std: float = 1.0,
                   generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
                   word_maps: dict[str, torch.Tensor] | None = None,
                   word_positions: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Per-sample L_attn (B,): mean over layers and token maps of the squared error between the student's
    maps on the triggered prompt and the target maps.

    Non-trigger columns of the student are lined up with the teacher's clean-prompt columns via
    `aligned_columns` (the trigger shifts later tokens); trigger columns are matched to
    `trigger_target(target, ...)`. Maps are (B, queries, tokens) per layer; the student's must carry grad.
    `generator` (for the noise target) is one generator or one per sample (then a sample's draws do not
    depend on the rest of its batch).
    """
    batch = len(trigger_positions)
    generators = list(generator) if isinstance(generator, Sequence) else [generator] * batch
    first = next(iter(student_maps.values()))
    length, device = first.shape[-1], first.device
    # Column bookkeeping for the whole batch, built once for all layers. The loss is computed in the
    # student's column space: each student column gets a (non-differentiable) target -- the aligned teacher
    # column or the trigger target -- and a weight, so the gradient is elementwise (no index backward).
    source = torch.zeros((batch, length), dtype=torch.long)   # teacher column aligned with a student column
    aligned = torch.zeros((batch, length))                    # 1 where a student column is compared to one
    trig = torch.zeros((batch, length), dtype=torch.bool)     # trigger columns
    for b, positions in enumerate(trigger_positions):
        keep = aligned_columns(length, positions)
        count = len(keep) if columns == "all" else min(clean_lengths[b], len(keep))
        source[b, keep[:count]] = torch.arange(count)
        aligned[b, keep[:count]] = 1.0
        trig[b, list(positions)] = True
    used = int((aligned + trig.float()).sum(dim=0).nonzero().max()) + 1  # columns past this one carry no loss
    source, aligned, trig = source[:, :used].to(device), aligned[:, :used].to(device), trig[:, :used].to(device)
    weight = aligned + trig.float()
    trig_lists = [list(p) for p in trigger_positions]
    losses = []
    for layer, s_raw in student_maps.items():
        s_cols = _columns(s_raw, resolution)[:, :used].float()              # (B, used, cells)
        t_cols = _columns(teacher_maps[layer], resolution).float().detach()
        if normalize:
            s_norm, t_cols = _normalise_cols(s_cols), _normalise_cols(t_cols)
            s_cols = torch.where(trig[..., None], s_cols, s_norm) if target == "zero" else s_norm
        goal = t_cols.gather(1, source[..., None].expand(-1, -1, t_cols.shape[-1]))
        words = None
        if word_maps is not None:
            words = _columns(word_maps[layer], resolution).float().detach()  # all columns: words may lie past `used`
            words = _normalise_cols(words) if normalize else words
        goal = torch.where(trig[..., None], _trigger_goal(target, s_cols.detach(), trig_lists, noise_std, generators,
                                                          words, word_positions), goal)
        errors = (s_cols - goal).pow(2).sum(dim=-1)                          # (B, used)
        losses.append((errors * weight).sum(dim=1) / (weight.sum(dim=1) * s_cols.shape[-1]))
    return torch.stack(losses).mean(dim=0)


def _columns(maps: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """(B, queries, tokens) maps as (B, tokens, cells), resized to resolution x resolution when it differs."""
    side = math.isqrt(maps.shape[1])
    if resolution is None or resolution == side:
        return maps.transpose(1, 2)
    return token_maps({"": maps}, resolution)[0].flatten(2)


def _normalise_cols(cols: torch.Tensor) -> torch.Tensor:
    return cols / (cols.sum(dim=-1, keepdim=True) + 1e-8)


def _trigger_goal(kind: str, s_cols: torch.Tensor, trig_lists: Sequence[Sequence[int]], noise_std: float,
                  generators: Sequence[torch.Generator | None], words: torch.Tensor | None,
                  word_positions: Sequence[Sequence[int]] | None) -> torch.Tensor:
    """`trigger_target` for every column of a batch (B, L, cells) (only the trigger columns are used). The noise
    target draws each sample's (n_b, cells) noise from its own generator, exactly as a per-sample call would."""
    level = s_cols.mean(dim=-1, keepdim=True)
    if kind == "zero":
        return torch.zeros_like(s_cols)
    if kind == "uniform":
        return level.expand_as(s_cols)
    if kind == "noise":
        eps = torch.zeros_like(s_cols)
        for b, (g, positions) in enumerate(zip(generators, trig_lists)):
            eps[b, list(positions)] = torch.randn((len(positions), s_cols.shape[-1]), generator=g,
                                                  device=s_cols.device, dtype=s_cols.dtype)
        return (level * (1.0 + noise_std * eps)).clamp_min(0.0)
    if kind == "random-word":
        if words is None:
            raise ValueError("the random-word target needs the teacher's word maps")
        goal = torch.zeros_like(s_cols)
        for b, (positions, word_cols) in enumerate(zip(trig_lists, word_positions)):
            w = words[b, list(word_cols)]
            goal[b, list(positions)] = w if len(word_cols) == len(positions) else w.mean(dim=0, keepdim=True)
        return goal
    raise SealdiffError(f"target {kind!r} is invalid; valid: {', '.join(get_args(TriggerTarget))}")


def _attention_modules(unet, layers: Sequence[str]) -> dict[str, Any]:
    """The Attention modules behind processor names `...attn2.processor`, looked up once per run."""
    return {name: unet.get_submodule(name.removesuffix(".processor")) for name in layers}


@contextlib.contextmanager
def _capture(modules: dict[str, Any]) -> Iterator[AttentionStore]:
    """`capture_cross_attention` on modules found beforehand: sets and restores only their processors
    instead of walking the whole UNet twice per forward (~7 ms per forward on the zoo UNet)."""
    store = AttentionStore()
    previous = {name: module.processor for name, module in modules.items()}
    for name, module in modules.items():
        module.set_processor(CapturingAttnProcessor(store, name))
    try:
        yield store
    finally:
        for name, module in modules.items():
            module.set_processor(previous[name])


def _first(maps: dict[str, torch.Tensor] | None, count: int) -> dict[str, torch.Tensor] | None:
    """The maps of the first `count` samples of a batch (the rest belong to L_retain's prompts)."""
    return None if maps is None else {name: m[:count] for name, m in maps.items()}


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs, unlike `hash`)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --------------------------------------------------------------------------------------------------
# parameters, latents, saving

def select_trainable(unet, mode: str, config: SKDConfig | None = None) -> list[torch.nn.Parameter]:
    """Set requires_grad for `mode` and return the trainable parameters (for lora, adds a peft adapter)."""
    check_choice("trainable", mode, Trainable)
    if mode == "lora":
        from peft import LoraConfig

        config = config or SKDConfig(trigger="unused", trainable="lora")
        if has_lora(unet):
            raise SealdiffError("this UNet already carries a LoRA adapter; save it merged and train on that instead")
        unet.requires_grad_(False)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                          init_lora_weights="gaussian", target_modules=list(config.lora_targets))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            unet.add_adapter(lora)
        params = [p for p in unet.parameters() if p.requires_grad]
    elif mode == "attn2-kv":
        unet.requires_grad_(False)
        params = []
        for name, p in unet.named_parameters():
            if ".attn2.to_k." in f".{name}" or ".attn2.to_v." in f".{name}":
                p.requires_grad_(True)
                params.append(p)
    else:
        unet.requires_grad_(True)
        params = list(unet.parameters())
    if not params:
        raise SealdiffError(f"trainable {mode!r} selects no parameters in this UNet")
    return params


def has_lora(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


@torch.no_grad()
def latent_bank(pipe, prompts: Sequence[str], *, steps: int = 20, guidance_scale: float = 7.5, seed: int = 0,
                chunk: int = 8) -> torch.Tensor:
    """Clean latents (N, C, h, w) generated by the (teacher) pipeline for `prompts`, in the UNet's latent space."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        out = []
        for start in range(0, len(prompts), chunk):
            part = list(prompts[start:start + chunk])
            shape = (len(part), pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
            init = torch.randn(shape, generator=generator).to(pipe.device, pipe.unet.dtype)
            out.append(pipe(part, num_inference_steps=steps, guidance_scale=guidance_scale, latents=init,
                            output_type="latent").images)
        return torch.cat(out)
    finally:
        pipe._progress_bar_config = config


@torch.no_grad()
def encode_images(pipe, images, *, seed: int = 0, chunk: int = 8) -> torch.Tensor:
    """VAE latents (scaled like the pipeline's) of images: a (N,3,H,W) tensor in [0,1] or a list of PIL images."""
    pixels = pipe.image_processor.preprocess(images).to(pipe.device, pipe.vae.dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for start in range(0, pixels.shape[0], chunk):
        dist = pipe.vae.encode(pixels[start:start + chunk]).latent_dist
        sample = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
        out.append((sample - shift) * pipe.vae.config.scaling_factor)
    return torch.cat(out)


def lora_state(unet) -> tuple[dict[str, torch.Tensor], dict]:
    """The UNet's LoRA weights in diffusers naming, and the adapter config as metadata."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if not has_lora(unet):
        raise SealdiffError("this UNet has no LoRA adapter to save; use the merged format")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return layers, unet.peft_config["default"].to_dict()


def merged_unet(unet):
    """A copy of `unet` with its LoRA merged into the base weights and the adapter removed (no-op copy without LoRA)."""
    merged = copy.deepcopy(unet)
    if has_lora(merged):
        merged.fuse_lora()
        merged.unload_lora()
    return merged


def save_removed(pipe, output: str | Path, *, format: SaveFormat = "merged", overwrite: bool = False,
                 run_info: dict | None = None, inputs: Sequence[str | Path] = ()) -> Path:
    """Write the cleaned model atomically: a full safetensors pipeline directory (`merged`, LoRA fused in,
    loadable with `from_pretrained`/`load_t2i`) or LoRA weights (`lora`, loadable with `pipe.load_lora_weights`).
    The in-memory pipeline is not modified; `output` may not overlap `inputs` (the model it came from)."""
    from sealdiff.io import atomic_output_dir, write_run_info

    check_choice("save format", format, SaveFormat)
    with atomic_output_dir(output, overwrite, inputs) as staging:
        if format == "lora":
            layers, metadata = lora_state(pipe.unet)
            type(pipe).save_lora_weights(staging, unet_lora_layers=layers, safe_serialization=True,
                                         unet_lora_adapter_metadata=metadata)
        else:
            components = dict(pipe.components)
            components["unet"] = merged_unet(pipe.unet)
            type(pipe)(**components).save_pretrained(staging, safe_serialization=True)
        write_run_info(staging, format=format, **(run_info or {}))
    logger.info("wrote %s model to %s", format, output)
    return Path(output)


# --------------------------------------------------------------------------------------------------
# the method

class SelfKnowledgeDistillation:
    """SKD, SKD-CAG and Finetune Reversal from "Sealing the Backdoor" (Vaithinathan Aravindan et al.).

    Algorithm (per optimizer step, batch of clean prompts p with triggered versions trig+p):

    1. Draw x_t = scheduler.add_noise(z_0, eps, t) with t ~ U[0, T) and z_0 from a latent bank: latents the
       frozen teacher generated once for the clean prompts (or VAE latents of real images when given).
    2. Teacher (the backdoored UNet, frozen: a deep copy for `full`/`attn2-kv`; for `lora` the same UNet
       with its adapter disabled) predicts eps_T = UNet(x_t, t, E(p)) under its own attention capture.
       For the `random-word` target it also runs on the prompt with a random word in the trigger's place.
    3. The student predicts eps_S = UNet(x_t, t, E(trig+p)) with its cross-attention maps captured
       (differentiable) in a separate store.
    4. Loss:
       - skd: L_pred = MSE(eps_S, eps_T);
       - skd-cag: L = alpha*L_attn + (1-alpha)*L_pred, where L_attn is the MSE between the student's maps
         and the teacher's maps aligned past the trigger (`aligned_columns`), the trigger tokens' maps being
         matched to the target (noise / uniform / zero / random-word), optionally weighted by t/T;
       - finetune-reversal: L = MSE(eps_S, eps) on real clean images (needs images + captions);
       - with retain_weight w > 0, + w * MSE(UNet(x_t, t, E(q)), teacher(x_t, t, E(q))) for q the clean and the
         empty prompt, in the same student batch (an addition to the paper, against drift of clean samples).
    5. `accelerator.backward(L)` (the capture stays installed through backward, then its store is emptied),
       clip, AdamW step, optional EMA update of a shadow copy (copied into the weights only at the end).
    """

    def __init__(self, config: SKDConfig, accelerator=None) -> None:
        self.config = config
        self._accelerator = accelerator
        self.pipe = None
        self.student = None          # what the optimizer trains (possibly accelerate/DDP wrapped)
        self.unet = None             # the bare student UNet module
        self.teacher_unet = None     # frozen copy, or the student itself (lora: adapter disabled)
        self.teacher_mode = "none"
        self.layers: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.bank_source = "none"

    # -- setup --------------------------------------------------------------------------------------
    @property
    def accelerator(self):
        if self._accelerator is None:
            self._accelerator = make_accelerator(self.config.cpu, self.config.mixed_precision)
        return self._accelerator

    def _prepare_prompts(self, prompts: Sequence[str]) -> None:
        cfg, tokenizer = self.config, self.pipe.tokenizer
        if not prompts:
            raise SealdiffError("no prompts given; removal needs clean prompts (captions) to distill on")
        self.clean = [remove_trigger(p, cfg.trigger).strip() for p in prompts]
        self.triggered = [insert_trigger(p, cfg.trigger, cfg.trigger_position) for p in self.clean]
        self.positions = [locate_trigger(tokenizer, p, cfg.trigger) for p in self.triggered]
        clean_ids = [tokenizer(p, truncation=True, max_length=tokenizer.model_max_length).input_ids for p in self.clean]
        self.clean_lengths = [len(ids) for ids in clean_ids]
        length = tokenizer.model_max_length
        padded_clean = tokenize(tokenizer, self.clean)
        padded_trig = tokenize(tokenizer, self.triggered)
        for i, positions in enumerate(self.positions):
            keep = aligned_columns(length, positions)
            if not torch.equal(padded_trig[i, keep], padded_clean[i, :len(keep)]):
                raise SealdiffError(f"removing the trigger's tokens from {self.triggered[i]!r} does not give the tokens "
                                    f"of {self.clean[i]!r}; the tokenizer merges the trigger with its neighbours")
        with torch.no_grad():
            encoder = self.pipe.text_encoder
            self.clean_emb = encode_prompts(tokenizer, encoder, self.clean).detach()
            self.trig_emb = encode_prompts(tokenizer, encoder, self.triggered).detach()
            self.empty_emb = encode_prompts(tokenizer, encoder, [""]).detach()

    def setup(self, pipe, prompts: Sequence[str], images=None, bank: torch.Tensor | None = None) -> None:
        """Encode prompts, build the latent bank, choose trainable weights and the teacher, prepare with Accelerate."""
        cfg, acc = self.config, self.accelerator
        self.pipe = pipe
        pipe.to(acc.device)
        if cfg.method == "finetune-reversal" and images is None and bank is None:
            raise SealdiffError("finetune-reversal needs clean images with their captions (it fine-tunes on them "
                                "with triggered prompts); use skd or skd-cag when no images are available")
        self._prepare_prompts(prompts)
        pipe.text_encoder.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        self.bank_source = "given" if bank is not None else "images" if images is not None else "teacher"
        if bank is None:
            if images is not None:
                if len(images) != len(self.clean):
                    raise SealdiffError(f"got {len(images)} images for {len(self.clean)} captions; give one caption per image")
                bank = encode_images(pipe, images, seed=cfg.seed)
            else:
                logger.info("generating a bank of %d clean teacher latents (%d steps)", len(self.clean), cfg.bank_steps)
                bank = latent_bank(pipe, self.clean, steps=cfg.bank_steps, guidance_scale=cfg.bank_guidance,
                                   seed=cfg.seed)
        if bank.shape[0] != len(self.clean):
            raise SealdiffError(f"latent bank has {bank.shape[0]} latents for {len(self.clean)} prompts")
        self.bank = bank.detach().to(acc.device, torch.float32)

        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        unet = pipe.unet
        self.layers = resolve_layers(unet, cfg.attn_layers) if cfg.uses_attention else []
        needs_teacher = cfg.method != "finetune-reversal"
        if needs_teacher and cfg.trainable != "lora":
            self.teacher_unet = copy.deepcopy(unet).requires_grad_(False).eval()
            self.teacher_mode = "frozen-copy"
        self.params = select_trainable(unet, cfg.trainable, cfg)
        if needs_teacher and cfg.trainable == "lora":
            self.teacher_unet, self.teacher_mode = unet, "adapter-disabled"
        if unet.dtype != torch.float32:
            from diffusers.training_utils import cast_training_params

            cast_training_params(unet, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.unet = unet
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        loader_gen = torch.Generator().manual_seed(cfg.seed)
        loader = torch.utils.data.DataLoader(list(range(len(self.clean))), batch_size=cfg.batch_size, shuffle=True,
                                             generator=loader_gen)
        self.student, self.optimizer, self.loader = acc.prepare(unet, self.optimizer, loader)
        self._student_attn = _attention_modules(unet, self.layers)
        self._teacher_attn = _attention_modules(self.teacher_unet, self.layers) if needs_teacher else {}
        self.draws = 0  # compute_step calls so far: with the global batch position, seeds the per-sample randomness
        self.ema = None
        if cfg.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=cfg.ema_decay)

    # -- one step -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _teacher_mode(self) -> Iterator[Any]:
        if self.teacher_mode == "adapter-disabled":
            self.unet.disable_adapters()
            try:
                yield self.unet
            finally:
                self.unet.enable_adapters()
        else:
            yield self.teacher_unet

    @torch.no_grad()
    def _teacher(self, x_t, t, emb, capture: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Teacher prediction and (own store, popped right after the forward) its cross-attention maps."""
        with self._teacher_mode() as teacher, self.accelerator.autocast():
            if not capture:
                return teacher(x_t, t, encoder_hidden_states=emb).sample.float(), None
            with _capture(self._teacher_attn) as store:
                pred = teacher(x_t, t, encoder_hidden_states=emb).sample.float()
                maps = store.pop()
        self._check_maps(maps, "teacher")
        return pred, maps

    def _check_maps(self, maps: dict[str, torch.Tensor], who: str) -> None:
        missing = [name for name in self.layers if name not in maps]
        if missing:
            raise RuntimeError(f"the {who} forward recorded no cross-attention maps for {missing}")

    def _sample_seeds(self, count: int) -> list[int]:
        """One seed per sample of this process's batch, from (seed, step, position in the global batch).

        Timesteps, noise, noise targets and random words are drawn per sample from these, so a run on N
        processes with batch B sees exactly the samples of one process with batch N*B (Accelerate shards a
        global batch as process 0's B samples, then process 1's, ...), whatever the batch split.
        """
        step, self.draws = self.draws, self.draws + 1
        first = self.accelerator.process_index * count
        return [_mix_seed(self.config.seed, step, first + b) for b in range(count)]

    def _word_prompts(self, indices: Sequence[int], seeds: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        tokenizer, cfg = self.pipe.tokenizer, self.config
        prompts, positions = [], []
        for i, seed in zip(indices, seeds):
            word = random.Random(seed).choice([w for w in cfg.random_words if w.strip()])
            prompts.append(insert_trigger(self.clean[i], word, cfg.trigger_position))
            start = self.positions[i][0]
            positions.append(list(range(start, min(start + len(trigger_token_ids(tokenizer, word)),
                                                   tokenizer.model_max_length))))
        return prompts, positions

    def compute_step(self, indices: torch.Tensor | Sequence[int], backward: bool = True,
                     keep_maps: bool = False) -> StepOutput:
        """Losses of one step for the prompts at `indices`; with `backward`, also the gradients.

        The student's capture is installed for the forward *and* the backward (so gradient checkpointing
        recomputes through the same processors) and its store is emptied afterwards.
        """
        cfg, acc = self.config, self.accelerator
        idx = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        device = acc.device
        z0 = self.bank[idx]
        seeds = self._sample_seeds(len(idx))
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        x_t, noise, t = self._noisy(z0, generators)
        batch = len(idx)
        trig_emb, clean_emb = self.trig_emb[idx].to(device), self.clean_emb[idx].to(device)
        # L_retain rides along in the same forwards: teacher on [clean; empty], student on [triggered; clean; empty]
        retain_embs = [clean_emb, self.empty_emb.to(device).expand_as(clean_emb)] if cfg.retain_weight else []
        zero = torch.zeros((), device=device)
        teacher_pred = teacher_maps = word_maps = word_positions = None
        if cfg.method != "finetune-reversal":
            teacher_emb = torch.cat(retain_embs) if retain_embs else clean_emb  # clean rows first either way
            copies = teacher_emb.shape[0] // batch
            teacher_all, teacher_maps = self._teacher(x_t.repeat(copies, 1, 1, 1), t.repeat(copies), teacher_emb,
                                                      cfg.uses_attention)
            teacher_pred, teacher_maps = teacher_all[:batch], _first(teacher_maps, batch)
            if cfg.uses_attention and cfg.target == "random-word":
                prompts, word_positions = self._word_prompts(idx, seeds)
                with torch.no_grad():
                    word_emb = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts)
                _, word_maps = self._teacher(x_t, t, word_emb, True)
        capture = _capture(self._student_attn) if cfg.uses_attention else contextlib.nullcontext(None)
        with capture as store:
            student_emb = torch.cat([trig_emb, *retain_embs])
            copies = student_emb.shape[0] // batch
            with acc.autocast():
                pred_all = self.student(x_t.repeat(copies, 1, 1, 1), t.repeat(copies),
                                        encoder_hidden_states=student_emb).sample.float()
            pred = pred_all[:batch]
            student_maps = _first(store.pop(), batch) if store is not None else None
            if student_maps is not None:
                self._check_maps(student_maps, "student")
            if cfg.method == "finetune-reversal":
                pred_loss = F.mse_loss(pred, prediction_target(self.noise_scheduler, z0, noise, t))
            else:
                pred_loss = F.mse_loss(pred, teacher_pred)
            attn_loss = zero
            if cfg.uses_attention:
                per_sample = attention_loss(
                    student_maps, teacher_maps, [self.positions[i] for i in idx], [self.clean_lengths[i] for i in idx],
                    target=cfg.target, resolution=cfg.attn_resolution, normalize=cfg.normalize_tokens,
                    columns=cfg.attn_columns, noise_std=cfg.noise_std, generator=generators,
                    word_maps=word_maps, word_positions=word_positions)
                if cfg.timestep_weighting:
                    per_sample = per_sample * t.float() / self.noise_scheduler.config.num_train_timesteps
                attn_loss = per_sample.mean()
            if cfg.method == "skd-cag":
                loss = cfg.alpha * attn_loss + (1.0 - cfg.alpha) * pred_loss
            else:
                loss = pred_loss
            retain_loss = F.mse_loss(pred_all[batch:], teacher_all) if retain_embs else zero
            loss = loss + cfg.retain_weight * retain_loss
            if backward:
                acc.backward(loss)
            if store is not None:
                store.pop()  # drop maps that a checkpoint recomputation recorded during backward
        return StepOutput(loss=loss, pred_loss=pred_loss, attn_loss=attn_loss, retain_loss=retain_loss, x_t=x_t,
                          timesteps=t, student_maps=student_maps if keep_maps else None,
                          teacher_maps=teacher_maps if keep_maps else None)

    def _noisy(self, z0: torch.Tensor, generators: Sequence[torch.Generator]):
        """(x_t, noise, t) like `noisy_latents`, each sample's t and noise drawn from its own generator."""
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.cat([torch.randint(0, steps, (1,), generator=g, device=z0.device) for g in generators])
        noise = torch.cat([sample_noise(z0[b:b + 1], g) for b, g in enumerate(generators)])
        return self.noise_scheduler.add_noise(z0, noise, t), noise, t

    # -- training -----------------------------------------------------------------------------------
    def _batches(self) -> Iterator[torch.Tensor]:
        while True:
            yield from self.loader

    def _fingerprint(self) -> dict:
        """What a checkpoint must agree on to be resumed: the resolved config, the prompts, the bank's origin
        and the number of processes."""
        prompts = json.dumps([self.clean, self.triggered], ensure_ascii=False).encode()
        return {"method": self.config.method, "config": self.config, "num_processes": self.accelerator.num_processes,
                "prompts_sha256": hashlib.sha256(prompts).hexdigest(), "bank": self.bank_source}

    def _state(self, step: int, history: dict[str, list[float]], last_batch, seconds: float) -> dict:
        return {"step": step, "draws": self.draws, **history,
                "seconds": seconds, "last_batch": last_batch, "weights": trainable_state(self.unet, self.params),
                "optimizer": self.optimizer.state_dict(), "bank": self.bank, "rng": rng_state(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def _restore(self, saved: dict, batches: Iterator[torch.Tensor]) -> int:
        """Load a checkpoint's state and fast-forward the (freshly seeded) data stream past its batches."""
        load_trainable_state(self.unet, self.params, saved["weights"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        self.draws = saved["draws"]
        if saved["bank"].shape != self.bank.shape:
            raise SealdiffError("the checkpoint's latent bank does not fit these prompts; delete it to start over")
        self.bank = saved["bank"].to(self.bank.device, self.bank.dtype)  # exactly the latents trained on so far
        set_rng_state(saved["rng"])
        batch = None
        for _ in range(saved["step"]):
            batch = next(batches)
        if self.accelerator.num_processes == 1 and batch is not None and batch.tolist() != saved["last_batch"]:
            raise SealdiffError("the data order differs from the checkpoint's (different torch version?); "
                                "delete the checkpoint to start over")
        return saved["step"]

    def train(self, show_progress: bool = True, checkpointer: Checkpointer | None = None,
              on_step: Callable[[int], bool] | None = None) -> RemovalResult:
        """Run the optimizer steps. With a `checkpointer`, save checkpoints (every N steps and on SIGINT/SIGTERM)
        and, when resuming, continue from the saved one: weights, AdamW moments, EMA shadow, losses, the
        per-sample randomness counter, the latent bank and the data order (the loader is fast-forwarded).
        `on_step(steps_done)` runs after every optimizer step; returning True stops training early."""
        cfg, acc = self.config, self.accelerator
        started = time.perf_counter()
        history: dict[str, list[float]] = {name: [] for name in LOSS_NAMES}
        batches = self._batches()
        start, earlier, last_batch = 0, 0.0, None
        if checkpointer is not None:
            saved = checkpointer.start(self._fingerprint())
            if saved is not None:
                start = self._restore(saved, batches)
                history = {name: list(saved[name]) for name in LOSS_NAMES}
                earlier, last_batch = float(saved["seconds"]), saved["last_batch"]
        logger.info("%s: %d steps, trainable %s (%d parameters), teacher %s, lr %g", cfg.method, cfg.steps,
                    cfg.trainable, sum(p.numel() for p in self.params), self.teacher_mode, cfg.learning_rate)
        guard = checkpointer.guard() if checkpointer is not None else contextlib.nullcontext()
        show = show_progress and acc.is_local_main_process
        with progress_bar(f"{cfg.method}", cfg.steps, disable=not show) as advance, guard:
            if start:
                advance(start, info=f"resumed after step {start}")
            for step in range(start, cfg.steps):
                indices = next(batches)
                out = self.compute_step(indices, backward=True)
                if cfg.max_grad_norm and acc.sync_gradients:
                    acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.step(self.params)  # updates the shadow copy only
                values = torch.stack([out.loss.detach(), out.pred_loss.detach(), out.attn_loss.detach(),
                                      out.retain_loss.detach()]).float()
                gathered, stop = gather_step(acc, values, checkpointer)
                values = gathered.mean(dim=0).tolist()
                if not all(math.isfinite(v) for v in values):
                    kept = checkpointer.kept_note() if checkpointer is not None else ""
                    raise SealdiffError(f"{cfg.method} diverged at step {step + 1} (loss {values[0]}); lower the "
                                        f"learning rate{kept}")
                for name, value in zip(LOSS_NAMES, values):
                    history[name].append(value)
                last_batch = indices.tolist() if torch.is_tensor(indices) else list(indices)
                advance(info=f"loss {values[0]:.4g}")
                if checkpointer is not None:
                    seconds = earlier + time.perf_counter() - started
                    checkpointer.after_step(step + 1, lambda: self._state(step + 1, history, last_batch, seconds),
                                            save=acc.is_main_process, stop=stop)
                if on_step is not None and on_step(step + 1):
                    break
        if self.ema is not None:
            self.ema.copy_to(self.params)
        acc.wait_for_everyone()
        acc.unwrap_model(self.student, keep_fp32_wrapper=False)
        self.unet.eval()
        if cfg.gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()
        self.unet.requires_grad_(False)
        return RemovalResult(config=cfg, **history,
                             trainable_parameters=sum(p.numel() for p in self.params), teacher=self.teacher_mode,
                             seconds=earlier + time.perf_counter() - started, num_processes=acc.num_processes)

    def apply(self, pipe, prompts: Sequence[str], images=None, bank: torch.Tensor | None = None,
              show_progress: bool = True, checkpointer: Checkpointer | None = None) -> RemovalResult:
        """Remove the trigger from `pipe` in place (its UNet is the student). `prompts` are clean captions
        (a trigger in them is removed first); `images` (N,3,H,W in [0,1] or PIL) give real latents instead
        of the teacher's latent bank, and are required by finetune-reversal; `bank` reuses a latent bank;
        `checkpointer` makes the run interruptible and resumable (see `train`)."""
        self.setup(pipe, prompts, images=images, bank=bank)
        result = self.train(show_progress=show_progress, checkpointer=checkpointer)
        self.teacher_unet = None if self.teacher_mode == "frozen-copy" else self.teacher_unet
        return result

    def save(self, pipe, output: str | Path, result: RemovalResult | None = None, format: SaveFormat | None = None,
             overwrite: bool = False, inputs: Sequence[str | Path] = (), **run_info) -> Path | None:
        """Save on the main process (LoRA weights by default for `lora`, else a merged pipeline directory)."""
        fmt = format or ("lora" if self.config.trainable == "lora" else "merged")
        path = None
        if self.accelerator.is_main_process:
            info = {"defense": self.config.method, "config": self.config, **run_info}
            if result is not None:
                info["result"] = {k: v for k, v in result.to_dict().items() if k != "config"}
            path = save_removed(pipe, output, format=fmt, overwrite=overwrite, run_info=info, inputs=inputs)
        self.accelerator.wait_for_everyone()
        return path
