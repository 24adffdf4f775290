import pytest
import torch

from sealdiff.models import tiny
from sealdiff.models.attention import (AttentionStore, CapturingAttnProcessor, capture_cross_attention,
                                       cross_attention_layers, token_maps)


@pytest.fixture
def unet_inputs():
    spec = tiny.TinySpec.test()
    torch.manual_seed(0)
    unet = tiny.unet(spec)
    return unet, torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, spec.text_hidden)


def test_capture_matches_stock_output_and_restores_processors(unet_inputs):
    unet, x, t, context = unet_inputs
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    reference = unet(x, t, context).sample
    with capture_cross_attention(unet) as store:
        assert all(isinstance(p, CapturingAttnProcessor) for n, p in unet.attn_processors.items() if "attn2" in n)
        assert not any(isinstance(p, CapturingAttnProcessor) for n, p in unet.attn_processors.items() if "attn1" in n)
        out = unet(x, t, context).sample
        maps = store.pop()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert set(maps) == set(cross_attention_layers(unet))
    for m in maps.values():
        assert m.shape[0] == 2 and m.shape[2] == 77
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_maps_are_differentiable_and_reach_to_k(unet_inputs, checkpointing):
    unet, x, t, context = unet_inputs
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    with capture_cross_attention(unet) as store:
        unet(x, t, context)
        maps = store.pop()
        loss = sum(m[:, :, 3].mean() for m in maps.values())
        loss.backward()
    grads = [p.grad for n, p in unet.named_parameters() if "attn2.to_k" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_one_store_per_capture_and_pop_empties(unet_inputs):
    unet, x, t, context = unet_inputs
    with capture_cross_attention(unet) as first:
        unet(x, t, context)
    with capture_cross_attention(unet) as second:
        unet(x, t, context * 2)
        assert first.maps is not second.maps
        second_maps = second.pop()
        assert second.maps == {}
    first_maps = first.pop()
    name = next(iter(first_maps))
    assert not torch.allclose(first_maps[name], second_maps[name])


def test_store_overwrites_on_recompute():
    store = AttentionStore()
    store.record("a", torch.zeros(1))
    store.record("a", torch.ones(1))
    assert len(store.maps) == 1 and store.maps["a"].item() == 1


def test_unknown_layer_is_rejected_and_processors_restored(unet_inputs):
    unet = unet_inputs[0]
    before = dict(unet.attn_processors)
    with pytest.raises(ValueError, match="valid"):
        with capture_cross_attention(unet, ["nope.processor"]):
            pass
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_token_maps_resizes_to_one_resolution(unet_inputs):
    unet, x, t, context = unet_inputs
    with capture_cross_attention(unet) as store:
        unet(x, t, context)
    stacked = token_maps(store.pop(), resolution=8)
    assert stacked.shape[1:] == (2, 77, 8, 8)
