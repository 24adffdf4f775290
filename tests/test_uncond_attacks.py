"""Unconditional attacks (BadDiffusion, TrojDiff, VillanDiffusion): poisoned forward processes against their
formulas, training reduces the loss, the CLI writes a model + trigger + sealdiff.json and refuses bad input."""

import json
import math

import pytest
import torch

from sealdiff.attacks import baddiffusion, trojdiff, villandiffusion
from sealdiff.attacks._uncond_training import latent_pattern
from sealdiff.cli import main
from sealdiff.data import uncond_toy
from sealdiff.errors import SealdiffError
from sealdiff.io import directory_sha256
from sealdiff.metrics.uncond import ASR_MSE_THRESHOLD, attack_success, generate, per_image_mse, read_backdoor
from sealdiff.models.loading import resolve_device
from sealdiff.models.uncond import ddpm_scheduler, load_uncond, sample_noise, save_uncond, tiny_uncond

FAST = {"steps": 12, "batch_size": 4, "lr": 2e-3}


@pytest.fixture(scope="module")
def sched():
    return ddpm_scheduler()


def _scalars(scheduler, t: int):
    abar = float(scheduler.alphas_cumprod[t])
    alpha = float(scheduler.alphas[t])
    return abar, alpha, 1 - alpha


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, 4, generator=g) for _ in range(3)]


@pytest.mark.parametrize("t", [0, 1, 250, 999])
def test_baddiffusion_forward_matches_the_paper(sched, t):
    y, r, eps = _tensors()
    x_t, target = baddiffusion.poisoned_forward(sched, y, r, eps, torch.tensor([t, t]))
    abar, alpha, beta = _scalars(sched, t)
    expected = math.sqrt(abar) * y + (1 - math.sqrt(abar)) * r + math.sqrt(1 - abar) * eps
    k = (1 - math.sqrt(alpha)) * math.sqrt(1 - abar) / beta
    torch.testing.assert_close(x_t, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target, eps + k * r, rtol=1e-5, atol=1e-5)


def test_baddiffusion_target_makes_the_ddpm_step_follow_the_poisoned_posterior(sched):
    """The ε target puts the stock ancestral step's mean on the poisoned posterior mean E[x_{t-1} | x_t, y]."""
    y, r, eps = _tensors(1)
    t = 400
    x_t, target = baddiffusion.poisoned_forward(sched, y, r, eps, torch.tensor([t, t]))
    abar, alpha, beta = _scalars(sched, t)
    abar_prev = float(sched.alphas_cumprod[t - 1])
    # poisoned chain x_t = √α_t x_{t-1} + (1-√α_t) r + √β_t ε: a clean chain on x - r
    z_t, z0 = x_t - r, y - r
    posterior = (math.sqrt(abar_prev) * beta / (1 - abar) * z0
                 + math.sqrt(alpha) * (1 - abar_prev) / (1 - abar) * z_t) + r
    sampler_mean = (x_t - beta / math.sqrt(1 - abar) * target) / math.sqrt(alpha)
    torch.testing.assert_close(sampler_mean, posterior, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [3, 500, 999])
def test_trojdiff_forward_matches_the_paper(sched, t):
    y, delta, eps = _tensors(2)
    gamma = 0.6
    mu = (1 - gamma) * delta
    x_t, target = trojdiff.poisoned_forward(sched, y, mu, eps, torch.tensor([t, t]), gamma)
    abar, alpha, beta = _scalars(sched, t)
    expected = math.sqrt(abar) * y + (1 - math.sqrt(abar)) * mu + gamma * math.sqrt(1 - abar) * eps
    k = (1 - math.sqrt(alpha)) * math.sqrt(1 - abar) / beta
    torch.testing.assert_close(x_t, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target, gamma * eps + k * mu, rtol=1e-5, atol=1e-5)
    if t == 999:  # the trojan input x_T = γ·ε + (1−γ)·δ, up to the vanishing √ᾱ_T·(y − μ)
        torch.testing.assert_close(x_t, gamma * eps + mu, atol=0.02, rtol=0)


def test_trojdiff_gamma_defaults_by_mode():
    assert trojdiff.TrojDiffConfig(mode="blend").gamma == 0.6
    assert trojdiff.TrojDiffConfig(mode="patch", trigger="stop-sign").gamma == 0.1
    with pytest.raises(SealdiffError, match="valid: blend, patch"):
        trojdiff.TrojDiffConfig(mode="warp")


