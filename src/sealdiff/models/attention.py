"""Differentiable capture of cross-attention maps through diffusers attention processors.

`capture_cross_attention(unet)` installs a capturing processor on the `attn2` (cross-attention)
layers only, so self-attention keeps its fast path, and restores the previous processors on exit.
Each capture owns its own `AttentionStore`; maps stay in the autograd graph (an attention loss
trains the weights), and `store.pop()` hands back the maps of the latest forward and empties the
store, so teacher and student calls on the same UNet never mix.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F


class AttentionStore:
    """Maps of one UNet: layer name -> (batch, queries, tokens), averaged over heads."""

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}

    def record(self, layer: str, probs: torch.Tensor) -> None:
        # Overwrite, never append: a recomputation (gradient checkpointing) replaces a map instead of stacking.
        self.maps[layer] = probs

    def pop(self) -> dict[str, torch.Tensor]:
        maps, self.maps = self.maps, {}
        return maps


class CapturingAttnProcessor:
    """Computes attention like diffusers' `AttnProcessor` (explicit probabilities) and records them."""

    def __init__(self, store: AttentionStore, layer: str) -> None:
        self.store, self.layer = store, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, tokens = context.shape[0], context.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch*heads, queries, tokens)
        self.store.record(self.layer, probs.view(batch, attn.heads, *probs.shape[1:]).mean(dim=1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(unet) -> list[str]:
    """Processor names of every cross-attention layer (`...attn2.processor`)."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


@contextlib.contextmanager
def capture_cross_attention(unet, layers: Sequence[str] | None = None) -> Iterator[AttentionStore]:
    """Install capturing processors on `layers` (default: every `attn2`), restore the old ones on exit."""
    original = dict(unet.attn_processors)
    chosen = set(layers) if layers is not None else set(cross_attention_layers(unet))
    unknown = chosen - set(original)
    if unknown:
        raise ValueError(f"unknown attention layers {sorted(unknown)}; valid: {cross_attention_layers(unet)}")
    store = AttentionStore()
    unet.set_attn_processor({name: CapturingAttnProcessor(store, name) if name in chosen else proc
                             for name, proc in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


def token_maps(maps: dict[str, torch.Tensor], resolution: int | None = None) -> torch.Tensor:
    """Stack per-layer maps (B, Q, K) into (layers, B, K, r, r), resized to `resolution` (default: the largest)."""
    sides = {name: math.isqrt(m.shape[1]) for name, m in maps.items()}
    size = resolution or max(sides.values())
    out = []
    for name, m in maps.items():
        side = sides[name]
        grid = m.transpose(1, 2).reshape(m.shape[0], m.shape[2], side, side)
        if side != size:
            grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
        out.append(grid)
    return torch.stack(out)
