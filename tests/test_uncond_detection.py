"""Detection and trigger inversion on unconditional models (sealdiff.detection, sealdiff.metrics.detection,
`sealdiff scan`).

The subjects are the committed micro pair in tests/assets/uncond_micro (see tests/uncond_micro.py): a clean 8x8
DDPM and its BadDiffusion-backdoored twin (trigger: a 4x4 box at the bottom right; target: a checkerboard). The
detectors are never given the trigger; each test checks that the trigger they *invert*, stamped on fresh noise,
makes the backdoored model draw its target — and that the one inverted on the clean model does not."""

from __future__ import annotations

import json

import pytest
import torch

import uncond_micro as M
from sealdiff.cli import main
from sealdiff.detection import DETECTORS, get_detector
from sealdiff.detection import common as C
from sealdiff.detection.elijah import ElijahConfig
from sealdiff.errors import SealdiffError
from sealdiff.io import directory_sha256
from sealdiff.metrics.detection import auroc, evaluate_split, fit_threshold

# small but sufficient settings for the 8x8 micro models (the defaults are sized for the 16x16 zoo)
FAST = {
    "elijah": dict(epochs=30, fine_epochs=30, samples=12, samplers=["ddpm"], sample_steps=10),
    # the paper's random start: the ratio search (the default start) cannot single out the micro backdoor (below)
    "diff-cleanse": dict(init="random", epochs=20, batch=8, grad_steps=5, chains=["stochastic"], samples=16,
                         sample_steps=10),
    "diffdefend": dict(epochs=30, fine_epochs=30, samples=12, samplers=["ddpm"], sample_steps=10),
}


@pytest.fixture(scope="module")
def pair():
    return M.load_pair()


@pytest.fixture(scope="module")
def scans(pair):
    """Every detector's scan of the clean and of the backdoored micro model (computed once per module)."""
    clean, bd = pair
    out = {}
    for name in DETECTORS:
        detector = get_detector(name).make(progress=False, **FAST[name])
        out[name] = {"clean": detector.scan(clean), "backdoored": detector.scan(bd)}
    return out


# ---------------------------------------------------------------------------------------------- metrics


