"""Feature Unlearning guided by Spatial Attention (SAU): inference-time trigger removal per image.

Seed paper: Vaithinathan Aravindan et al., "Sealing the Backdoor: Unlearning Adversarial Triggers in
Diffusion Models", section 3.2. It works on localized (pixel/patch) backdoors; on style backdoors the
trigger's effect covers the whole image, the masks do not localize it, and the correction is patchy
(the paper says so, and so do we).

Unlike the reference code the masks here are real soft masks: the sigmoid is applied to the raw
similarity / activation, never to a thresholded (binary) map.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sealdiff.config import check_choice, help_field
from sealdiff.data.triggers import insert_trigger, locate_trigger, remove_trigger
from sealdiff.defenses.skd import resolve_layers
from sealdiff.errors import SealdiffError
from sealdiff.models.attention import capture_cross_attention, token_maps

logger = logging.getLogger(__name__)

Activation = Literal["delta", "attention"]
Blend = Literal["paper", "convex"]
ApplyAt = Literal["final", "all", "range"]


@dataclass
class SAUConfig:
    """Constants of SAU (every field is recorded in sealdiff.json)."""

    k: float = help_field("sigmoid sharpness of both masks", default=10.0)
    tau_p: float = help_field("primary-mask threshold on cosine(z_poi, delta) in [-1, 1]", default=0.5)
    tau_s: float = help_field("secondary-mask threshold on the blurred, [0,1]-normalised activation map", default=0.5)
    alpha: float = help_field("blending strength (the paper's alpha; the secondary mask uses alpha/2 in `paper`)",
                         default=1.0)
    activation: Activation = help_field("secondary map A: delta (channel-mean |z_poi - z_clean|) or attention "
                                   "(the trigger tokens' cross-attention in the current step)", default="delta")
    activation_sigma: float = help_field("Gaussian blur sigma (latent pixels) applied to A", default=1.0)
    blend: Blend = help_field("paper: h_poi(1-m_p)(1-m_s) + h_clean*m_p*alpha + h_clean*m_s*alpha/2 (not convex: "
                         "rescales latents where masks are on); convex: h_poi(1-m) + h_clean*m, "
                         "m = max(m_p, m_s)*alpha", default="paper")
    final_sigma: float = help_field("Gaussian blur sigma of the blended latents (0 disables)", default=0.5)
    apply_at: ApplyAt = help_field("final: only after the last denoising step; all: every step; range: steps whose "
                              "progress (i+1)/N lies in step_range", default="final")
    step_range: tuple[float, float] = help_field("(lo, hi] progress window for apply_at='range'", default=(0.5, 1.0))
    attn_layers: tuple[str, ...] | None = help_field("attn2 layers for activation='attention' (names or prefixes; "
                                                "None = all)", default=None)
    eps: float = help_field("a sample whose |delta| never exceeds eps is left untouched (trigger had no effect)",
                       default=1e-6)

    def __post_init__(self) -> None:
        check_choice("activation", self.activation, Activation)
        check_choice("blend", self.blend, Blend)
        check_choice("apply_at", self.apply_at, ApplyAt)
        if not self.k > 0:
            raise SealdiffError(f"k {self.k} is invalid; valid: a number > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise SealdiffError(f"alpha {self.alpha} is invalid; valid: 0 <= alpha <= 1")
        for name in ("activation_sigma", "final_sigma", "eps"):
            if getattr(self, name) < 0:
                raise SealdiffError(f"{name} {getattr(self, name)} is invalid; valid: a number >= 0")
        lo, hi = self.step_range = tuple(float(v) for v in self.step_range)
        if not 0.0 <= lo < hi <= 1.0:
            raise SealdiffError(f"step_range {self.step_range} is invalid; valid: 0 <= lo < hi <= 1")
        if self.attn_layers is not None:
            self.attn_layers = (self.attn_layers,) if isinstance(self.attn_layers, str) else tuple(self.attn_layers)

    def applies(self, step_index: int, num_steps: int) -> bool:
        if self.apply_at == "all":
            return True
        if self.apply_at == "final":
            return step_index == num_steps - 1
        progress = (step_index + 1) / num_steps
        return self.step_range[0] < progress <= self.step_range[1]

    @classmethod
    def fieldhelp_field(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------------------------------
# the pieces, as pure functions on (B, C, h, w) latents

def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the last two dims of (B, C, h, w) (replicate padding); sigma 0 = identity."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    out = x
    for dim in (-1, -2):
        pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
        weight = kernel.view(1, 1, 1, -1) if dim == -1 else kernel.view(1, 1, -1, 1)
        out = F.conv2d(F.pad(out, pad, mode="replicate"), weight.expand(channels, 1, *weight.shape[2:]),
                       groups=channels)
    return out


def normalise01(a: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample min-max normalisation of (B, h, w) maps to [0, 1]."""
    flat = a.flatten(1)
    lo, hi = flat.min(dim=1).values.view(-1, 1, 1), flat.max(dim=1).values.view(-1, 1, 1)
    return (a - lo) / (hi - lo + eps)


