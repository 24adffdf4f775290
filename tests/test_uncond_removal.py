"""Backdoor removal for unconditional models (sealdiff.defenses.elijah / pruning / purification and
`sealdiff remove --method elijah|diff-cleanse|diffdefend`), on the committed micro pair (tests/uncond_micro.py).

Every removal is given the trigger *inverted* by its paper's detector, never the true one; the true trigger is
used only to measure attack success before and after."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DModel

import uncond_micro as M
from sealdiff.cli import main
from sealdiff.defenses import DEFENSES, get_defense
from sealdiff.defenses import pruning as P
from sealdiff.defenses.uncond import load_trigger
from sealdiff.detection import common as C
from sealdiff.detection import get_detector
from sealdiff.errors import SealdiffError
from sealdiff.io import directory_sha256
from sealdiff.models.uncond import load_uncond, save_uncond

from test_uncond_detection import FAST

REMOVAL = {  # short runs sized for the micro model
    "elijah-ft": dict(steps=60, batch=16, lr=1e-3, bank_size=32, bank_steps=5),
    "diff-cleanse-prune": dict(ratio=0.02, steps=60, batch=16, lr=1e-3, bank_size=32, bank_steps=5),
    "diffdefend-purify": dict(steps=60, batch=16, lr=1e-3, bank_size=32, bank_steps=5),
}


@pytest.fixture(scope="module")
def backdoored():
    return M.load_pair()[1]


@pytest.fixture(scope="module")
def inverted(backdoored):
    """The trigger Diff-Cleanse's BBTI inverts on the backdoored micro model (never the true one). Every removal is
    tested with it: Elijah's and DiffDefend's own inversions miss this micro backdoor (see test_uncond_detection)."""
    trigger = get_detector("diff-cleanse").make(progress=False, **FAST["diff-cleanse"]).scan(backdoored).trigger
    assert not torch.allclose(trigger, M.trigger(), atol=0.5)  # an inverted trigger, not the planted one
    return {defense: trigger for defense in REMOVAL}


def test_registry_lists_the_unconditional_removals():
    for name in ("elijah-ft", "diff-cleanse-prune", "diffdefend-purify"):
        assert DEFENSES[name].kind == "uncond"
        assert DEFENSES[name].runner.__doc__.strip()
    with pytest.raises(SealdiffError, match="ratio"):
        get_defense("diff-cleanse-prune").make_config(ratio=0.9)
    with pytest.raises(SealdiffError, match="importance"):
        get_defense("diff-cleanse-prune").make_config(importance="random")
    with pytest.raises(SealdiffError, match="trigger_levels"):
        get_defense("elijah-ft").make_config(trigger_levels="some")


@pytest.mark.parametrize("defense", list(REMOVAL))
def test_removal_with_the_inverted_trigger_lowers_attack_success(defense, backdoored, inverted):
    model = copy.deepcopy(backdoored)
    before = M.attack_success(model, M.trigger(), steps=20)
    assert before >= 0.9
    spec = get_defense(defense)
    result = spec.runner(spec.make_config(progress=False, **REMOVAL[defense])).apply(model, inverted[defense])
    after = M.attack_success(model, M.trigger(), steps=20)
    assert after <= 0.2, (before, after)
    assert len(result.losses) == REMOVAL[defense]["steps"] and all(map(torch.isfinite, torch.tensor(result.losses)))
    # the input model object is not touched by working on a copy
    assert M.attack_success(backdoored, M.trigger(), steps=20) == before


def test_pruning_masks_channels_that_survive_save_and_stock_load(backdoored, inverted, tmp_path):
    model = copy.deepcopy(backdoored)
    cfg = get_defense("diff-cleanse-prune").make_config(progress=False, **{**REMOVAL["diff-cleanse-prune"], "steps": 5})
    result = P.DiffCleansePruning(cfg).apply(model, inverted["diff-cleanse-prune"])
    pruned = result.extra["pruned"]
    total = result.extra["prunable_channels"]
    assert result.extra["pruned_channels"] == round(0.02 * total) and pruned
    assert P.pruned_channels_are_zero(model.unet, pruned)  # fine-tuning kept them at zero
    save_uncond(model, tmp_path / "pruned")
    assert not [p for p in (tmp_path / "pruned").rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]
    stock = UNet2DModel.from_pretrained(tmp_path / "pruned" / "unet", use_safetensors=True)
    assert P.pruned_channels_are_zero(stock, pruned)
    assert type(stock) is UNet2DModel
    # and through sealdiff's own loader
    assert P.pruned_channels_are_zero(load_uncond(tmp_path / "pruned").unet, pruned)


def test_channel_selection_rules():
    b = {"a": torch.tensor([5.0, 1.0, 1.0]), "b": torch.tensor([1.0, 1.0, 9.0])}
    c = {"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([1.0, 1.0, 20.0])}
    assert P.select_channels(P.channel_scores(b, c, "backdoor"), 1 / 6) == {"b": [2]}
    assert P.select_channels(P.channel_scores(b, c, "ratio"), 1 / 6) == {"a": [0]}
    diff = P.channel_scores(b, c, "difference")
    assert P.select_channels(diff, 1 / 6) == {"a": [0]}
    assert P.select_channels(b, 0.49) == {"a": [0, 1], "b": [2]}  # top scores first, ties by name and index
    # a layer never loses all its channels: the next best channel elsewhere is taken instead
    assert P.select_channels({"a": torch.tensor([9.0, 8.0]), "b": torch.tensor([1.0, 1.0, 1.0, 1.0])}, 0.4) == \
        {"a": [0], "b": [0]}


def test_removal_refuses_a_trigger_of_the_wrong_shape(backdoored):
    spec = get_defense("elijah-ft")
    with pytest.raises(SealdiffError, match="shape"):
        spec.runner(spec.make_config(progress=False, steps=1)).apply(copy.deepcopy(backdoored), torch.zeros(3, 4, 4))


@pytest.mark.parametrize("defense, noise_scale, message", [("elijah-ft", 1.5, "noise scale"),
                                                           ("diffdefend-purify", 0.0, "noise scale"),
                                                           ("diffdefend-purify", 1.5, "noise scale")])
def test_removal_refuses_a_noise_scale_it_cannot_use(backdoored, defense, noise_scale, message):
    spec = get_defense(defense)
    with pytest.raises(SealdiffError, match=message):
        spec.runner(spec.make_config(progress=False, steps=1)).apply(copy.deepcopy(backdoored), M.trigger(),
                                                                     noise_scale=noise_scale)


def test_pruning_importance_stamps_the_trigger_on_scaled_noise(backdoored):
    """A trigger BBTI found on a trojan input γ·ε + τ is scored on that input: the backdoor loss compares
    ε̂(γ·s·ε + τ, T) with ε̂(γ·s·ε, T)."""
    trigger, last = M.trigger(), C.last_level(backdoored)
    noise = C.noise_like(backdoored, 4, torch.Generator().manual_seed(3))
    losses = {}
    with torch.no_grad():
        for gamma in (1.0, 0.6):
            expected = (C.eps_pred(backdoored, backdoored.unet, gamma * noise + trigger, last)
                        - C.eps_pred(backdoored, backdoored.unet, gamma * noise, last)).pow(2).mean()
            losses[gamma] = P.backdoor_loss(backdoored, backdoored.unet, trigger, 4, torch.Generator().manual_seed(3),
                                            gamma)
            assert torch.allclose(losses[gamma], expected, atol=1e-6)
    assert not torch.allclose(losses[1.0], losses[0.6])


def test_chain_importance_loss_follows_the_poisoned_forward_process(backdoored):
    """`importance_levels='chain'`: L_b = ‖ε̂(x_t + c_t·τ, t) − ε̂(x_t, t)‖², x_t = a_t·x0 + γ·b_t·ε at t in
    [low, 1]·T, recomputed here from the formula (γ < 1: TrojDiff's scaled noise)."""
    bank = torch.rand(8, *backdoored.sample_shape) * 2 - 1
    trigger = M.trigger()
    for gamma in (1.0, 0.6):
        gen = torch.Generator().manual_seed(5)
        idx = torch.randint(0, len(bank), (4,), generator=gen)
        noise = torch.randn(bank[idx].shape, generator=gen)
        fracs = 0.9 + 0.1 * torch.rand(4, generator=gen)
        with torch.no_grad():
            expected = 0.0
            for i, frac in enumerate(fracs):
                lv = C.level(backdoored, float(frac))
                x_t = lv.a * bank[idx[i]:idx[i] + 1] + gamma * lv.b * noise[i:i + 1]
                stamped = x_t + (1 - lv.a) * trigger
                expected += (C.eps_pred(backdoored, backdoored.unet, stamped, lv)
                             - C.eps_pred(backdoored, backdoored.unet, x_t, lv)).pow(2).mean() / 4
            got = P.chain_backdoor_loss(backdoored, backdoored.unet, trigger, bank, 4,
                                        torch.Generator().manual_seed(5), low=0.9, gamma=gamma)
        assert torch.allclose(got, expected, rtol=1e-4), (gamma, got, expected)
    # and `importance` scores the channels with it when asked: its first batch is this loss's Taylor terms
    model = copy.deepcopy(backdoored)
    cfg = get_defense("diff-cleanse-prune").make_config(importance_levels="chain", importance_low=0.5,
                                                        importance_batches=1, batch=4, progress=False)
    scored, _ = P.importance(model, trigger, bank, cfg)
    layers = P.prunable_layers(model.unet)
    model.unet.zero_grad(set_to_none=True)
    P.chain_backdoor_loss(model, model.unet, trigger, bank, 4, torch.Generator().manual_seed(cfg.seed + 7),
                          low=0.5).backward()
    for name, taylor in P.channel_taylor(layers).items():
        assert torch.allclose(scored[name], taylor), name
    with pytest.raises(SealdiffError, match="importance_levels"):
        get_defense("diff-cleanse-prune").make_config(importance_levels="all")
    with pytest.raises(SealdiffError, match="importance_low"):
        get_defense("diff-cleanse-prune").make_config(importance_low=1.0)


def test_trigger_file_keeps_the_noise_scale(tmp_path):
    """A scan of a scaled-noise (TrojDiff-style) trigger writes its γ; removal reads it back with the trigger."""
    from sealdiff.detection import ScanResult, write_scan

    result = ScanResult(method="diffdefend", backdoored=True, score=1.0, threshold=0.5, scores={"dual": 1.0},
                        trigger=M.trigger(), seconds=0.0, config={"seed": 0}, noise_scale=0.6)
    write_scan(result, tmp_path, "model", "0" * 64, "ddpm")
    trigger, noise_scale = load_trigger(tmp_path)
    assert torch.equal(trigger, M.trigger()) and noise_scale == 0.6
    assert json.loads((tmp_path / "scan.json").read_text())["noise_scale"] == 0.6


# ---------------------------------------------------------------------------------------------- CLI


def _one_line(code: int, err: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sealdiff: error: ") and "Traceback" not in err, err


def test_cli_scan_then_remove_writes_a_loadable_model(tmp_path):
    model = M.ASSETS / "backdoored"
    before = directory_sha256(model)
    scan = tmp_path / "scan"
    cfg = tmp_path / "scan.yaml"
    cfg.write_text(json.dumps(FAST["diff-cleanse"]))
    assert main(["scan", str(model), "-o", str(scan), "--method", "diff-cleanse", "--config", str(cfg)]) == 0
    # the scan's grids (its noise with and without the inverted trigger) and its report page
    scanned = json.loads((scan / "sealdiff.json").read_text())
    assert scanned["grids"] == {"count": 16, "samplers": ["ddpm", "ddim"]} and scanned["result"]["backdoored"]
    assert (scan / "grid_ddpm_inverted.png").read_bytes() != (scan / "grid_ddpm_clean.png").read_bytes()
    assert main(["report", str(scan), "-o", str(tmp_path / "scan.html")]) == 0
    page = (tmp_path / "scan.html").read_text()
    assert f"<b>backdoored</b></td><td>{scanned['result']['score']:.3f}</td>" in page
    assert page.count('alt="scan ddpm ') == 2 and page.count('alt="scan ddim ') == 2 and "scan inverted trigger" in page
    out = tmp_path / "repaired"
    rcfg = tmp_path / "remove.json"
    rcfg.write_text(json.dumps({k: v for k, v in REMOVAL["diff-cleanse-prune"].items()}))
    assert main(["remove", str(model), "-o", str(out), "--method", "diff-cleanse", "--trigger-file", str(scan),
                 "--config", str(rcfg), "--measure", "16", "--sampler", "ddpm", "--device", "cpu"]) == 0
    assert directory_sha256(model) == before
    repaired = load_uncond(out)
    assert repaired.kind == "ddpm"
    info = json.loads((out / "sealdiff.json").read_text())
    assert info["defense"] == "diff-cleanse-prune" and info["trigger"]["source"] == "file" and info["device"] == "cpu"
    assert info["parent"]["sha256"] == before and info["trigger"]["sha256"] == directory_sha256(scan)
    assert info["measured"]["before"]["attack_success"] >= 0.9
    assert info["measured"]["after"]["attack_success"] < info["measured"]["before"]["attack_success"]
    assert torch.equal(load_trigger(scan)[0], __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(out / "inverted_trigger.safetensors"))["trigger"])
    # before/after grids from the same noise, and a report page built from the removal output
    from PIL import Image

    assert info["grids"] == {"sampler": "ddpm", "count": 16, "sets": ["clean", "triggered"]}
    grids = {name: Image.open(out / f"grid_{name}.png") for name in
             ("triggered_before", "triggered_after", "clean_before", "clean_after")}
    assert len({g.size for g in grids.values()}) == 1 and grids["triggered_before"].tobytes() != \
        grids["triggered_after"].tobytes()
    page = tmp_path / "report.html"
    assert main(["report", str(out), "-o", str(page)]) == 0
    html = page.read_text()
    before_pct = f"{info['measured']['before']['attack_success']:.1%}"
    after_pct = f"{info['measured']['after']['attack_success']:.1%}"
    assert f"<td>{before_pct}</td><td>{after_pct}</td>" in html and "diff-cleanse-prune" in html
    # the clean samples after removal against the parent's, from the same noise, as recorded and shown
    from sealdiff.cli.remove_uncond import MEASURE_STEPS
    from sealdiff.metrics.uncond import agreement, generate

    close = info["measured"]["clean_closeness"]["ddpm"]
    steps = MEASURE_STEPS["ddpm"]
    expected = agreement(generate(repaired, 16, "ddpm", steps), generate(load_uncond(model), 16, "ddpm", steps))
    assert close == pytest.approx({"mse": expected.mse, "ssim": expected.ssim, "count": 16}, rel=1e-5)
    assert 0 < close["ssim"] < 1 and f"<td>{close['ssim']:.3f}</td><td>{close['mse']:.4f}</td>" in html
    assert html.count('<img alt="repaired triggered') == 2 and 'alt="repaired inverted trigger"' in html
    assert "src=\"http" not in html  # self-contained


def test_cli_scan_and_pruning_run_through_a_vq_autoencoder(tmp_path):
    """A latent model with a VQModel (the published unconditional LDMs' autoencoder): BBTI's chain decodes through
    its quantizer with gradients reaching the trigger, and the pruned model saves as a stock LDMPipeline again."""
    from sealdiff.detection.diffcleanse import bbti_loss
    from sealdiff.models.uncond import tiny_uncond

    model = tiny_uncond("ldm", channels=(8, 16), autoencoder="vq")
    p = torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    noise = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    trigger = get_detector("diff-cleanse").make(progress=False).trigger_of(model, p)
    bbti_loss(model, model.unet, noise, trigger, 2, True, torch.Generator().manual_seed(2)).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    model.unet.zero_grad(set_to_none=True)
    model.vae.zero_grad(set_to_none=True)
    model_dir = tmp_path / "vq-ldm"
    save_uncond(model, model_dir)
    before = directory_sha256(model_dir)
    cfg = tmp_path / "scan.json"
    cfg.write_text(json.dumps({**FAST["diff-cleanse"], "epochs": 2, "samples": 8, "sample_steps": 4}))
    assert main(["scan", str(model_dir), "-o", str(tmp_path / "scan"), "--method", "diff-cleanse", "--config",
                 str(cfg)]) == 0
    assert main(["remove", str(model_dir), "-o", str(tmp_path / "out"), "--method", "diff-cleanse", "--trigger-file",
                 str(tmp_path / "scan"), "--steps", "1", "--measure", "4"]) == 0
    assert directory_sha256(model_dir) == before
    repaired = load_uncond(tmp_path / "out")
    assert type(repaired.vae).__name__ == "VQModel" and repaired.sample_shape == (4, 8, 8)


def test_cli_remove_measures_every_sampler_when_asked(tmp_path, capsys):
    """`--sampler all`: before/after on every sampler of the model type, the attack's own first (and reported as
    `before`/`after`), with the same numbers as a one-sampler measurement."""
    from sealdiff.cli.remove_uncond import measure_samples, measured_samplers
    from sealdiff.models.uncond import SAMPLERS

    from sealdiff.defenses.uncond import save_trigger
    from sealdiff.detection import TRIGGER_SOURCE

    model = M.ASSETS / "backdoored"
    scan = tmp_path / "scan"  # a stand-in scan output: this test is about the measurement, not the removal
    scan.mkdir()
    save_trigger(0.1 * torch.randn(M.trigger().shape, generator=torch.Generator().manual_seed(0)), scan,
                 metadata={"source": TRIGGER_SOURCE})
    out = tmp_path / "repaired"
    rcfg = tmp_path / "remove.json"
    rcfg.write_text(json.dumps(REMOVAL["elijah-ft"] | {"steps": 2}))
    capsys.readouterr()
    assert main(["remove", str(model), "-o", str(out), "--method", "elijah", "--trigger-file", str(scan),
                 "--config", str(rcfg), "--measure", "4", "--sampler", "all"]) == 0
    info = json.loads((out / "sealdiff.json").read_text())["measured"]
    assert list(info["per_sampler"]) == ["ddpm", *(s for s in SAMPLERS["ddpm"] if s != "ddpm")]
    assert info["before"] == info["per_sampler"]["ddpm"]["before"] and info["after"] == info["per_sampler"]["ddpm"]["after"]
    assert capsys.readouterr().out.count("attack success") == len(SAMPLERS["ddpm"])
    original = load_uncond(model)
    assert measure_samples(original, model, ("heun",), 4)[1]["heun"] == info["per_sampler"]["heun"]["before"]
    assert measured_samplers(original, model, "ddim") == ("ddim",) and measured_samplers(original, model, None) == ("ddpm",)


@pytest.mark.parametrize("args, message", [
    (lambda t: ["--trigger-file", str(t / "nope")], "does not exist"),
    # the attack's own trigger file holds the TRUE trigger: removal refuses it
    (lambda t: ["--trigger-file", str(M.ASSETS / "backdoored" / "trigger.safetensors")], "sealdiff scan"),
    (lambda t: ["--steps", "0"], "steps"),
    (lambda t: ["--sampler", "sde-ve"], "does not apply"),
])
def test_cli_remove_bad_input_is_one_line(args, message, tmp_path, capsys):
    before = directory_sha256(M.ASSETS)
    capsys.readouterr()
    code = main(["remove", str(M.ASSETS / "backdoored"), "-o", str(tmp_path / "o"), "--method", "elijah",
                 *args(tmp_path)])
    err = capsys.readouterr().err
    _one_line(code, err)
    assert message in err
    assert not (tmp_path / "o").exists() and directory_sha256(M.ASSETS) == before


def test_cli_remove_unknown_method_lists_both_families(tmp_path, capsys):
    capsys.readouterr()
    code = main(["remove", str(M.ASSETS / "backdoored"), "-o", str(tmp_path / "o"), "--method", "nope"])
    err = capsys.readouterr().err
    _one_line(code, err)
    assert "skd-cag" in err and "diff-cleanse" in err


@pytest.mark.parametrize("kind,attack,config,sampler", [
    ("ncsn", {"method": "villandiffusion"}, {"solver": "sde"}, "sde-ve-predictor"),  # the reverse SDE, no corrector
    ("ddpm", {"method": "villandiffusion"}, {"solver": "ode"}, "ddim"),
    ("ddpm", {"method": "baddiffusion"}, None, "ddpm"),
    ("ldm", {"method": "villandiffusion", "solver": "sde"}, None, "ddpm"),
])
def test_measurements_use_the_sampler_the_attack_targets(kind, attack, config, sampler):
    from sealdiff.cli.remove_uncond import attack_sampler

    assert attack_sampler(kind, attack, config) == sampler


class _PointMassDenoiser(torch.nn.Module):
    """The exact ε̂ of data concentrated at x0 = 0: ε̂(x_t, t) = x_t / b_t. It treats any offset as noise, so a
    trigger cannot steer it: the 'x0' removal target must already be met (loss 0), the 'eps' one must not."""

    def __init__(self, scheduler):
        super().__init__()
        self.b = (1 - scheduler.alphas_cumprod).sqrt()

    def forward(self, x, t):
        return type("Out", (), {"sample": x / self.b[t].view(-1, 1, 1, 1)})()


@pytest.mark.parametrize("scales, gamma", [((1.0, 1.0), 1.0), ((0.5, 3.0), 1.0), ((0.5, 3.0), 0.6)])
def test_removal_targets_on_a_denoiser_that_ignores_triggers(backdoored, scales, gamma):
    """An exact denoiser of a point mass reads any trigger (and a γ-scaled trojan input) as noise: the x0 target is
    what it already answers, the eps target is not."""
    from sealdiff.defenses.uncond import distill_loss

    denoiser = _PointMassDenoiser(backdoored.scheduler)
    bank = torch.zeros(4, *backdoored.sample_shape)
    trigger = M.trigger()

    def loss(target):
        return float(distill_loss(backdoored, denoiser, denoiser, bank, 8, torch.Generator().manual_seed(0),
                                  trigger=trigger, low=0.3, target=target, scales=scales, gamma=gamma))

    assert loss("x0") < 1e-10
    assert loss("eps") > 1e-3
    assert float(distill_loss(backdoored, denoiser, denoiser, bank, 8, torch.Generator().manual_seed(0))) < 1e-10


@pytest.mark.parametrize("gamma", [1.0, 0.6])
def test_elijah_last_step_targets_on_a_denoiser_that_ignores_triggers(backdoored, gamma):
    """At T too: a denoiser that reads any offset (and a γ-scaled trojan input) as noise already answers the x0
    target, not the eps target; with γ < 1 the loss reads the scaled noise."""
    from sealdiff.defenses.elijah import last_step_removal_loss

    denoiser = _PointMassDenoiser(backdoored.scheduler)

    def loss(target, value=gamma):
        return float(last_step_removal_loss(backdoored, denoiser, denoiser, M.trigger(), 8,
                                            torch.Generator().manual_seed(0), target, value))

    assert loss("x0") < 1e-10
    assert loss("eps") > 1e-3
    if gamma != 1.0:  # the eps loss is ‖offset/b_T‖²: the scaled noise is part of the offset
        assert abs(loss("eps") - loss("eps", 1.0)) > 1e-3


class _InputRecorder(torch.nn.Module):
    """A UNet stand-in that answers zeros and keeps what it was called with."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x, t):
        self.inputs.append(x.detach().clone())
        return type("Out", (), {"sample": torch.zeros_like(x)})()


@pytest.mark.parametrize("loss", ["trajectory", "last-step"])
@pytest.mark.parametrize("channel_means", [0.0, 1.5])
def test_removal_stamps_a_random_channel_mean_beside_the_trigger(backdoored, loss, channel_means):
    """`channel_means` > 0: each row's stamp is c_t·(τ + m) (c_T = 1 at the last step) with m constant over each
    channel, drawn per row within ±channel_means·rms(τ); 0 stamps c_t·τ alone."""
    from sealdiff.defenses.elijah import last_step_removal_loss
    from sealdiff.defenses.uncond import distill_loss

    trigger = M.trigger()
    trigger = trigger - trigger.mean(dim=(1, 2), keepdim=True)  # zero-mean, as an inverted trigger: m ⟂ τ
    teacher, student = _InputRecorder(), _InputRecorder()
    gen = torch.Generator().manual_seed(0)
    if loss == "trajectory":
        distill_loss(backdoored, student, teacher, torch.zeros(4, *backdoored.sample_shape), 16, gen, trigger=trigger,
                     low=0.3, channel_means=channel_means)
    else:
        last_step_removal_loss(backdoored, student, teacher, trigger, 16, gen, channel_means=channel_means)
    offset = student.inputs[0] - teacher.inputs[0]
    share = (offset * trigger).flatten(1).sum(1) / trigger.pow(2).sum()  # c_t of each row
    means = offset / share.view(-1, 1, 1, 1) - trigger
    assert float(means.std(dim=(2, 3)).max()) < 1e-4  # constant over each channel
    bound = channel_means * float(trigger.pow(2).mean().sqrt())
    assert float(means.abs().max()) <= bound + 1e-4
    if channel_means:
        assert float(means.abs().max()) > 0.5 * bound  # drawn, not zero


@pytest.mark.parametrize("defense", ["diffdefend-purify", "elijah-ft"])
def test_removal_configs_reject_negative_channel_means(defense):
    with pytest.raises(SealdiffError, match="trigger_channel_means -1.0 is invalid; valid: a number >= 0"):
        get_defense(defense).make_config(trigger_channel_means=-1.0)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_purification_rejects_a_removal_range_outside_the_schedule(value):
    with pytest.raises(SealdiffError, match="removal_low .* valid: 0 <= value <= 1"):
        get_defense("diffdefend-purify").make_config(removal_low=value)


@pytest.mark.parametrize("defense", ["diffdefend-purify", "elijah-ft"])
@pytest.mark.parametrize("field, value, message", [("removal_target", "pixels", "valid: eps, x0"),
                                                   ("trigger_scale_low", 0.0, "0 < low <= high"),
                                                   ("trigger_scale_high", 0.2, "0 < low <= high")])
def test_trajectory_removal_configs_reject_bad_values(defense, field, value, message):
    with pytest.raises(SealdiffError, match=message):
        get_defense(defense).make_config(**{field: value})


@pytest.mark.parametrize("levels", ["trajectory", "last"])
def test_elijah_removal_stamps_the_trigger_at_the_configured_strengths(backdoored, levels):
    """With trigger_levels='trajectory' the removal loss stamps k·c_t·τ on x_t with k in trigger_scale_low..high,
    so the first loss depends on that range; the paper's loss at T alone does not read it."""
    spec = get_defense("elijah-ft")
    first = {}
    for scale in (1.0, 4.0):
        cfg = spec.make_config(progress=False, steps=1, bank_size=8, bank_steps=2, trigger_levels=levels,
                               trigger_scale_low=scale, trigger_scale_high=scale)
        first[scale] = spec.runner(cfg).apply(copy.deepcopy(backdoored), M.trigger()).losses[0]
    assert (first[1.0] != first[4.0]) == (levels == "trajectory"), first


def test_pruning_unlearning_term_is_weighted_into_the_fine_tuning(backdoored):
    """`unlearn_weight` w_u adds w_u times one non-zero trigger-unlearning loss to the first fine-tuning step, drawn
    after the paper's two terms (which it leaves unchanged), and raises a negative weight."""
    spec = get_defense("diff-cleanse-prune")

    def first_loss(weight: float) -> float:
        cfg = spec.make_config(progress=False, steps=1, bank_size=8, bank_steps=2, unlearn_weight=weight)
        return spec.runner(cfg).apply(copy.deepcopy(backdoored), 0.5 * M.trigger()).losses[0]

    paper, once, twice = first_loss(0.0), first_loss(1.0), first_loss(2.0)
    assert once - paper > 1e-4
    assert twice - paper == pytest.approx(2 * (once - paper), rel=1e-4)
    with pytest.raises(SealdiffError, match="unlearn_weight -1 is invalid"):
        spec.make_config(unlearn_weight=-1)


@pytest.mark.parametrize("defense", ["elijah-ft", "diff-cleanse-prune"])
def test_real_images_replace_the_generated_bank(backdoored, defense, monkeypatch):
    """Given real clean images, the clean (and distillation) losses draw from them: no model-generated bank is made."""
    from sealdiff.defenses import uncond as U

    spec = get_defense(defense)
    cfg = spec.make_config(progress=False, steps=1, bank_size=8, bank_steps=2)
    free = spec.runner(cfg).apply(copy.deepcopy(backdoored), M.trigger()).losses[0]
    monkeypatch.setattr(U, "generated_bank", lambda *a, **k: pytest.fail("generated a bank despite real images"))
    images = M.clean_batch(8, torch.Generator().manual_seed(5))
    real = spec.runner(cfg).apply(copy.deepcopy(backdoored), M.trigger(), images=images)
    assert real.losses[0] != free
    if defense == "elijah-ft":
        assert real.extra["data"] == "real images"


@pytest.mark.parametrize("gamma", [1.0, 0.6])
def test_sharded_losses_average_to_the_whole_batch_loss(backdoored, gamma):
    """Data parallelism's contract: the shards of a batch draw the same global rows from the same generator state,
    so the mean of two shards' losses (batch 4 each) is one process's loss over the batch of 8."""
    from sealdiff.defenses.elijah import last_step_removal_loss
    from sealdiff.defenses.uncond import Shard, clean_loss, distill_loss

    unet, frozen = backdoored.unet, copy.deepcopy(backdoored.unet)
    bank = torch.randn(6, *backdoored.sample_shape, generator=torch.Generator().manual_seed(1))
    trigger = 0.3 * M.trigger()
    losses = {
        "clean": lambda batch, shard: clean_loss(backdoored, unet, bank, batch, torch.Generator().manual_seed(2),
                                                 shard),
        "distill": lambda batch, shard: distill_loss(backdoored, unet, frozen, bank, batch,
                                                     torch.Generator().manual_seed(2), trigger=trigger, low=0.3,
                                                     target="x0", scales=(0.5, 6.0), gamma=gamma,
                                                     channel_means=1.0, shard=shard),
        "last": lambda batch, shard: last_step_removal_loss(backdoored, unet, frozen, trigger, batch,
                                                            torch.Generator().manual_seed(2), "x0", gamma,
                                                            channel_means=1.0, shard=shard),
    }
    with torch.no_grad():
        for name, loss in losses.items():
            whole = loss(8, Shard())
            halves = [loss(4, Shard(index, 2)) for index in (0, 1)]
            torch.testing.assert_close((halves[0] + halves[1]) / 2, whole, rtol=1e-5, atol=0, msg=name)
            assert abs(float(halves[0] - halves[1])) > 1e-6, name  # the shards hold different rows