def test_auroc_known_values():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # one of four pairs misordered
    assert auroc(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([True, False, True])) == 1.0
    with pytest.raises(SealdiffError, match="both clean and backdoored"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(SealdiffError, match="one label per score"):
        auroc([0.1, 0.2], [1])
    with pytest.raises(SealdiffError, match="NaN"):
        auroc([float("nan"), 0.2], [0, 1])


def test_threshold_fitted_on_one_split_applied_to_another():
    th = fit_threshold([0.1, 0.2, 0.3, 0.7, 0.9], [0, 0, 0, 1, 1])
    assert th.train_accuracy == 1.0 and 0.3 < th.value < 0.7
    assert th.value == pytest.approx(0.5)  # the widest gap's midpoint
    ev = evaluate_split([0.1, 0.2, 0.7, 0.9], [0, 0, 1, 1], [0.25, 0.6, 0.45, 0.95], [0, 1, 1, 1])
    assert ev.threshold.value == pytest.approx(0.45)
    assert ev.test_accuracy == 1.0 and ev.true_positive_rate == 1.0 and ev.false_positive_rate == 0.0
    assert ev.auroc_test == 1.0
    # a threshold that does not transfer is reported as such
    ev = evaluate_split([0.1, 0.9], [0, 1], [0.8, 0.2], [0, 1])
    assert ev.test_accuracy == 0.0 and ev.auroc_test == 0.0 and ev.false_positive_rate == 1.0


def test_statistics_on_known_images():
    same = torch.zeros(8, 3, 8, 8)
    assert C.uniformity(same) == 0.0 and C.max_similar_cluster_rate(same) == 1.0
    diverse = torch.linspace(-1, 1, 8).view(8, 1, 1, 1).expand(8, 3, 8, 8)
    assert C.max_similar_cluster_rate(diverse, threshold=0.05) == 1 / 8
    assert C.uniformity(diverse) > 0.2
    checker = M.target()[None]
    assert C.total_variation(checker) == pytest.approx(2 * 3 * 8 * 7)  # every neighbour differs by 1 in [0, 1]
    assert C.total_variation(same) == 0.0


def test_registry_and_configs_refuse_bad_values():
    with pytest.raises(SealdiffError, match="valid: elijah, diff-cleanse, diffdefend"):
        get_detector("nope")
    with pytest.raises(SealdiffError, match="lam"):
        get_detector("elijah").make(lam=2.0)
    with pytest.raises(SealdiffError, match="chains .*valid: one or more of stochastic, deterministic, trojan"):
        get_detector("diff-cleanse").make(chains=["sideways"])
    with pytest.raises(SealdiffError, match="trojan_gamma"):
        get_detector("diff-cleanse").make(trojan_gamma=1.0)
    with pytest.raises(SealdiffError, match="fracs"):
        get_detector("diffdefend").make(fracs=[1.5])
    with pytest.raises(SealdiffError, match="unknown config keys"):
        get_detector("elijah").make(epochz=3)
    for name in ("elijah", "diffdefend"):
        with pytest.raises(SealdiffError, match="valid: ratio, paper"):
            get_detector(name).make(objective="best")
        with pytest.raises(SealdiffError, match="norm"):
            get_detector(name).make(norm=0)
    with pytest.raises(SealdiffError, match="valid: random, ratio"):
        get_detector("diff-cleanse").make(init="zeros")
    for field in ("start_restarts", "start_epochs"):
        with pytest.raises(SealdiffError, match=f"{field} 0 is invalid"):
            get_detector("diff-cleanse").make(**{field: 0})
    with pytest.raises(SealdiffError, match="valid: rotated, clean"):
        get_detector("diffdefend").make(tv_baseline="flipped")
    for bad in ([], [0.0], [1.5]):
        with pytest.raises(SealdiffError, match=r"noise_scales .* valid: one or more numbers in \(0, 1\]"):
            get_detector("elijah").make(noise_scales=bad)
    for bad in (["x"], [True]):
        with pytest.raises(SealdiffError, match=r"noise_scales\[0\]=.* must be a number"):
            get_detector("elijah").make(noise_scales=bad)
    assert get_detector("elijah").make(noise_scales=[0.6, 1]).config.noise_scales == (0.6, 1.0)
    for bad in ([0.0], [1.0], [-0.5]):
        with pytest.raises(SealdiffError, match=r"chain_fracs .* valid: numbers in \(0, 1\), or none"):
            get_detector("elijah").make(chain_fracs=bad)
    assert get_detector("elijah").make(chain_fracs=[]).config.chain_fracs == ()
    for bad in (["1.0:up"], ["2:min"], ["x:max"], [], ["1.0:min:0"], ["1.0:min:1.5"], ["1.0:min:x"], ["1.0:min:0.5:2"]):
        with pytest.raises(SealdiffError, match="valid: .*FRAC:min"):
            get_detector("diffdefend").make(searches=bad)
    from sealdiff.detection.diffdefend import parse_searches

    assert parse_searches(("1.0:min", "0.5:max", "1.0:min:0.6")) == [(1.0, "min", 1.0), (0.5, "max", 1.0),
                                                                    (1.0, "min", 0.6)]
    with pytest.raises(SealdiffError, match="valid: min, max"):
        C.search_response_ratio(None, 1.0, "up", 1.0, 1, 0, 1, 0, 1, 0.1, torch.Generator(), "x")


# ---------------------------------------------------------------------------------------------- inversion


def test_bbti_loss_reaches_the_trigger(pair):
    """The public BBTI code's loss never reached the trigger; here its gradient does, and one step moves it."""
    from sealdiff.detection.diffcleanse import bbti_loss

    _, bd = pair
    detector = get_detector("diff-cleanse").make(progress=False)
    p = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for stochastic in (True, False):
        p.grad = None
        bbti_loss(bd, bd.unet, noise, detector.trigger_of(bd, p), 3, stochastic, torch.Generator().manual_seed(2)).backward()
        assert p.grad is not None and p.grad.abs().sum() > 0
    before = p.detach().clone()
    torch.optim.Adam([p], lr=0.1).step()
    assert not torch.equal(before, p.detach())
    bd.unet.zero_grad(set_to_none=True)
    # the detector's own inversion moves the trigger and never trains (nor leaves gradients on) the model
    weights = {k: v.clone() for k, v in bd.unet.state_dict().items()}
    for init in ("random", "ratio"):
        trigger, losses = get_detector("diff-cleanse").make(progress=False, init=init, epochs=3, batch=2,
                                                            grad_steps=2).invert(bd)
        assert len(losses) == 3 and trigger.abs().sum() > 0
        assert all(q.grad is None and q.requires_grad for q in bd.unet.parameters())
        assert all(torch.equal(v, bd.unet.state_dict()[k]) for k, v in weights.items())


# Elijah's and DiffDefend's inversions miss the micro model's backdoor: at T its ε̂ carries 0.57 of the true
# trigger r (response ratio, `common.response_ratios`; BadDiffusion's λ = 0.5) and its clean twin already 0.62, so
# neither the distribution-shift fit (shift 0.60·r vs 0.58·r) nor the ratio search singles r out, and their searches
# at T/2 and on scaled noise land elsewhere too (measured: 0 % attack success with their inverted triggers; the
# 16x16 zoo models do show it, see README). Strict xfail: the
# test starts failing loudly as soon as they do recover the trigger.
SPURIOUS = pytest.mark.xfail(strict=True, reason="the micro backdoor is not distinct in ε̂ at T, and the other searches miss it too")


@pytest.mark.parametrize("name", [pytest.param(n, marks=SPURIOUS) if n != "diff-cleanse" else n for n in DETECTORS])
def test_inverted_trigger_drives_the_backdoor_and_not_a_clean_model(name, scans, pair):
    clean, bd = pair
    bd_scan, clean_scan = scans[name]["backdoored"], scans[name]["clean"]
    # the inversion was never given the trigger, yet its trigger fires the backdoor on fresh noise
    assert M.attack_success(bd, bd_scan.trigger, steps=20) >= 0.6
    assert M.attack_success(bd, torch.zeros(3, 8, 8), steps=20) == 0.0
    # the clean model's inverted trigger does not draw the target
    assert M.attack_success(clean, clean_scan.trigger, steps=20) == 0.0
    # and the detector's score separates the two models
    assert bd_scan.score > clean_scan.score
    assert bd_scan.trigger.shape == (3, 8, 8) and torch.isfinite(bd_scan.trigger).all()


class ShiftedUNet(torch.nn.Module):
    """A stand-in UNet whose ε̂(x, T) = x − 0.5·r: the distribution shift Elijah models, planted exactly."""

    def __init__(self, base, shift: torch.Tensor) -> None:
        super().__init__()
        self.base, self.shift = base, shift
        self.config = base.config

    def forward(self, x, t):
        return type("Out", (), {"sample": x - 0.5 * self.shift})()


def test_elijah_recovers_a_planted_distribution_shift(pair):
    """On a model whose noise prediction at T is shifted by exactly −(1−λ)·r, min ‖mean_b ε̂(ε_b+τ) − λτ‖₁ has the
    unique solution τ = r − 2·mean_b ε_b (= r up to the batch's noise mean): the inversion, never given r, must find
    it (and −2·mean_b ε_b ≈ 0 for the unshifted model)."""
    import dataclasses

    from sealdiff.detection.elijah import ElijahDetector

    clean, _ = pair
    r = M.trigger()
    detector = get_detector("elijah").make(progress=False, objective="paper", epochs=300, batch=16, lr=0.05)
    batch_mean = C.noise_like(clean, 16, torch.Generator().manual_seed(detector.config.seed)).mean(0)
    for shift in (r, torch.zeros_like(r)):
        model = dataclasses.replace(clean, unet=ShiftedUNet(clean.unet, shift))
        u, losses = ElijahDetector.invert(detector, model)
        assert losses[-1] < losses[0] / 10
        assert (u - (shift - 2 * batch_mean)).abs().max() < 0.1, (u - (shift - 2 * batch_mean)).abs().max()


class ProjectingUNet(torch.nn.Module):
    """A stand-in UNet whose ε̂(x) = x − gain·proj_r(x): it under-carries (gain > 0) or over-carries (gain < 0) an
    offset along r, so the response ratio of a direction u is b_T·(1 − gain·cos²(u, r)), extreme along r."""

    def __init__(self, base, r: torch.Tensor, gain: float) -> None:
        super().__init__()
        self.base, self.r, self.gain = base, r / r.norm(), gain
        self.config = base.config

    def forward(self, x, t):
        along = (x * self.r).flatten(1).sum(1).view(-1, 1, 1, 1) * self.r
        return type("Out", (), {"sample": x - self.gain * along})()


def zero_mean(r: torch.Tensor) -> torch.Tensor:
    return r - r.mean(dim=(-2, -1), keepdim=True)


def test_response_ratio_is_one_for_an_identity_model_and_measures_a_planted_gain(pair):
    import dataclasses

    clean, _ = pair
    r = zero_mean(M.trigger())
    lv = C.level(clean, 1.0)
    noise = C.noise_like(clean, 4, torch.Generator().manual_seed(0))
    other = zero_mean(torch.randn(1, *r.shape, generator=torch.Generator().manual_seed(1)))
    u = torch.cat([r.unsqueeze(0), other])
    identity = C.response_ratios(clean, ProjectingUNet(clean.unet, r, 0.0), noise, u, lv)
    assert identity == pytest.approx([lv.b, lv.b], rel=1e-4)
    model = dataclasses.replace(clean, unet=ProjectingUNet(clean.unet, r, 0.5))
    planted = C.response_ratios(model, model.unet, noise, u, lv)
    cos2 = float(torch.nn.functional.cosine_similarity(other.flatten(), r.flatten(), dim=0) ** 2)
    assert planted.tolist() == pytest.approx([lv.b * 0.5, lv.b * (1 - 0.5 * cos2)], rel=1e-3)


@pytest.mark.parametrize(("gain", "direction"), [(0.5, "min"), (-0.5, "max")])
@pytest.mark.parametrize("coarse", [0, 4])
def test_response_ratio_search_recovers_a_planted_direction(pair, gain, direction, coarse):
    """Never given r, the search finds the direction the model under-carries (min) or over-carries (max); a
    search in the wrong direction does not."""
    import dataclasses

    clean, _ = pair
    r = zero_mean(M.trigger())
    model = dataclasses.replace(clean, unet=ProjectingUNet(clean.unet, r, gain))

    def best_cos(direction):
        u, ratios, losses = C.search_response_ratio(model, 1.0, direction, 2.0, restarts=3, coarse=coarse, epochs=40,
                                                    fine_epochs=40, batch=4, lr=0.1,
                                                    generator=torch.Generator().manual_seed(0), description="test",
                                                    progress=False)
        assert u.shape == (3, *r.shape) and u.flatten(1).norm(dim=1) == pytest.approx([2.0] * 3, rel=1e-4)
        pick = int(ratios.argmin() if direction == "min" else ratios.argmax())
        return float(torch.nn.functional.cosine_similarity(u[pick].flatten(), r.flatten(), dim=0).abs())

    assert best_cos(direction) > 0.9
    assert best_cos("max" if direction == "min" else "min") < 0.5


def test_diff_cleanse_ratio_init_starts_bbti_at_the_searched_direction(pair):
    import dataclasses

    from sealdiff.detection.diffcleanse import DiffCleanseDetector

    clean, _ = pair
    r = zero_mean(M.trigger())
    model = dataclasses.replace(clean, unet=ProjectingUNet(clean.unet, r, 0.5))
    detector = get_detector("diff-cleanse").make(progress=False, init="ratio", epochs=1, lr=1e-4, batch=2, grad_steps=2)
    trigger, _ = DiffCleanseDetector.invert(detector, model, "stochastic")
    assert float(torch.nn.functional.cosine_similarity(trigger.flatten(), r.flatten(), dim=0).abs()) > 0.9
    random_start, _ = DiffCleanseDetector.invert(get_detector("diff-cleanse").make(
        progress=False, init="random", epochs=1, lr=1e-4, batch=2, grad_steps=2), model, "stochastic")
    assert float(torch.nn.functional.cosine_similarity(random_start.flatten(), r.flatten(), dim=0).abs()) < 0.5
    # the start search takes the detector's own restarts and steps (Elijah's defaults unless set)
    short = get_detector("diff-cleanse").make(progress=False, start_restarts=2, start_epochs=3)
    expected, _, losses = C.best_ratio_trigger(model, ElijahConfig(restarts=2, epochs=3, fine_epochs=3), 1.0, "min",
                                               torch.Generator().manual_seed(0), "x", False)
    assert len(losses) == 6
    torch.testing.assert_close(short.ratio_trigger(model, "stochastic", torch.Generator().manual_seed(0)), expected)


def test_scaled_noise_search_finds_the_trojdiff_trigger():
    """TrojDiff's trojan input is x_T = γ·ε + τ (zoo model: γ = 0.6): the ratio search on γ-scaled noise recovers τ's
    direction (the true τ is read only to check), the search on unscaled noise does not, and the γ-scaled samples
    from the found trigger draw the target."""
    from sealdiff.detection import load_for_scan
    from sealdiff.metrics import uncond as U

    model, directory = load_for_scan("zoo:uncond-ddpm-trojdiff-blend-inclass")
    backdoor = U.read_backdoor(directory)
    settings = get_detector("diffdefend").make(progress=False, restarts=8, epochs=50, fine_epochs=50).config

    def cosine(gamma):
        found, _, _ = C.best_ratio_trigger(model, settings, 1.0, "min", torch.Generator().manual_seed(0), "t", False,
                                           gamma)
        return float((found * backdoor.trigger).sum() / found.norm() / backdoor.trigger.norm()), found

    scaled, found = cosine(backdoor.gamma)
    assert scaled > 0.9
    assert cosine(1.0)[0] < 0.5
    hits = U.attack_success(model, U.Backdoor(trigger=found, target=backdoor.target, gamma=backdoor.gamma), "ddpm",
                            20, count=16)
    assert hits.attack_success >= 0.9


def test_elijah_scan_finds_the_trojdiff_trigger_on_scaled_noise():
    """Elijah's default scan searches at T on ε + τ and on γ·ε + τ (γ = 0.6): on the zoo's TrojDiff model the scaled
    search's candidate (never given the true τ) is the one whose samples collapse, so the scan reports it with its
    γ, calls the model backdoored, and the trigger fires the backdoor the trojan way."""
    from sealdiff.detection import load_for_scan
    from sealdiff.metrics import uncond as U

    model, directory = load_for_scan("zoo:uncond-ddpm-trojdiff-blend-inclass")
    backdoor = U.read_backdoor(directory)
    result = get_detector("elijah").make(progress=False, epochs=50, fine_epochs=50, samples=12).scan(model)
    assert result.noise_scale == 0.6 and result.backdoored, (result.noise_scale, result.score)
    hits = U.attack_success(model, U.Backdoor(trigger=result.trigger, target=backdoor.target, gamma=0.6), "ddpm", 20,
                            count=16)
    assert hits.attack_success >= 0.9


def test_elijah_scan_finds_the_ode_backdoor_along_the_chain():
    """VillanDiffusion's ODE backdoor carries its trigger at T as a clean model carries noise, so a search at T
    alone misses it (README: Elijah's score 0.05 before `chain_fracs`); the default search for the highest ratio at
    T/2 finds a trigger (never given the true one) that fires it under DDIM."""
    from sealdiff.detection import load_for_scan
    from sealdiff.metrics import uncond as U

    model, directory = load_for_scan("zoo:uncond-ddpm-villan-ode-stop-shift")
    backdoor = U.read_backdoor(directory)
    result = get_detector("elijah").make(progress=False, noise_scales=[1.0], epochs=50, fine_epochs=50, restarts=4,
                                         samples=16, samplers=["ddim"]).scan(model)
    # clean zoo models: ≤ 0.06 at this search, ≤ 0.26 over the default scan's searches
    assert result.scores["collapse"] >= 0.3, result.scores
    hits = U.attack_success(model, U.Backdoor(trigger=result.trigger, target=backdoor.target), "ddim", 20, count=16)
    assert hits.attack_success >= 0.5, hits.attack_success


@pytest.mark.parametrize("name, fields", [("elijah", {"noise_scales": [0.6], "chain_fracs": []}), ("diffdefend", {"searches": ["1.0:min:0.6"]})])
def test_scaled_noise_searches_alone_refuse_a_ve_model(name, fields):
    from sealdiff.detection import load_for_scan

    model, _ = load_for_scan("zoo:uncond-ncsn-clean")
    with pytest.raises(SealdiffError, match="add one with γ = 1"):
        get_detector(name).make(progress=False, **fields).scan(model)


def test_diff_cleanse_trojan_chain_finds_the_trojdiff_trigger():
    """Diff-Cleanse's default scan through the trojan chain (ancestral sampling from γ·ε + τ, step noise scaled by γ)
    on the zoo's TrojDiff model: its trigger, never given, collapses the γ-scaled samples and fires the backdoor; the
    scan reports γ (removal needs it) and the better of BBTI's start and end; the same trigger sampled the unscaled
    way collapses nothing (why the chain exists)."""
    from sealdiff.detection import load_for_scan
    from sealdiff.metrics import uncond as U

    model, directory = load_for_scan("zoo:uncond-ddpm-trojdiff-blend-inclass")
    backdoor = U.read_backdoor(directory)
    detector = get_detector("diff-cleanse").make(progress=False, chains=["trojan"], epochs=5, samples=16)
    result = detector.scan(model)
    assert result.noise_scale == 0.6 and result.config["chosen_chain"] == "trojan"
    assert result.score == max(result.scores["mscr_trojan_start"], result.scores["mscr_trojan_end"]) >= 0.9
    assert result.backdoored
    hits = U.attack_success(model, U.Backdoor(trigger=result.trigger, target=backdoor.target, gamma=backdoor.gamma),
                            "ddpm", 20, count=16)
    assert hits.attack_success >= 0.9
    assert detector.statistics(model, result.trigger, "stochastic")["mscr"] < 0.3


def test_scan_result_is_reproducible(pair):
    _, bd = pair
    detector = get_detector("elijah").make(progress=False, epochs=5, batch=8, samples=4, samplers=["ddpm"],
                                           sample_steps=3)
    a, b = detector.scan(bd), detector.scan(bd)
    assert torch.equal(a.trigger, b.trigger) and a.scores == b.scores



def test_diffdefend_scan_reuses_the_statistics_of_the_search_it_picked(scans, pair):
    """The searches measure each candidate to pick one; the scan reports the winner's statistics without sampling
    again — they must be those of the trigger it returns (a fresh measurement gives the same numbers)."""
    _, bd = pair
    result = scans["diffdefend"]["backdoored"]
    fresh = get_detector("diffdefend").make(progress=False, **FAST["diffdefend"]).statistics(bd, result.trigger,
                                                                                              result.noise_scale)
    assert result.scores == pytest.approx(fresh, rel=1e-5, abs=1e-6)
    assert result.score == result.scores["dual"]

# ---------------------------------------------------------------------------------------------- CLI


def test_cli_scan_writes_verdict_trigger_and_run_info(tmp_path):
    model = M.ASSETS / "backdoored"
    before = directory_sha256(model)
    out = tmp_path / "scan"
    assert main(["scan", str(model), "-o", str(out), "--method", "elijah", "--epochs", "3", "--sampler", "ddpm",
                 "--seed", "4"]) == 0
    assert directory_sha256(model) == before  # the input is untouched
    summary = json.loads((out / "scan.json").read_text())
    assert summary["verdict"] in ("clean", "backdoored") and "collapse" in summary["scores"]
    info = json.loads((out / "sealdiff.json").read_text())
    assert info["parent"]["sha256"] == before and info["config"]["seed"] == 4 and "torch" in info["versions"]
    assert (out / "trigger.png").stat().st_size > 0
    from sealdiff.defenses.uncond import load_trigger

    trigger, noise_scale = load_trigger(out)
    assert trigger.shape == (3, 8, 8) and noise_scale == summary["noise_scale"] == 1.0
    assert not list(tmp_path.glob(".scan.partial-*"))
    assert main(["scan", str(model), "-o", str(out)]) == 2  # exists, no --overwrite


def test_cli_scan_all_runs_every_detector_into_its_own_folder(tmp_path):
    """`--method all`: one scan per detector in OUTPUT/METHOD/, each configured by its section of the config file
    (flags win over the file), and the report takes them side by side."""
    from sealdiff.detection import DETECTORS

    model = M.ASSETS / "backdoored"
    tiny = {"epochs": 2, "fine_epochs": 2, "restarts": 2, "samples": 8, "sample_steps": 5}
    sections = {"elijah": tiny | {"epochs": 50}, "diffdefend": tiny | {"threshold": 0.01},
                "diff-cleanse": {"start_restarts": 2, "start_epochs": 2, "epochs": 2, "batch": 4, "grad_steps": 3,
                                 "samples": 8, "sample_steps": 5}}
    cfg = tmp_path / "all.json"
    cfg.write_text(json.dumps(sections))
    out = tmp_path / "scans"
    assert main(["scan", str(model), "-o", str(out), "--method", "all", "--config", str(cfg), "--epochs", "2",
                 "--seed", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(DETECTORS)
    for name in DETECTORS:
        info = json.loads((out / name / "sealdiff.json").read_text())
        assert info["method"] == name and info["config"]["seed"] == 3 and info["config"]["epochs"] == 2
        assert (out / name / "trigger.safetensors").is_file() and (out / name / "grid_ddpm_inverted.png").is_file()
    assert json.loads((out / "diffdefend" / "scan.json").read_text())["threshold"] == 0.01
    assert main(["report", *(str(out / name) for name in DETECTORS), "-o", str(tmp_path / "scans.html")]) == 0
    assert (tmp_path / "scans.html").read_text().count("<b>") >= len(DETECTORS)  # a verdict per scan


def _one_line(code: int, err: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sealdiff: error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("args, message", [
    (lambda t: ["scan", str(t / "missing"), "-o", str(t / "o")], "does not exist"),
    (lambda t: ["scan", str(M.ASSETS / "backdoored"), "-o", str(t / "o"), "--method", "nope"], "valid: elijah"),
    (lambda t: ["scan", str(M.ASSETS / "backdoored"), "-o", str(t / "o"), "--method", "all", "--threshold", "0.3"],
     "set it per method"),
    (lambda t: ["scan", str(M.ASSETS / "backdoored"), "-o", str(t / "o"), "--method", "all", "--sampler", "ddpm"],
     "--sampler applies to elijah and diffdefend"),
    (lambda t: ((t / "all.json").write_text('{"elijahh": {}}'),
                ["scan", str(M.ASSETS / "backdoored"), "-o", str(t / "o"), "--method", "all", "--config",
                 str(t / "all.json")])[1], "unknown ['elijahh']; valid: elijah, diff-cleanse, diffdefend"),
    (lambda t: ["scan", str(M.ASSETS / "backdoored"), "-o", str(t / "o"), "--sampler", "sde-ve"], "does not apply"),
    (lambda t: ["scan", str(M.ASSETS / "backdoored"), "-o", str(t / "o"), "--epochs", "0"], "epochs"),
    (lambda t: ["scan", str(M.ASSETS / "backdoored"), "-o", str(M.ASSETS / "backdoored" / "x")], "overwrite the input"),
    (lambda t: ["scan", str(t), "-o", str(t / "o")], "model_index.json"),
])
def test_cli_scan_bad_input_is_one_line(args, message, tmp_path, capsys):
    before = directory_sha256(M.ASSETS)
    capsys.readouterr()
    code = main(args(tmp_path))
    err = capsys.readouterr().err
    _one_line(code, err)
    assert message in err
    assert not (tmp_path / "o").exists()
    assert directory_sha256(M.ASSETS) == before


def test_cli_scan_refuses_a_text_to_image_pipeline(tiny_pipe_dir, tmp_path, capsys):
    capsys.readouterr()
    code = main(["scan", str(tiny_pipe_dir), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    _one_line(code, err)
    assert "StableDiffusionPipeline" in err