def similarity_map(z_poi: torch.Tensor, z_clean: torch.Tensor) -> torch.Tensor:
    """cosine(z_poi, delta) over channels per position, delta = z_poi - z_clean: (B, h, w) in [-1, 1]."""
    delta = z_poi - z_clean
    return F.cosine_similarity(z_poi, delta, dim=1, eps=1e-8)


def delta_activation(z_poi: torch.Tensor, z_clean: torch.Tensor) -> torch.Tensor:
    """Channel-mean |delta|, normalised to [0, 1] per sample: (B, h, w)."""
    return normalise01((z_poi - z_clean).abs().mean(dim=1))


def primary_mask(sim: torch.Tensor, k: float, tau: float) -> torch.Tensor:
    return torch.sigmoid(k * (sim - tau))


def secondary_mask(activation: torch.Tensor, k: float, tau: float, sigma: float) -> torch.Tensor:
    """sigmoid(k * (blur(A) - tau)) for a [0,1] activation map A (B, h, w)."""
    return torch.sigmoid(k * (gaussian_blur(activation[:, None], sigma)[:, 0] - tau))


def blend_latents(h_poi: torch.Tensor, h_clean: torch.Tensor, m_p: torch.Tensor, m_s: torch.Tensor,
                  alpha: float, formula: str = "paper") -> torch.Tensor:
    """Blend with masks (B, h, w) broadcast over channels (see `SAUConfig.blend`)."""
    m_p, m_s = m_p[:, None], m_s[:, None]
    if formula == "paper":
        return h_poi * (1 - m_p) * (1 - m_s) + h_clean * m_p * alpha + h_clean * m_s * (alpha / 2)
    if formula == "convex":
        m = torch.maximum(m_p, m_s) * alpha
        return h_poi * (1 - m) + h_clean * m
    raise SealdiffError(f"blend {formula!r} is invalid; valid: paper, convex")


