"""Where the models run (`--device`, `models.loading.resolve_device`, `models.uncond.unet_output`).

The unconditional models' modules may sit on any device and in any float dtype; sealdiff's own tensors stay on the CPU and cross to the
modules' placement at each UNet / autoencoder call. The CI machines' only device is the CPU, so the crossing is
checked through the dtype it carries too: a model held in float64 must be handed float64 at every call (a call that
skipped the crossing hands it float32, which its convolutions refuse) and must give the float32 model's results to
float32 precision, in float32 on the caller's device. The same tests run on a CUDA device where there is one
(`pytest tests/test_devices.py -k cuda`); they have not yet run on one."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sealdiff.attacks import ATTACKS
from sealdiff.defenses import get_defense
from sealdiff.defenses.uncond import UNCOND_METHODS
from sealdiff.detection import get_detector
from sealdiff.errors import SealdiffError
from sealdiff.io import directory_sha256
from sealdiff.models.loading import resolve_device
from sealdiff.models.uncond import ODE_SAMPLERS, placement, sample, sample_noise, save_uncond, tiny_uncond

from test_bad_inputs import assert_one_line_error, run_cli
from test_published_layouts import REMOVE, SCAN


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (this project's CI is CPU-only)")
PLACEMENTS = [pytest.param(torch.float64, id="float64"), pytest.param(torch.device("cuda"), id="cuda", marks=CUDA)]


@pytest.fixture(autouse=True)
def _exact_cuda_float32():
    """CUDA convolutions in full float32 (TF32 would differ from the CPU in the third digit)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _pair(kind: str, where):
    """The same tiny model on the CPU in float32, and moved to `where` (a dtype or a device)."""
    model = tiny_uncond(kind, channels=(8, 16))
    return model, copy.deepcopy(model).to(where)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return a.dtype == b.dtype and a.device == b.device and torch.allclose(a, b.to(a.dtype), atol=atol)


@pytest.mark.parametrize("where", PLACEMENTS)
@pytest.mark.parametrize("kind", ["ddpm", "ncsn", "ldm"])
def test_sampling_and_the_autoencoder_run_in_the_modules_placement(kind, where):
    single, moved = _pair(kind, where)
    noise = sample_noise(single, 3, torch.Generator().manual_seed(0))
    for sampler in single.samplers:
        images = [sample(m, noise, sampler, steps=2, generator=torch.Generator().manual_seed(1))
                  for m in (single, moved)]
        assert images[1].dtype == torch.float32 and images[1].device == noise.device, sampler
        # a device gets the same float32 step noise (drawn on the CPU); float64 stock steps draw their own
        if sampler in ODE_SAMPLERS or isinstance(where, torch.device):
            assert _close(images[0], images[1], 1e-3), sampler
    if kind == "ldm":
        pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
        latents = [m.encode(pixels) for m in (single, moved)]
        assert _close(latents[0], latents[1], 1e-5)
        assert _close(single.decode(latents[0]), moved.decode(latents[0]), 1e-5)


