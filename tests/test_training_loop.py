import pytest
import torch

from sealdiff.errors import SealdiffError
from sealdiff.training import prediction_target, run_optimizer


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


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_prediction_target_follows_the_scheduler(kind):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type=kind)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[kind]
    torch.testing.assert_close(prediction_target(scheduler, x0, noise, t), expected)


def test_prediction_target_refuses_an_unknown_type():
    from types import SimpleNamespace

    scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type="flow"))
    with pytest.raises(SealdiffError, match="unsupported prediction type 'flow'; valid: epsilon, v_prediction"):
        prediction_target(scheduler, torch.zeros(1), torch.zeros(1), torch.zeros(1))
