"""Unconditional diffusion models: DDPM (pixel space, ε-prediction), NCSN / score-SDE (VE, score), and
latent DDPM (LDM: ε-prediction on the latents of an `AutoencoderKL` or a `VQModel`).

All three are stock diffusers components saved in stock pipeline layouts, so `DiffusionPipeline.from_pretrained`
loads every directory sealdiff writes:

| kind | `model_index.json` class | folders | data range the UNet models |
|---|---|---|---|
| ddpm | `DDPMPipeline` | unet/ (UNet2DModel), scheduler/ (DDPMScheduler) | x0 in [-1, 1] |
| ncsn | `ScoreSdeVePipeline` | unet/ (UNet2DModel, Fourier time embedding of σ), scheduler/ (ScoreSdeVeScheduler) | x0 in [0, 1] (the stock pipeline clamps to [0, 1]) |
| ldm | `LDMPipeline` | unet/ (UNet2DModel on latents), vqvae/ (AutoencoderKL or VQModel), scheduler/ (DDPMScheduler) | latents · `scaling_factor`; decoded images in [-1, 1] |

The LDM's autoencoder lives in `vqvae/` because that is the component name `LDMPipeline` (the stock
unconditional latent pipeline) expects; `LDMPipeline` only calls `decode(latents / scaling_factor).sample`,
which both an `AutoencoderKL` (sealdiff's zoo) and a `VQModel` (the published unconditional LDMs, e.g. CompVis'
CelebA-HQ one) provide; a `VQModel` quantizes in `decode`, as in the stock pipeline, and `encode` returns its
latents before quantization (a KL autoencoder: the posterior mean). `load_uncond` also accepts a `vae` component
name.

Sampling (`sample`) is a thin loop of sealdiff's own around a stock scheduler created with `from_config`; it
starts from the noise it is given (the caller may have stamped a trigger into it), never from a pipeline's
own draw. Every sampler returns images in [-1, 1] of shape (B, 3, H, W) whatever the kind.

Devices: the modules may live on any device and in any float dtype (`UncondModel.to`). sealdiff's own tensors
(noise, triggers, image banks, the losses' arithmetic) stay where the caller made them -- the seeded generators
draw on the CPU, so a seed gives the same draws on every device -- and cross to the modules' device and dtype at
each UNet or autoencoder call (`unet_output`, `UncondModel.encode` / `decode`, `sample`), whose results come
back on the input's device and in its dtype.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import torch

from sealdiff.errors import SealdiffError
from sealdiff.models.loading import (_library_error, _one_line, check_finite, check_weights, read_model_index,
                                     resolve_model)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, SchedulerMixin, UNet2DModel, VQModel

logger = logging.getLogger(__name__)

ModelKind = Literal["ddpm", "ncsn", "ldm"]
Autoencoder = Literal["kl", "vq"]
AUTOENCODER_CLASSES = ("AutoencoderKL", "VQModel")  # the LDM autoencoders `load_uncond` accepts
Sampler = Literal["ddpm", "ddim", "dpm-solver++", "unipc", "euler", "heun", "sde-ve", "sde-ve-predictor"]

# samplers that apply to each kind (ε-prediction models take every VP sampler; the VE score model its SDE)
SAMPLERS: dict[str, tuple[str, ...]] = {
    "ddpm": ("ddpm", "ddim", "dpm-solver++", "unipc", "euler", "heun"),
    "ldm": ("ddpm", "ddim", "dpm-solver++", "unipc", "euler", "heun"),
    "ncsn": ("sde-ve", "sde-ve-predictor"),
}
# VE samplers: the stock predictor-corrector (reverse-diffusion predictor + Langevin corrector, as configured), and
# the predictor alone (the reverse SDE itself; the corrector treats the model's output as the exact score)
VE_SAMPLERS = ("sde-ve", "sde-ve-predictor")
# samplers that are deterministic given x_T (ODE solvers)
ODE_SAMPLERS = ("ddim", "dpm-solver++", "unipc", "euler", "heun")
PIPELINE_CLASS = {"ddpm": "DDPMPipeline", "ncsn": "ScoreSdeVePipeline", "ldm": "LDMPipeline"}
KIND_OF_PIPELINE = {"DDPMPipeline": "ddpm", "DDIMPipeline": "ddpm", "ScoreSdeVePipeline": "ncsn",
                    "LDMPipeline": "ldm"}
VAE_NAMES = ("vqvae", "vae")
DEFAULT_SIGMA_MAX = 20.0  # VE prior scale for 16x16x3 images in [0, 1] (about the largest distance between toy images)
DEFAULT_SIGMA_MIN = 0.01


@dataclass
class UncondModel:
    """An unconditional diffusion model as torch modules.

    `unet` predicts ε (ddpm, ldm) or, for ncsn, the score (`UNet2DModel` with a Fourier embedding of σ
    divides its output by σ). `scheduler` is the training schedule: `DDPMScheduler` (ddpm, ldm) or
    `ScoreSdeVeScheduler` (ncsn). `vae` is the LDM's autoencoder (None otherwise)."""

    unet: UNet2DModel
    scheduler: SchedulerMixin
    vae: AutoencoderKL | VQModel | None
    kind: ModelKind

    def __post_init__(self) -> None:
        if self.kind not in get_args(ModelKind):
            raise SealdiffError(f"kind={self.kind!r} is invalid; valid: {', '.join(get_args(ModelKind))}")
        if (self.kind == "ldm") != (self.vae is not None):
            raise SealdiffError("an ldm model needs a vae, and only an ldm model has one")

    @property
    def latent_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_size(self) -> int:
        """Side of the generated images (pixels)."""
        return self.latent_size * self.vae_factor

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the noise x_T: the image for ddpm/ncsn, the latent for ldm."""
        return (int(self.unet.config.in_channels), self.latent_size, self.latent_size)

    @property
    def sigma_max(self) -> float:
        """The VE prior's scale (ncsn); 1 for the VP kinds."""
        return float(self.scheduler.config.sigma_max) if self.kind == "ncsn" else 1.0

    @property
    def samplers(self) -> tuple[str, ...]:
        return SAMPLERS[self.kind]

    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are (every UNet call runs there)."""
        return placement(self.unet)[0]

    def to(self, device) -> UncondModel:
        self.unet.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def eval(self) -> UncondModel:
        self.unet.eval()
        if self.vae is not None:
            self.vae.eval()
        return self

    # ---- the model's data space <-> images in [-1, 1] -------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> the space the UNet diffuses (x0): [-1, 1] pixels (ddpm),
        [0, 1] pixels (ncsn), scaled VAE latent means (ldm)."""
        if self.kind == "ddpm":
            return images
        if self.kind == "ncsn":
            return (images + 1) / 2
        vae = self.vae
        encoded = vae.encode(images.to(*placement(vae)))
        posterior = getattr(encoded, "latent_dist", None)  # KL: a distribution; VQ: latents before quantization
        latents = posterior.mean if posterior is not None else encoded.latents
        return (latents * vae.config.scaling_factor).to(images.device, images.dtype)

    def decode(self, x0: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Inverse of `encode` (differentiable): images in [-1, 1], clamped unless `clamp=False` (which keeps the
        gradients of saturated pixels)."""
        if self.kind == "ddpm":
            images = x0
        elif self.kind == "ncsn":
            images = x0 * 2 - 1
        else:
            latents = x0.to(*placement(self.vae)) / self.vae.config.scaling_factor
            images = self.vae.decode(latents).sample.to(x0.device, x0.dtype)
        return images.clamp(-1, 1) if clamp else images


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a module's weights: where its calls run (a module without tensors: the CPU, float32)."""
    weight = next(itertools.chain(module.parameters(), module.buffers()), None)
    return (weight.device, weight.dtype) if weight is not None else (torch.device("cpu"), torch.float32)


def unet_output(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`unet(x, t).sample`, computed on the UNet's device and in its dtype, returned on x's device and in x's dtype
    (differentiable through both moves). `t`: integer timesteps or, for a VE model, the σ values."""
    device, dtype = placement(unet)
    t = t.to(device, dtype) if t.is_floating_point() else t.to(device)
    return unet(x.to(device, dtype), t).sample.to(x.device, x.dtype)


def _unet(kind: str, image_size: int, channels: tuple[int, ...], in_channels: int):
    from diffusers import UNet2DModel

    n = len(channels)
    groups = min(8, *channels)
    return UNet2DModel(
        sample_size=image_size, in_channels=in_channels, out_channels=in_channels, block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n, layers_per_block=1,
        norm_num_groups=groups, time_embedding_type="fourier" if kind == "ncsn" else "positional")


def ddpm_scheduler():
    """The VP training schedule of the ddpm/ldm kinds (linear betas, 1000 steps, trailing spacing so that a
    few-step sampler starts at t = T where the trigger was implanted)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                         prediction_type="epsilon", timestep_spacing="trailing", steps_offset=0, clip_sample=False)


def tiny_uncond(kind: ModelKind, image_size: int = 16, channels: tuple[int, ...] = (32, 64), seed: int = 0,
                sigma_max: float = DEFAULT_SIGMA_MAX, autoencoder: Autoencoder = "kl") -> UncondModel:
    """A small randomly initialised model of `kind`, built in code (no download); `image_size` in pixels;
    `autoencoder` (ldm): an `AutoencoderKL` ('kl', the zoo's) or a `VQModel` ('vq', the published LDMs')."""
    from diffusers import AutoencoderKL, ScoreSdeVeScheduler, VQModel

    if kind not in get_args(ModelKind):
        raise SealdiffError(f"kind={kind!r} is invalid; valid: {', '.join(get_args(ModelKind))}")
    if autoencoder not in get_args(Autoencoder):
        raise SealdiffError(f"autoencoder={autoencoder!r} is invalid; valid: {', '.join(get_args(Autoencoder))}")
    channels = tuple(int(c) for c in channels)
    if not channels or min(channels) < 1:
        raise SealdiffError(f"channels={channels!r} is invalid; valid: one or more positive widths")
    factor = 2 ** (len(channels) - 1)
    if image_size < 1 or image_size % factor:
        raise SealdiffError(f"image_size={image_size} is invalid; valid: positive multiples of {factor} "
                            f"for {len(channels)} UNet levels")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = None
        if kind == "ldm":
            shared = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                          latent_channels=4, norm_num_groups=8, sample_size=image_size, scaling_factor=1.0)
            vae = AutoencoderKL(**shared) if autoencoder == "kl" else VQModel(num_vq_embeddings=64, **shared)
            latent = image_size // 2
            if latent % factor:
                raise SealdiffError(f"image_size={image_size} is invalid for ldm; valid: multiples of {2 * factor}")
            unet = _unet(kind, latent, channels, 4)
        else:
            unet = _unet(kind, image_size, channels, 3)
    if kind == "ncsn":
        scheduler = ScoreSdeVeScheduler(num_train_timesteps=1000, sigma_min=DEFAULT_SIGMA_MIN, sigma_max=sigma_max,
                                        sampling_eps=1e-5, correct_steps=1, snr=0.15)
    else:
        scheduler = ddpm_scheduler()
    return UncondModel(unet=unet.eval(), scheduler=scheduler, vae=vae.eval() if vae is not None else None, kind=kind)