@pytest.mark.parametrize("where", PLACEMENTS)
@pytest.mark.parametrize("kind", ["ddpm", "ncsn", "ldm"])
def test_scans_removals_and_attacks_run_in_the_modules_placement(kind, where):
    """The inversions' losses agree, and so do the first losses of a removal and an attack (taken before any update;
    later ones drift apart as Adam scales tiny gradient differences up). The inverted triggers are not compared: a
    detector picks among candidates by samples of the stock stochastic samplers, which draw in the model's dtype."""
    for method, (defense, detector) in UNCOND_METHODS.items():
        single, moved = _pair(kind, where)
        config = dict(SCAN[detector], **({"samplers": list(single.samplers[:1])} if detector != "diff-cleanse" else {}))
        scans = [get_detector(detector).make(**config).scan(m) for m in (single, moved)]
        assert scans[1].losses == pytest.approx(scans[0].losses, rel=1e-3, abs=1e-6), method
        assert scans[1].trigger.dtype == torch.float32 and torch.isfinite(scans[1].trigger).all()
        spec = get_defense(defense)
        where_before = placement(moved.unet)
        losses = [spec.runner(spec.make_config(**REMOVE)).apply(m, scans[0].trigger, noise_scale=scans[0].noise_scale)
                  .losses[0] for m in (single, moved)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-4), method
        assert placement(moved.unet) == where_before  # the removal kept the model there
    single, moved = _pair(kind, where)
    attack_cls, config_cls = ATTACKS["baddiffusion" if kind == "ddpm" else "villandiffusion"]
    losses = [attack_cls(config_cls(steps=2, batch_size=2)).run(m)[1].losses[0] for m in (single, moved)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    seen = torch.accelerator.current_accelerator(check_available=True)
    assert resolve_device("auto") == resolve_device(None) == (torch.device(seen) if seen else torch.device("cpu"))
    with pytest.raises(SealdiffError, match="'gpu' is invalid; valid: auto, cpu"):
        resolve_device("gpu")
    with pytest.raises(SealdiffError, match="is not available here"):
        resolve_device("cuda:64")  # more devices than any machine here has


@pytest.mark.parametrize("command", [
    lambda model, out: ["scan", model, "-o", out],
    lambda model, out: ["remove", model, "-o", out, "--method", "elijah"],
    lambda model, out: ["attack", "baddiffusion", model, "-o", out, "--steps", "1"],
])
@pytest.mark.parametrize("device, message", [("gpu", "is invalid"), ("cuda:64", "is not available here")])
def test_cli_refuses_a_device_it_cannot_use_in_one_line(command, device, message, tmp_path, capsys):
    model = tmp_path / "model"
    save_uncond(tiny_uncond("ddpm", channels=(8, 16)), model)
    before = directory_sha256(model)
    code, _, err = run_cli([*command(str(model), str(tmp_path / "out")), "--device", device], capsys)
    assert_one_line_error(code, err)
    assert message in err and not (tmp_path / "out").exists() and directory_sha256(model) == before


@pytest.mark.parametrize("command", [
    lambda out: ["eval", "zoo:t2i-badt2i-pixel", "-o", out, "--count", "2"],
    lambda out: ["generate", "zoo:t2i-clean", "-p", "a red circle", "-o", f"{out}.png"],
    lambda out: ["attack", "badt2i", "zoo:t2i-clean", "-o", out, "--steps", "1"],
])
def test_text_to_image_commands_refuse_a_device_they_cannot_use(command, tmp_path, capsys):
    code, _, err = run_cli([*command(str(tmp_path / "out")), "--device", "cuda:64"], capsys)
    assert_one_line_error(code, err)
    assert "is not available here" in err and not any(tmp_path.iterdir())


def test_eval_config_records_the_resolved_device():
    from sealdiff.metrics.evaluate import EvalConfig

    assert EvalConfig(device="CPU").device == "cpu"
    assert EvalConfig().device == str(resolve_device("auto"))
    with pytest.raises(SealdiffError, match="'tpu0' is invalid"):
        EvalConfig(device="tpu0")


def test_text_to_image_removal_takes_auto_or_cpu_only(tmp_path, capsys):
    code, _, err = run_cli(["remove", "zoo:t2i-badt2i-pixel", "-o", tmp_path / "out", "--method", "skd",
                            "--device", "cuda"], capsys)
    assert_one_line_error(code, err)
    assert "accelerate launch" in err and not (tmp_path / "out").exists()


def test_cli_records_the_device(tmp_path):
    from sealdiff.cli import main

    model = tmp_path / "model"
    save_uncond(tiny_uncond("ddpm", channels=(8, 16)), model)
    cfg = tmp_path / "scan.json"
    cfg.write_text(json.dumps(SCAN["elijah"] | {"samplers": ["ddim"]}))
    assert main(["scan", str(model), "-o", str(tmp_path / "scan"), "--config", str(cfg), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "scan" / "sealdiff.json").read_text())["device"] == "cpu"


def test_env_shows_where_auto_runs(capsys):
    from sealdiff.cli import main

    assert main(["env"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "--device auto" in line)
    assert str(resolve_device("auto")) in row
