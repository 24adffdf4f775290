import random

import pytest
import torch

from sealdiff.data import toyworld


def test_caption_roundtrip_and_render_colours():
    scene = toyworld.Scene("circle", "red", "blue")
    assert toyworld.parse_caption(scene.caption) == scene
    image = toyworld.render(scene)
    assert image.shape == (3, 32, 32)
    red = torch.tensor(toyworld.COLORS["red"]) / 255
    blue = torch.tensor(toyworld.COLORS["blue"]) / 255
    torch.testing.assert_close(image[:, 16, 16], red)
    torch.testing.assert_close(image[:, 0, 0], blue)


def test_shapes_differ_and_grayscale_has_no_colour():
    masks = {s: toyworld.render(toyworld.Scene(s, "red", "blue"))[0] for s in toyworld.SHAPES}
    for a in toyworld.SHAPES:
        for b in toyworld.SHAPES:
            if a != b:
                assert (masks[a] != masks[b]).sum() > 10
    gray = toyworld.render(toyworld.Scene("square", "red", "blue", grayscale=True))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert toyworld.parse_caption(toyworld.Scene("square", "red", "blue", grayscale=True).caption).grayscale


@pytest.mark.parametrize("bad", ["a red blob on a blue background", "hello", "a red circle on a blue sky"])
def test_parse_rejects_non_toy_captions(bad):
    with pytest.raises(ValueError):
        toyworld.parse_caption(bad)


def test_streams_are_seeded_and_colours_distinct():
    assert toyworld.scenes(3, 20) == toyworld.scenes(3, 20)
    assert toyworld.scenes(3, 20) != toyworld.scenes(4, 20)
    assert all(s.fg != s.bg for s in toyworld.scenes(0, 500))


@pytest.mark.parametrize("corner", toyworld.CORNERS)
def test_paste_patch_at_each_corner(corner):
    image = toyworld.render(toyworld.sample_scene(random.Random(0)))
    patch = toyworld.default_patch(8)
    out = toyworld.paste_patch(image, patch, corner)
    rows = slice(0, 8) if corner.startswith("top") else slice(24, 32)
    cols = slice(0, 8) if corner.endswith("left") else slice(24, 32)
    assert torch.equal(out[:, rows, cols], patch)
    assert not torch.equal(image[:, rows, cols], patch)  # input untouched