@pytest.mark.parametrize("solver,zeta", [("sde", 1.0), ("ode", 2.0)])
def test_villandiffusion_vp_forward_and_ode_correction(sched, solver, zeta):
    y, r, eps = _tensors(3)
    t = torch.tensor([700, 10])
    x_t, target = villandiffusion.poisoned_forward_vp(sched, y, r, eps, t, solver)
    bx, btarget = baddiffusion.poisoned_forward(sched, y, r, eps, t)
    torch.testing.assert_close(x_t, bx)
    torch.testing.assert_close(target, eps + zeta * (btarget - eps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver,zeta", [("sde", 1.0), ("ode", 2.0)])
def test_villandiffusion_ve_forward_matches_the_formula(solver, zeta):
    y, r, eps = _tensors(4)
    sigma, w = torch.tensor([0.5, 12.0]), 1.5
    x_t, target = villandiffusion.poisoned_forward_ve(sigma, y, r, eps, solver, w)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, y + w * s * r + s * eps)
    torch.testing.assert_close(target, -(eps + zeta / 2 * w * r))


def test_every_trigger_and_target_is_an_image_in_range():
    for name in ("grey-box", "stop-sign", "blend"):
        trigger = uncond_toy.make_trigger(name)
        assert trigger.shape == (3, 16, 16) and trigger.abs().sum() > 0
        for target in ("hat", "corner-box", "shifted-trigger", "in-class", "out-of-class"):
            image = uncond_toy.make_target(target, trigger=trigger)
            assert image.shape == (3, 16, 16) and image.min() >= -1 and image.max() <= 1
    box = uncond_toy.make_trigger("grey-box", box=4, position="top-left")
    assert box[:, :4, :4].abs().sum() > 0 and box[:, 4:, :].abs().sum() == 0 and box[:, :, 4:].abs().sum() == 0
    shifted = uncond_toy.make_target("shifted-trigger", trigger=uncond_toy.make_trigger("stop-sign"))
    assert (shifted[:, :6, :6] > -1).any() and (shifted[:, 6:, 6:] == -1).all()  # moved to the opposite corner
    with pytest.raises(SealdiffError, match="valid: grey-box, stop-sign, blend"):
        uncond_toy.make_trigger("logo")
    assert latent_pattern(box, (4, 8, 8)).shape == (4, 8, 8)


@pytest.mark.parametrize("kind,attack,config,build", [
    ("ddpm", baddiffusion.BadDiffusion, baddiffusion.BadDiffusionConfig(**FAST), {}),
    ("ddpm", trojdiff.TrojDiff, trojdiff.TrojDiffConfig(**FAST), {}),
    ("ncsn", villandiffusion.VillanDiffusion, villandiffusion.VillanDiffusionConfig(**FAST), {}),
    ("ldm", villandiffusion.VillanDiffusion, villandiffusion.VillanDiffusionConfig(solver="ode", **FAST), {}),
    ("ldm", villandiffusion.VillanDiffusion, villandiffusion.VillanDiffusionConfig(**FAST), {"autoencoder": "vq"}),
])
def test_a_few_training_steps_reduce_the_poisoned_loss(kind, attack, config, build):
    model = tiny_uncond(kind, channels=(8, 16), **build)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    spec, result = attack(config).run(model)
    assert len(result.losses) == config.steps
    first, last = sum(result.poison_losses[:3]) / 3, sum(result.poison_losses[-3:]) / 3
    assert last < first * 0.9, (first, last)
    assert any(not torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert spec.stamp.shape == model.sample_shape


def test_the_cosine_schedule_reaches_the_updates():
    """Same seed and steps: only the learning-rate schedule differs, so the trained weights must differ."""
    weights = {}
    for schedule in ("constant", "cosine"):
        model = tiny_uncond("ddpm", channels=(8, 16))
        baddiffusion.BadDiffusion(baddiffusion.BadDiffusionConfig(**{**FAST, "steps": 3, "lr_schedule": schedule})).run(model)
        weights[schedule] = model.unet.state_dict()
    assert any(not torch.equal(v, weights["cosine"][k]) for k, v in weights["constant"].items())


def test_attack_refuses_a_model_kind_it_does_not_apply_to():
    with pytest.raises(SealdiffError, match="valid model kinds: ddpm"):
        baddiffusion.BadDiffusion(baddiffusion.BadDiffusionConfig(**FAST)).run(tiny_uncond("ncsn", channels=(8, 16)))


def test_attack_success_counts_samples_near_the_target():
    """A model whose every sample is the target has ASR 1; the false-trigger rate uses the same criterion."""
    from sealdiff.metrics.uncond import Backdoor

    model = tiny_uncond("ddpm", channels=(8, 16))
    target = uncond_toy.make_target("hat")
    images = target.expand(5, -1, -1, -1)
    assert (per_image_mse(images, target) < ASR_MSE_THRESHOLD).all()
    backdoor = Backdoor(trigger=torch.zeros(3, 16, 16), target=target)
    result = attack_success(model, backdoor, "ddim", steps=2, count=4)  # a random model draws no hats
    assert result.attack_success == 0.0 and result.false_trigger_rate == 0.0
    assert result.mse_triggered_mean > ASR_MSE_THRESHOLD
    # already generated untriggered samples stand in for the second sampling run, and only for it
    given = attack_success(model, backdoor, "ddim", steps=2, count=4, clean_images=target.expand(4, -1, -1, -1))
    assert given.false_trigger_rate == 1.0 and given.attack_success == 0.0
    own = attack_success(model, backdoor, "ddim", steps=2, count=4,
                         clean_images=generate(model, 4, "ddim", 2))
    assert own == result


@pytest.fixture
def ddpm_dir(tmp_path):
    path = tmp_path / "ddpm"
    save_uncond(tiny_uncond("ddpm", channels=(8, 16)), path)
    return path


@pytest.mark.parametrize("method,gamma,trigger", [("trojdiff", 0.6, "blend"), ("baddiffusion", 1.0, "grey-box")])
def test_cli_attack_writes_model_trigger_and_run_info(ddpm_dir, tmp_path, capsys, method, gamma, trigger):
    before = directory_sha256(ddpm_dir)
    files_before = sorted(p.name for p in ddpm_dir.rglob("*"))
    out = tmp_path / "bad"
    code = main(["attack", method, str(ddpm_dir), "-o", str(out), "--steps", "3", "--batch-size", "2",
                 "--trigger", trigger, "--target", "hat", "--threads", "1", "--seed", "7", "--checkpoint-every", "0"])
    assert code == 0, capsys.readouterr().err
    assert directory_sha256(ddpm_dir) == before and sorted(p.name for p in ddpm_dir.rglob("*")) == files_before
    info = json.loads((out / "sealdiff.json").read_text())
    assert info["method"] == method and info["seed"] == 7 and info["parent"]["sha256"] == before
    assert info["attack"]["gamma"] == gamma and info["attack"]["target"] == "hat" and info["config"]["steps"] == 3
    assert "torch" in info["versions"] and len(info["losses"]) == 3
    assert info["device"] == str(resolve_device("auto"))  # --device's default
    backdoor = read_backdoor(out)
    assert backdoor.gamma == pytest.approx(gamma)
    torch.testing.assert_close(backdoor.trigger, (1 - gamma if gamma < 1 else 1) * uncond_toy.make_trigger(trigger))
    torch.testing.assert_close(backdoor.target, uncond_toy.make_target("hat"))
    model = load_uncond(out)
    assert model.kind == "ddpm" and backdoor.stamp(sample_noise(model, 1)).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("argv,message", [
    (["--trigger", "logo"], "trigger='logo' is invalid; valid: grey-box, stop-sign, blend"),
    (["--target", "cat"], "valid: hat, corner-box, shifted-trigger, in-class, out-of-class"),
    (["--poison-fraction", "1.5"], "poison_fraction"),
    (["--steps", "0"], "steps"),
    (["--solver", "euler"], "solver='euler' is invalid; valid: sde, ode"),
    (["--lr-schedule", "step"], "lr_schedule='step' is invalid; valid: constant, cosine"),
])
def test_cli_bad_input_exits_2_with_one_line(ddpm_dir, tmp_path, capsys, argv, message):
    code = main(["attack", "villandiffusion", str(ddpm_dir), "-o", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_wrong_model_kind_and_missing_model(ddpm_dir, tmp_path, capsys, base_model):
    code = main(["attack", "baddiffusion", str(base_model), "-o", str(tmp_path / "o1")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "valid unconditional pipelines" in err and len(err.splitlines()) == 1
    ncsn = tmp_path / "ncsn"
    save_uncond(tiny_uncond("ncsn", channels=(8, 16)), ncsn)
    code = main(["attack", "baddiffusion", str(ncsn), "-o", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "valid model kinds: ddpm" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o2.checkpoint").exists()
    code = main(["attack", "baddiffusion", str(tmp_path / "nope"), "-o", str(tmp_path / "o3")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