# --------------------------------------------------------------------------------------------------
# directories


def uncond_kind(directory: str | Path) -> ModelKind | None:
    """The kind of the unconditional pipeline directory, or None when it is another pipeline."""
    try:
        return KIND_OF_PIPELINE.get(read_model_index(Path(directory))["_class_name"])
    except SealdiffError:
        return None


def _entry(index: dict, name: str, path: Path, classes: tuple[str, ...]) -> str:
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        raise SealdiffError(f"{path}: component {name!r} must be [library, class], got {entry!r}")
    import diffusers

    library, cls = entry
    if classes:
        ok = library == "diffusers" and cls in classes
    else:
        scheduler = getattr(diffusers, cls, None) if cls.isidentifier() else None
        ok = library == "diffusers" and isinstance(scheduler, type) and issubclass(scheduler, diffusers.SchedulerMixin)
    if not ok:
        valid = " or ".join(f"['diffusers', {c!r}]" for c in classes) if classes else "a diffusers scheduler class"
        raise SealdiffError(f"{path}: component {name!r} is {entry!r}; valid: {valid}")
    return cls


def _load_component(folder: Path, cls_name: str, allow_pickle: bool):
    import diffusers

    cls = getattr(diffusers, cls_name)
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, use_safetensors=None if allow_pickle else True,
                                          output_loading_info=True, dtype=torch.float32)  # the zoo stores fp16
    except Exception as exc:  # an untrusted directory can make the library raise nearly anything
        raise _library_error(folder, exc) from None
    missing = sorted(map(str, info.get("missing_keys") or ()))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SealdiffError(f"{folder}: the checkpoint lacks the weights {missing[:3]}{more}")
    check_finite(model, folder)
    return model.eval()