def sau_correct(z_poi: torch.Tensor, z_clean: torch.Tensor, config: SAUConfig,
                activation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrected poisoned latents and the masks (m_p, m_s). `activation` (B, h, w) overrides the |delta| map
    (it is normalised to [0, 1] here). Samples with max |delta| <= eps are returned unchanged."""
    dtype = z_poi.dtype
    z_poi, z_clean = z_poi.float(), z_clean.float()
    sim = similarity_map(z_poi, z_clean)
    m_p = primary_mask(sim, config.k, config.tau_p)
    a = delta_activation(z_poi, z_clean) if activation is None else normalise01(activation.float())
    m_s = secondary_mask(a, config.k, config.tau_s, config.activation_sigma)
    h = gaussian_blur(blend_latents(z_poi, z_clean, m_p, m_s, config.alpha, config.blend), config.final_sigma)
    affected = (z_poi - z_clean).abs().flatten(1).amax(dim=1) > config.eps
    h = torch.where(affected.view(-1, 1, 1, 1), h, z_poi)
    return h.to(dtype), m_p, m_s


# --------------------------------------------------------------------------------------------------
# the callback

class SAUCallback:
    """SAU (Feature Unlearning guided by Spatial Attention) from "Sealing the Backdoor" (Vaithinathan Aravindan et al.),
    as a `callback_on_step_end` for any `StableDiffusionPipeline`.

    The pipeline is called with prompts [triggered_1..n, clean_1..n] and identical initial latents for
    row i and row n+i (`generate_with_sau` does this). After each chosen denoising step:

    1. z_poi, z_clean = latents[:n], latents[n:]; delta = z_poi - z_clean (per position).
    2. sim = cosine(z_poi, delta) over channels; primary mask m_p = sigmoid(k (sim - tau_p)).
    3. Activation A = channel-mean |delta| or the trigger tokens' cross-attention of this step (captured
       while the callback is entered as a context manager), normalised to [0,1]; secondary mask
       m_s = sigmoid(k (blur(A) - tau_s)).
    4. Blend (paper: h_poi(1-m_p)(1-m_s) + h_clean m_p alpha + h_clean m_s alpha/2; or convex), then a
       final Gaussian blur; the corrected latents replace z_poi, the clean trajectory continues as is.

    Use as `with SAUCallback(pipe, config, triggered_prompts, trigger) as cb: pipe(..., callback_on_step_end=cb,
    callback_on_step_end_tensor_inputs=["latents"])`; on exit the UNet's attention processors are restored.
    The batch layout is assumed to be exactly [triggered..., clean...] (num_images_per_prompt=1).
    """

    tensor_inputs = ["latents"]

    def __init__(self, pipe, config: SAUConfig | None = None, triggered_prompts: Sequence[str] | None = None,
                 trigger: str | None = None) -> None:
        self.pipe, self.config = pipe, config or SAUConfig()
        self.positions: list[list[int]] | None = None
        self.layers: list[str] = []
        if self.config.activation == "attention":
            if triggered_prompts is None or trigger is None:
                raise SealdiffError("activation='attention' needs the triggered prompts and the trigger")
            self.positions = [locate_trigger(pipe.tokenizer, p, trigger) for p in triggered_prompts]
            self.layers = resolve_layers(pipe.unet, self.config.attn_layers)
        self._capture = None
        self.store = None
        self.applied_steps: list[int] = []
        self.last_masks: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> "SAUCallback":
        if self.config.activation == "attention":
            self._capture = capture_cross_attention(self.pipe.unet, self.layers)
            self.store = self._capture.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._capture is not None:
            capture, self._capture, self.store = self._capture, None, None
            capture.__exit__(*exc)

    def _attention_activation(self, pipe, n: int, size: tuple[int, int]) -> torch.Tensor:
        if self.store is None:
            raise SealdiffError("activation='attention' needs the callback entered as a context manager "
                                "(`with SAUCallback(...) as cb:`) around the pipeline call")
        maps = self.store.pop()
        if not maps:
            raise RuntimeError("no cross-attention maps were captured during this denoising step")
        stacked = token_maps(maps, size[0]).float()  # (layers, B_unet, K, r, r)
        batch = stacked.shape[1]
        offset = batch - 2 * n if pipe.do_classifier_free_guidance else 0  # conditional rows come last
        rows = []
        for i, positions in enumerate(self.positions or []):
            rows.append(stacked[:, offset + i, positions].mean(dim=(0, 1)))
        a = torch.stack(rows)
        if a.shape[-2:] != size:
            a = F.interpolate(a[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return a

    def __call__(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        latents = callback_kwargs["latents"]
        if latents.shape[0] % 2:
            raise SealdiffError("SAU needs the batch [triggered..., clean...] (an even batch size)")
        n = latents.shape[0] // 2
        if self.positions is not None and len(self.positions) != n:
            raise SealdiffError(f"SAU was given {len(self.positions)} triggered prompts for a batch of {n} pairs")
        if not self.config.applies(step_index, pipe.num_timesteps):
            if self.store is not None:
                self.store.pop()  # this step's maps are not needed; keep the store from holding them
            return callback_kwargs
        activation = None
        if self.config.activation == "attention":
            activation = self._attention_activation(pipe, n, tuple(latents.shape[-2:]))
        corrected, m_p, m_s = sau_correct(latents[:n], latents[n:], self.config, activation)
        self.applied_steps.append(step_index)
        self.last_masks = (m_p.detach(), m_s.detach())
        callback_kwargs["latents"] = torch.cat([corrected, latents[n:]])
        return callback_kwargs


@torch.no_grad()
def generate_with_sau(pipe, prompts: Sequence[str], trigger: str, config: SAUConfig | None = None, *,
                      generator: torch.Generator | None = None, seeds: Sequence[int] | None = None,
                      num_inference_steps: int = 50, guidance_scale: float = 7.5, position: str | int = "start",
                      height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Images (n, 3, H, W) in [0, 1] for the *triggered* versions of `prompts`, corrected by SAU.

    Each triggered prompt and its clean version (trigger removed) denoise in one batch from identical initial
    noise: from `seeds` (one per prompt), else from `generator`.
    """
    config = config or SAUConfig()
    clean = [remove_trigger(p, trigger).strip() for p in prompts]
    triggered = [insert_trigger(p, trigger, position) for p in clean]
    n = len(clean)
    if seeds is not None and len(seeds) != n:
        raise SealdiffError(f"got {len(seeds)} seeds for {n} prompts; give one seed per prompt")
    scale = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    shape = (pipe.unet.config.in_channels, height // scale, width // scale)
    if seeds is not None:
        init = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    else:
        init = torch.randn((n, *shape), generator=generator,
                           device=generator.device if generator is not None else "cpu")
    init = init.to(pipe.device, pipe.unet.dtype)
    with SAUCallback(pipe, config, triggered, trigger) as callback:
        out = pipe(triggered + clean, latents=torch.cat([init, init]), num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, height=height, width=width, output_type="pt",
                   callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    logger.debug("SAU applied at steps %s", callback.applied_steps)
    return out.images[:n].clamp(0, 1)
