"""The paired clean-accuracy drop that the removal table reports with its noise."""

import math

import torch

from sealdiff.metrics.judges import paired_drop


def test_paired_drop_counts_flips_and_their_interval():
    before = torch.tensor([True] * 6 + [False] * 4)
    after = torch.tensor([True, True, True, True, False, False, True, False, False, False])
    out = paired_drop(before, after)
    assert (out["lost"], out["gained"]) == (2, 1)
    assert math.isclose(out["drop"], 0.1)
    assert math.isclose(out["ci95"], 1.96 * math.sqrt((0.3 - 0.01) / 10))


def test_paired_drop_without_flips_has_no_noise():
    hits = torch.tensor([True, False, True])
    assert paired_drop(hits, hits.clone()) == {"drop": 0.0, "lost": 0, "gained": 0, "ci95": 0.0}
