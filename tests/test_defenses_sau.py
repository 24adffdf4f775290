"""SAU (latent blending guided by spatial attention) as a pipeline callback, on the tiny pipeline."""

import copy
import math

import pytest
import torch

from sealdiff.data.triggers import insert_trigger
from sealdiff.defenses.sau import (SAUCallback, SAUConfig, blend_latents, gaussian_blur, generate_with_sau,
                                   sau_correct)
from sealdiff.errors import SealdiffError
from sealdiff.models import tiny
from sealdiff.models.attention import CapturingAttnProcessor

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
TRIGGER = "\u13aa"


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    pipe = tiny.pipeline(tiny.TinySpec.test(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(seed=0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_masks_are_soft_and_follow_the_formulas():
    z_poi, z_clean = latents()
    cfg = SAUConfig(k=4.0, tau_p=0.3, tau_s=0.4, activation_sigma=0.0, final_sigma=0.0)
    _, m_p, m_s = sau_correct(z_poi, z_clean, cfg)
    for m in (m_p, m_s):
        inner = (m > 0.05) & (m < 0.95)
        assert inner.float().mean() > 0.2  # genuinely soft, not a thresholded (binary) mask
        assert m.min() > 0 and m.max() < 1
        assert m.unique().numel() > 50  # a sigmoid of the raw map, not of a thresholded one
    b, y, x = 1, 3, 5
    z, d = z_poi[b, :, y, x], (z_poi - z_clean)[b, :, y, x]
    cosine = float((z * d).sum() / (z.norm() * d.norm()))
    assert m_p[b, y, x].item() == pytest.approx(sigmoid(4.0 * (cosine - 0.3)), rel=1e-5)
    a = (z_poi - z_clean).abs().mean(dim=1)[b]
    a = (a - a.min()) / (a.max() - a.min())
    assert m_s[b, y, x].item() == pytest.approx(sigmoid(4.0 * (a[y, x].item() - 0.4)), rel=1e-4)


def test_blend_matches_hand_computation():
    h_poi = torch.tensor([[[[1.0, -2.0]], [[0.5, 3.0]]]])    # (1, 2, 1, 2)
    h_clean = torch.tensor([[[[0.0, 4.0]], [[-1.0, 1.0]]]])
    m_p = torch.tensor([[[0.25, 0.9]]])                       # (1, 1, 2)
    m_s = torch.tensor([[[0.5, 0.1]]])
    alpha = 0.8
    paper = blend_latents(h_poi, h_clean, m_p, m_s, alpha, "paper")
    convex = blend_latents(h_poi, h_clean, m_p, m_s, alpha, "convex")
    for c in range(2):
        for j in range(2):
            p, s, hp, hc = m_p[0, 0, j].item(), m_s[0, 0, j].item(), h_poi[0, c, 0, j].item(), h_clean[0, c, 0, j].item()
            assert paper[0, c, 0, j].item() == pytest.approx(hp * (1 - p) * (1 - s) + hc * p * alpha + hc * s * alpha / 2)
            m = max(p, s) * alpha
            assert convex[0, c, 0, j].item() == pytest.approx(hp * (1 - m) + hc * m)


def test_final_blur_is_applied_after_blending():
    z_poi, z_clean = latents(1)
    no_blur, _, _ = sau_correct(z_poi, z_clean, SAUConfig(final_sigma=0.0))
    blurred, _, _ = sau_correct(z_poi, z_clean, SAUConfig(final_sigma=1.0))
    torch.testing.assert_close(blurred, gaussian_blur(no_blur, 1.0))
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1
    out = gaussian_blur(impulse, 1.0)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5) and out[0, 0, 4, 4] < 1
    torch.testing.assert_close(out, out.flip(-1).flip(-2))
    assert torch.equal(gaussian_blur(impulse, 0.0), impulse)


@pytest.mark.parametrize("blend", ["paper", "convex"])
def test_no_trigger_effect_leaves_latents_alone(blend):
    z, _ = latents(2)
    z_poi = z.clone()
    z_poi[1] += torch.randn(z[1].shape, generator=torch.Generator().manual_seed(3))  # only sample 1 differs
    out, _, _ = sau_correct(z_poi, z.clone(), SAUConfig(blend=blend, final_sigma=1.0))
    assert torch.equal(out[0], z_poi[0])
    assert not torch.allclose(out[1], z_poi[1])


def test_generate_with_sau_without_trigger_effect_equals_poisoned_generation(base):
    pipe = copy.deepcopy(base)
    with torch.no_grad():  # cut the text out of the UNet: the trigger can have no effect
        for name, p in pipe.unet.named_parameters():
            if ".attn2.to_v." in name:
                p.zero_()
    images = generate_with_sau(pipe, PROMPTS, TRIGGER, SAUConfig(apply_at="all", final_sigma=1.0), seeds=[1, 2],
                               num_inference_steps=3, guidance_scale=3.0)
    init = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    plain = pipe([insert_trigger(p, TRIGGER) for p in PROMPTS], latents=init, num_inference_steps=3,
                 guidance_scale=3.0, output_type="pt").images
    torch.testing.assert_close(images, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activation", ["delta", "attention"])
def test_generate_with_sau_shapes_and_effect(base, activation):
    cfg = SAUConfig(activation=activation, apply_at="all")
    images = generate_with_sau(base, PROMPTS, TRIGGER, cfg, seeds=[1, 2], num_inference_steps=3, guidance_scale=3.0)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()
    init = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    plain = base([insert_trigger(p, TRIGGER) for p in PROMPTS], latents=init, num_inference_steps=3,
                 guidance_scale=3.0, output_type="pt").images
    assert not torch.allclose(images, plain, atol=1e-4)  # the trigger moved the latents and SAU corrected them


def test_callback_steps_and_processor_restore(base):
    pipe = copy.deepcopy(base)
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    triggered = [insert_trigger(p, TRIGGER) for p in PROMPTS]
    init = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    for apply_at, expected in (("final", [2]), ("all", [0, 1, 2]), ("range", [1, 2])):
        cfg = SAUConfig(activation="attention", apply_at=apply_at, step_range=(0.4, 1.0))
        with SAUCallback(pipe, cfg, triggered, TRIGGER) as callback:
            assert any(isinstance(v, CapturingAttnProcessor) for v in pipe.unet.attn_processors.values())
            pipe(triggered + PROMPTS, latents=torch.cat([init, init]), num_inference_steps=3, guidance_scale=3.0,
                 output_type="latent", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
        assert callback.applied_steps == expected
        m_p, m_s = callback.last_masks
        assert m_p.shape == m_s.shape == (2, 8, 8)
        assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
    with pytest.raises(RuntimeError, match="boom"):
        with SAUCallback(pipe, SAUConfig(activation="attention"), triggered, TRIGGER):
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before


def test_attention_activation_reads_the_conditional_rows_of_the_triggered_prompts(base):
    from types import SimpleNamespace

    from sealdiff.models.attention import AttentionStore, cross_attention_layers

    triggered = [insert_trigger(p, TRIGGER) for p in PROMPTS]
    callback = SAUCallback(base, SAUConfig(activation="attention"), triggered, TRIGGER)
    n, layer = 2, cross_attention_layers(base.unet)[0]
    maps = torch.zeros(4 * n, 64, 77)       # rows: [uncond trig, uncond clean, cond trig, cond clean]
    maps[:, :, 1:4] = 0.1
    peaks = {0: 9, 1: 50}
    for i, q in peaks.items():
        maps[2 * n + i, q, 1:4] = 1.0       # conditional row of triggered prompt i, trigger columns 1..3
        maps[i, 20, 1:4] = 5.0              # unconditional rows must be ignored
    callback.store = AttentionStore()
    callback.store.record(layer, maps)
    a = callback._attention_activation(SimpleNamespace(do_classifier_free_guidance=True), n, (8, 8))
    assert a.shape == (2, 8, 8)
    assert [int(a[i].flatten().argmax()) for i in range(n)] == [peaks[0], peaks[1]]


def test_attention_activation_needs_context_and_prompts(base):
    with pytest.raises(SealdiffError, match="triggered prompts"):
        SAUCallback(base, SAUConfig(activation="attention"))
    callback = SAUCallback(base, SAUConfig(activation="attention"), [insert_trigger(PROMPTS[0], TRIGGER)], TRIGGER)
    with pytest.raises(SealdiffError, match="context manager"):
        base([insert_trigger(PROMPTS[0], TRIGGER), PROMPTS[0]], num_inference_steps=1, output_type="latent",
             callback_on_step_end=callback)


@pytest.mark.parametrize("field,value,valid", [
    ("blend", "mean", "paper, convex"),
    ("activation", "gradcam", "delta, attention"),
    ("apply_at", "first", "final, all, range"),
    ("alpha", 2.0, "0 <= alpha <= 1"),
    ("step_range", (0.8, 0.2), "lo < hi"),
    ("k", 0, "> 0"),
])
def test_invalid_sau_config_lists_valid_values(field, value, valid):
    with pytest.raises(SealdiffError, match=valid):
        SAUConfig(**{field: value})