def _load_scheduler(folder: Path, kind: str):
    from diffusers import DDPMScheduler, ScoreSdeVeScheduler

    config_file = folder / "scheduler_config.json"
    if not config_file.is_file():
        raise SealdiffError(f"{config_file} is missing")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not an object")
        cls = ScoreSdeVeScheduler if kind == "ncsn" else DDPMScheduler
        scheduler = cls.from_config(config)
    except Exception as exc:
        raise SealdiffError(f"{config_file} is not a valid scheduler config ({_one_line(exc)})") from None
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if kind != "ncsn" and prediction != "epsilon":
        # the stock samplers would convert, but the attacks', scans' and removals' own losses read ε
        raise SealdiffError(f"{config_file} has prediction_type {prediction!r}; the unconditional methods need an "
                            "ε-prediction model; valid: epsilon")
    return scheduler


def load_uncond(path: str | Path, allow_pickle: bool = False) -> UncondModel:
    """Load an unconditional pipeline directory (or `zoo:NAME`): DDPMPipeline / DDIMPipeline (ddpm),
    ScoreSdeVePipeline (ncsn), LDMPipeline (ldm). Safetensors only unless `allow_pickle` (then only pickles
    `torch.load(weights_only=True)` accepts as plain state dicts). The schedule is read from `scheduler/`:
    as a `DDPMScheduler` for ddpm/ldm (whatever scheduler class was saved), a `ScoreSdeVeScheduler` for ncsn."""
    directory = resolve_model(path)
    index = read_model_index(directory)
    cls_name = index["_class_name"]
    kind = KIND_OF_PIPELINE.get(cls_name)
    if kind is None:
        raise SealdiffError(f"{directory} holds a {cls_name}; valid unconditional pipelines: "
                            f"{', '.join(KIND_OF_PIPELINE)}")
    where = directory / "model_index.json"
    unet_cls = _entry(index, "unet", where, ("UNet2DModel",))
    _entry(index, "scheduler", where, ())
    vae_name, vae_cls = None, None
    if kind == "ldm":
        vae_name = next((n for n in VAE_NAMES if n in index), None)
        if vae_name is None:
            raise SealdiffError(f"{where}: an LDMPipeline needs a 'vqvae' (or 'vae') component")
        vae_cls = _entry(index, vae_name, where, AUTOENCODER_CLASSES)
    components = ("unet",) + ((vae_name,) if vae_name else ())
    for component in components + ("scheduler",):
        if not (directory / component).is_dir():
            raise SealdiffError(f"{directory} lacks the pipeline component {component}/")
    try:
        check_weights(directory, components, allow_pickle)
    except OSError as exc:
        raise SealdiffError(f"cannot read {exc.filename or directory}: {exc.strerror or exc}") from None
    unet = _load_component(directory / "unet", unet_cls, allow_pickle)
    vae = _load_component(directory / vae_name, vae_cls, allow_pickle) if vae_name else None
    scheduler = _load_scheduler(directory / "scheduler", kind)
    channels = vae.config.latent_channels if vae is not None else 3
    if unet.config.in_channels != channels or unet.config.out_channels != channels:
        raise SealdiffError(f"{directory}: the UNet maps {unet.config.in_channels} to {unet.config.out_channels} "
                            f"channels, but this {cls_name} needs {channels} -> {channels}")
    size = unet.config.get("sample_size")
    sides = [size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else []
    if not sides or len(sides) > 2 or len(set(sides)) != 1 or not all(isinstance(s, int) and s > 0 for s in sides):
        raise SealdiffError(f"{directory}: the UNet's sample_size is {size!r}; sealdiff samples square inputs of a "
                            "known size; valid: a positive integer (or two equal ones)")
    conditioning = ", ".join(f"{k} {unet.config.get(k)}" for k in ("class_embed_type", "num_class_embeds")
                             if unet.config.get(k) is not None)
    if conditioning:
        raise SealdiffError(f"{directory}: the UNet is class-conditional ({conditioning}); sealdiff calls it without "
                            "class labels; valid: an unconditional UNet2DModel")
    if kind == "ncsn" and unet.config.time_embedding_type != "fourier":
        logger.warning("%s: an NCSN UNet without a Fourier embedding of sigma; its outputs are read as scores",
                       directory)
    return UncondModel(unet=unet, scheduler=scheduler, vae=vae, kind=kind)


def save_uncond(model: UncondModel, path: str | Path) -> None:
    """Write `model` as a stock pipeline directory (see the module docstring); `path` may exist (empty)."""
    from diffusers import DDPMPipeline, LDMPipeline, ScoreSdeVePipeline

    path = Path(path)
    if model.kind == "ddpm":
        pipe = DDPMPipeline(unet=model.unet, scheduler=model.scheduler)
    elif model.kind == "ncsn":
        pipe = ScoreSdeVePipeline(unet=model.unet, scheduler=model.scheduler)
    else:
        pipe = LDMPipeline(vqvae=model.vae, unet=model.unet, scheduler=model.scheduler)
    try:
        pipe.save_pretrained(path, safe_serialization=True)
    except OSError as exc:
        raise SealdiffError(f"could not write {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------------------------------
# sampling


def check_sampler(kind: str, sampler: str) -> None:
    valid = SAMPLERS.get(kind, ())
    if sampler not in valid:
        raise SealdiffError(f"sampler={sampler!r} does not apply to a {kind} model; valid: {', '.join(valid)}")


def make_scheduler(model: UncondModel, sampler: Sampler):
    """A fresh stock scheduler for `sampler`, created with `from_config` of the model's schedule."""
    import diffusers

    check_sampler(model.kind, sampler)
    # `_use_default_values` would make from_config drop those keys, and the new class would use ITS defaults
    # (HeunDiscreteScheduler's betas are Stable Diffusion's, not the model's): pass every value explicitly
    config = {k: v for k, v in model.scheduler.config.items() if k != "_use_default_values"}
    if sampler in VE_SAMPLERS:
        predictor_only = {"correct_steps": 0} if sampler == "sde-ve-predictor" else {}
        return diffusers.ScoreSdeVeScheduler.from_config(config, **predictor_only)
    classes = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler,
               "dpm-solver++": diffusers.DPMSolverMultistepScheduler, "unipc": diffusers.UniPCMultistepScheduler,
               "euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler}
    extra = {"algorithm_type": "dpmsolver++"} if sampler == "dpm-solver++" else {}
    if model.kind == "ldm" or sampler in ("ddim", "ddpm"):
        extra["clip_sample"] = False  # latents are not in [-1, 1]; pixel outputs are clamped after decoding
    with _quiet_diffusers():
        return classes[sampler].from_config(config, **extra)


@contextlib.contextmanager
def _quiet_diffusers():
    """from_config warns about config keys another scheduler class does not use; they are expected here."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def sample_noise(model: UncondModel, batch: int, generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """x_T drawn from the prior: N(0, I) (ddpm, ldm), σ_max·N(0, I) (ncsn); shape (batch, *sample_shape)."""
    noise = torch.randn((batch, *model.sample_shape), generator=generator, device=device)
    return noise * model.sigma_max if model.kind == "ncsn" else noise


def _step_kwargs(scheduler, generator) -> dict:
    params = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in params and generator is not None else {}


@torch.no_grad()
def sample(model: UncondModel, noise: torch.Tensor, sampler: Sampler = "ddim", steps: int = 10,
           generator: torch.Generator | None = None, step_noise_scale: float = 1.0) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W), float32 on `noise`'s device, generated from the given x_T `noise` with
    `steps` sampler steps (run on the UNet's device).

    `noise` is x_T in the model's prior scale (unit variance for ddpm/ldm; σ_max for ncsn: the caller
    stamps the trigger into it). Stochastic samplers (ddpm, sde-ve*) draw their step noise from `generator`.
    Euler/Heun work in σ-space: x_T is multiplied by the scheduler's `init_noise_sigma` and the UNet's
    input goes through `scale_model_input`, exactly as their stock pipelines do.

    `step_noise_scale` scales the ddpm sampler's step noise: TrojDiff's trojan process, started from
    x_T ~ N(μ, γ²I), is denoised with γ·σ_t (the stock step's σ_t is 1/γ too much for it). That path runs the
    stock `DDIMScheduler` with eta = 1 -- the same ancestral step as `DDPMScheduler` -- and hands it the scaled
    noise as `variance_noise`."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SealdiffError(f"steps={steps!r} is invalid; valid: a positive integer")
    scheduler = make_scheduler(model, sampler)
    if tuple(noise.shape[1:]) != model.sample_shape or noise.dim() != 4:
        raise SealdiffError(f"noise has shape {tuple(noise.shape)}; this {model.kind} model needs "
                            f"(B, {', '.join(map(str, model.sample_shape))})")
    unet = model.unet
    device, dtype = placement(unet)
    x = noise.to(device, dtype)
    batch = x.shape[0]
    if sampler in VE_SAMPLERS:
        scheduler.set_timesteps(steps)
        scheduler.set_sigmas(steps)
        x_mean = x
        for i, t in enumerate(scheduler.timesteps):
            sigma = scheduler.sigmas[i] * torch.ones(batch, device=device)
            for _ in range(scheduler.config.correct_steps):
                score = unet(x, sigma).sample
                x = scheduler.step_correct(score, x, generator=generator).prev_sample
            out = scheduler.step_pred(unet(x, sigma).sample, t, x, generator=generator)
            x, x_mean = out.prev_sample, out.prev_sample_mean
        return model.decode(x_mean).to(noise.device, torch.float32)
    kwargs = _step_kwargs(scheduler, generator)
    if step_noise_scale != 1.0:
        if sampler != "ddpm":
            raise SealdiffError(f"step_noise_scale applies to the ddpm sampler only, not {sampler}")
        scheduler = make_scheduler(model, "ddim")
        kwargs = {"eta": 1.0}
    scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t).sample
        if step_noise_scale != 1.0:
            kwargs["variance_noise"] = step_noise_scale * torch.randn(x.shape, generator=generator).to(x)
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return model.decode(x).to(noise.device, torch.float32)


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (results are bit-identical only for the same thread count)."""
    if threads:
        torch.set_num_threads(int(threads))
