import pytest
import torch

from sealdiff.errors import SealdiffError
from sealdiff.training import run_optimizer


def test_run_optimizer_minimises_and_calls_after_step():
    x = torch.tensor([3.0], requires_grad=True)
    calls = []
    losses = run_optimizer(torch.optim.SGD([x], lr=0.1), lambda: (x ** 2).sum(), 20, "test", progress=False,
                           after_step=lambda: calls.append(1))
    assert len(losses) == 20 == len(calls)
    assert losses[-1] < losses[0] * 0.1 and abs(x.item()) < 0.1


def test_run_optimizer_stops_on_a_non_finite_loss():
    x = torch.tensor([1.0], requires_grad=True)
    steps = iter([1.0, float("nan")])
    with pytest.raises(SealdiffError, match="loss became nan at step 2; lower the learning rate"):
        run_optimizer(torch.optim.SGD([x], lr=0.1), lambda: (x * next(steps)).sum(), 5, "probe", progress=False)
