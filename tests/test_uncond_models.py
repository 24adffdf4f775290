"""Unconditional models (models/uncond.py): every sampler on every kind it applies to, from the given noise;
stock directory layouts; save/load round trips; untrusted-input refusals."""

import json

import pytest
import torch

from sealdiff.errors import SealdiffError
from sealdiff.models import uncond
from sealdiff.models.uncond import SAMPLERS, load_uncond, sample, sample_noise, save_uncond, tiny_uncond

KINDS = ("ddpm", "ncsn", "ldm")
CASES = [(kind, s) for kind in KINDS for s in SAMPLERS[kind]]


@pytest.fixture(scope="module")
def models():
    built = {kind: tiny_uncond(kind, channels=(8, 16), seed=0) for kind in KINDS}
    built["ldm-vq"] = tiny_uncond("ldm", channels=(8, 16), seed=0, autoencoder="vq")  # the published LDMs' kind
    return built


@pytest.mark.parametrize("kind,sampler", CASES)
def test_every_sampler_starts_from_the_given_noise(models, kind, sampler):
    model = models[kind]
    noise = sample_noise(model, 2, torch.Generator().manual_seed(0))
    a = sample(model, noise, sampler, steps=3, generator=torch.Generator().manual_seed(1))
    b = sample(model, noise, sampler, steps=3, generator=torch.Generator().manual_seed(1))
    other = sample(model, noise + 1.0, sampler, steps=3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 16, 16)
    assert a.min() >= -1 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b)  # seeded: reproducible
    assert not torch.allclose(a, other)  # the output depends on the noise it was given


def test_sample_shapes_and_prior_scale(models):
    assert models["ddpm"].sample_shape == (3, 16, 16)
    assert models["ldm"].sample_shape == (4, 8, 8) and models["ldm"].image_size == 16
    ncsn = models["ncsn"]
    noise = sample_noise(ncsn, 64, torch.Generator().manual_seed(0))
    assert abs(noise.std().item() - ncsn.sigma_max) / ncsn.sigma_max < 0.05
    assert abs(sample_noise(models["ddpm"], 64, torch.Generator().manual_seed(0)).std().item() - 1) < 0.05


def test_every_sampler_uses_the_models_noise_schedule(models):
    """from_config must carry the model's betas (a `_use_default_values` entry once made Heun fall back to
    Stable Diffusion's betas)."""
    model = models["ddpm"]
    for name in SAMPLERS["ddpm"]:
        scheduler = uncond.make_scheduler(model, name)
        assert torch.allclose(scheduler.betas, model.scheduler.betas), name


@pytest.mark.parametrize("kind,sampler", [("ddpm", "sde-ve"), ("ldm", "sde-ve"), ("ncsn", "ddim"), ("ncsn", "heun")])
def test_sampler_that_does_not_apply_is_refused_with_the_valid_ones(models, kind, sampler):
    noise = sample_noise(models[kind], 1)
    with pytest.raises(SealdiffError, match="valid: " + ", ".join(SAMPLERS[kind]).replace("+", r"\+")):
        sample(models[kind], noise, sampler, steps=2)


def test_bad_noise_shape_and_steps_are_refused(models):
    with pytest.raises(SealdiffError, match="noise has shape"):
        sample(models["ldm"], torch.randn(1, 3, 16, 16), "ddim", steps=2)
    with pytest.raises(SealdiffError, match="steps"):
        sample(models["ddpm"], torch.randn(1, 3, 16, 16), "ddim", steps=0)
    with pytest.raises(SealdiffError, match="valid: ddpm, ncsn, ldm"):
        tiny_uncond("gan")


@pytest.mark.parametrize("name", KINDS + ("ldm-vq",))
def test_save_load_round_trip_and_stock_layout(models, name, tmp_path):
    from diffusers import DiffusionPipeline

    model = models[name]
    kind = model.kind
    save_uncond(model, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == uncond.PIPELINE_CLASS[kind]
    assert not list((tmp_path / "m").rglob("*.bin"))
    loaded = load_uncond(tmp_path / "m")
    assert loaded.kind == kind and loaded.sample_shape == model.sample_shape
    assert type(loaded.vae) is type(model.vae)
    noise = sample_noise(model, 2, torch.Generator().manual_seed(0))
    for name in SAMPLERS[kind]:
        a = sample(model, noise, name, steps=2, generator=torch.Generator().manual_seed(3))
        b = sample(loaded, noise, name, steps=2, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b), name
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "m", local_files_only=True)  # stock diffusers loads it
    assert type(pipe).__name__ == uncond.PIPELINE_CLASS[kind]


def test_pickle_weights_are_refused_unless_allowed(models, tmp_path):
    from safetensors.torch import load_file

    save_uncond(models["ddpm"], tmp_path / "m")
    unet = tmp_path / "m" / "unet"
    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SealdiffError, match="refusing pickle-based weights"):
        load_uncond(tmp_path / "m")
    assert load_uncond(tmp_path / "m", allow_pickle=True).kind == "ddpm"


def test_code_running_pickle_is_refused_even_when_allowed(models, tmp_path):
    save_uncond(models["ddpm"], tmp_path / "m")
    unet = tmp_path / "m" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    torch.save({"x": Evil()}, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(SealdiffError, match="weights_only=True"):
        load_uncond(tmp_path / "m", allow_pickle=True)


def test_load_refuses_other_pipelines_and_broken_directories(models, tmp_path, base_model):
    with pytest.raises(SealdiffError, match="valid unconditional pipelines"):
        load_uncond(base_model)
    with pytest.raises(SealdiffError, match="does not exist"):
        load_uncond(tmp_path / "missing")
    save_uncond(models["ldm"], tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SealdiffError, match="valid: \\['diffusers', 'UNet2DModel'\\]"):
        load_uncond(tmp_path / "m")


@pytest.mark.parametrize("command, pointer", [(["eval", "--judge", "j"], "takes --count, --sampler"),
                                              (["generate", "-p", "a prompt"], "takes --count, --sampler"),
                                              (["attack", "badt2i"], "`sealdiff scan`")])
def test_text_to_image_options_point_an_unconditional_model_elsewhere(models, tmp_path, command, pointer, capsys):
    from sealdiff.cli import main

    save_uncond(models["ddpm"], tmp_path / "m")
    args = command[:2] if command[0] == "attack" else command[:1]
    assert main([*args, str(tmp_path / "m"), *command[len(args):], "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a DDPMPipeline" in err and pointer in err
    assert not (tmp_path / "out").exists()


def test_load_refuses_a_class_conditional_unet(models, tmp_path):
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, num_class_embeds=10)
    DDPMPipeline(unet=unet, scheduler=models["ddpm"].scheduler).save_pretrained(tmp_path / "m")
    with pytest.raises(SealdiffError, match="class-conditional \\(num_class_embeds 10\\).*valid: an unconditional"):
        load_uncond(tmp_path / "m")


@pytest.mark.parametrize("size", [None, [16, 8], 0])
def test_load_refuses_a_unet_without_one_square_sample_size(models, tmp_path, size):
    save_uncond(models["ddpm"], tmp_path / "m")
    config_file = tmp_path / "m" / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["sample_size"] = size
    config_file.write_text(json.dumps(config))
    with pytest.raises(SealdiffError, match="sample_size is .*; .*valid: a positive integer"):
        load_uncond(tmp_path / "m")
    config["sample_size"] = [16, 16]  # a pair of equal sides loads
    config_file.write_text(json.dumps(config))
    assert load_uncond(tmp_path / "m").sample_shape == (3, 16, 16)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_load_refuses_a_vp_model_that_does_not_predict_noise(models, tmp_path, prediction, capsys):
    """Our own losses read the UNet's output as ε: a v- or x0-prediction DDPM is refused, not silently misread."""
    from sealdiff.cli import main

    save_uncond(models["ddpm"], tmp_path / "m")
    config_file = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": prediction}))
    with pytest.raises(SealdiffError, match=f"prediction_type '{prediction}'.*valid: epsilon"):
        load_uncond(tmp_path / "m")
    assert main(["scan", str(tmp_path / "m"), "-o", str(tmp_path / "scan")]) == 2
    assert "valid: epsilon" in capsys.readouterr().err and not (tmp_path / "scan").exists()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_loop_matches_the_stock_pipeline(models, sampler):
    """Our loop from given noise reproduces DDPMPipeline / DDIMPipeline (same noise, same step noise)."""
    from diffusers import DDIMPipeline, DDPMPipeline

    model = models["ddpm"]
    scheduler = uncond.make_scheduler(model, sampler)
    cls = DDPMPipeline if sampler == "ddpm" else DDIMPipeline
    pipe = cls(unet=model.unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"eta": 0.0} if sampler == "ddim" else {}
    stock = pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=3,
                 output_type="np", **kwargs).images  # (B, H, W, C) in [0, 1]
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn((2, *model.sample_shape), generator=generator)
    ours = sample(model, noise, sampler, steps=3, generator=generator)
    ours = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - stock).max() < 1e-5


@pytest.mark.parametrize("name", ["ldm", "ldm-vq"])
def test_latent_loop_matches_the_stock_ldm_pipeline(models, name):
    """LDMPipeline (DDIM, η = 0) from the same noise: our loop and decode agree with it for a KL and a VQ
    autoencoder, with a scaling factor other than 1 (the stock pipeline divides by it and a VQModel quantizes)."""
    import copy

    from diffusers import LDMPipeline

    model = copy.deepcopy(models[name])
    model.vae.register_to_config(scaling_factor=0.5)
    pipe = LDMPipeline(vqvae=model.vae, unet=model.unet, scheduler=uncond.make_scheduler(model, "ddim"))
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=3, eta=0.0,
                 output_type="np").images
    noise = torch.randn((2, *model.sample_shape), generator=torch.Generator().manual_seed(4))
    ours = ((sample(model, noise, "ddim", steps=3) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - stock).max() < 1e-5


def test_vq_latents_are_taken_before_quantization(models):
    """encode returns a VQModel's continuous latents (scaled), which its decode quantizes: a one-pixel nudge of a
    latent moves the encoding but not necessarily the decoded image, and decoding any latent lands on the codebook."""
    model = models["ldm-vq"]
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = model.vae.encode(images).latents * model.vae.config.scaling_factor
        quantized = model.vae.quantize(expected / model.vae.config.scaling_factor)[0]
    latents = model.encode(images)
    torch.testing.assert_close(latents, expected)
    assert not torch.allclose(latents, quantized)  # continuous, not snapped to the codebook
    with torch.no_grad():
        torch.testing.assert_close(model.decode(latents), model.decode(quantized))


@pytest.mark.parametrize("sampler,corrector_steps", [("sde-ve", 1), ("sde-ve-predictor", 0)])
def test_sde_ve_loop_matches_the_stock_pipeline(models, sampler, corrector_steps):
    from diffusers import ScoreSdeVePipeline

    model = models["ncsn"]
    scheduler = uncond.make_scheduler(model, sampler)
    assert scheduler.config.correct_steps == corrector_steps
    pipe = ScoreSdeVePipeline(unet=model.unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=3,
                 output_type="np").images
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn((2, *model.sample_shape), generator=generator) * model.sigma_max
    ours = sample(model, noise, sampler, steps=3, generator=generator)
    ours = ((ours + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert abs(ours - stock).max() < 1e-5


def test_step_noise_scale_reaches_the_ancestral_steps(models):
    """Scale 1 is the stock DDPM step (its noise follows the generator); scale 0 leaves only the posterior means,
    so the generator no longer matters; a partial scale lies in between."""
    model = models["ddpm"]
    noise = sample_noise(model, 2, torch.Generator().manual_seed(0))

    def run(scale, seed):
        return sample(model, noise, "ddpm", steps=4, generator=torch.Generator().manual_seed(seed),
                      step_noise_scale=scale)

    assert not torch.allclose(run(1.0, 1), run(1.0, 2))
    torch.testing.assert_close(run(0.0, 1), run(0.0, 2))
    assert not torch.allclose(run(0.5, 1), run(0.5, 2))
    assert (run(0.5, 1) - run(0.0, 1)).abs().mean() < (run(1.0, 1) - run(0.0, 1)).abs().mean()


def test_step_noise_scale_is_refused_where_it_does_not_apply(models):
    noise = sample_noise(models["ddpm"], 1, torch.Generator().manual_seed(0))
    with pytest.raises(SealdiffError, match="step_noise_scale applies to the ddpm sampler only, not ddim"):
        sample(models["ddpm"], noise, "ddim", steps=2, step_noise_scale=0.5)


def test_cli_generate_samples_an_unconditional_model_with_and_without_a_trigger(tmp_path, capsys):
    """`sealdiff generate` on an unconditional model: the grid is exactly `metrics.uncond.generate`'s samples for the
    seed, sampler and steps given, stamped with an attack's recorded trigger or a scan's inverted one (with its γ)."""
    import numpy as np
    from PIL import Image

    import uncond_micro as M
    from sealdiff.cli import main
    from sealdiff.defenses.uncond import save_trigger
    from sealdiff.detection import TRIGGER_SOURCE
    from sealdiff.io import directory_sha256
    from sealdiff.metrics.uncond import Backdoor, generate, read_backdoor
    from sealdiff.report.images import grid

    model_dir = M.ASSETS / "backdoored"
    before = directory_sha256(M.ASSETS)
    scan = tmp_path / "scan"  # a stand-in scan output holding an inverted trigger found on 0.6·ε + τ
    scan.mkdir()
    inverted = 0.5 * M.trigger()
    save_trigger(inverted, scan, metadata={"source": TRIGGER_SOURCE, "noise_scale": "0.6"})
    model = load_uncond(model_dir)
    expected = {"clean": (None, generate(model, 4, "ddpm", 10, 3)),
                "attack": (model_dir, generate(model, 4, "ddpm", 10, 3, read_backdoor(model_dir))),
                "scan": (scan, generate(model, 4, "ddpm", 10, 3, Backdoor(inverted, None, 0.6)))}
    for name, (trigger_file, images) in expected.items():
        extra = ["--trigger-file", str(trigger_file)] if trigger_file else []
        assert main(["generate", str(model_dir), "-o", str(tmp_path / f"{name}.png"), "--count", "4", "--sampler",
                     "ddpm", "--steps", "10", "--seed", "3", *extra]) == 0
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{name}.png")), np.asarray(grid((images + 1) / 2)))
    assert not torch.equal(expected["clean"][1], expected["attack"][1])
    assert directory_sha256(M.ASSETS) == before
    capsys.readouterr()
    (tmp_path / "other").mkdir()
    save_trigger(inverted, tmp_path / "other")  # neither a scan's nor an attack's record
    for argv, message in ((["--count", "2", "--sampler", "sde-ve"], "does not apply to a ddpm model"),
                          (["--trigger-file", str(tmp_path / "other")], "holds neither a `sealdiff scan` trigger")):
        assert main(["generate", str(model_dir), "-o", str(tmp_path / "bad.png"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and not (tmp_path / "bad.png").exists(), err
    assert main(["generate", "zoo:t2i-clean", "-p", "a red circle", "-o", str(tmp_path / "t2i.png"), "--count", "2"]) == 2
    assert "apply to unconditional models" in capsys.readouterr().err


def test_cli_eval_measures_an_unconditional_model_against_its_trigger_and_a_reference(tmp_path, capsys):
    """`sealdiff eval` on an unconditional model: per sampler, the recorded attack's success, the collapse of the
    triggered samples and the closeness to a reference model, each equal to the metrics recomputed from the same
    noise; an inverted trigger (target unknown) gives the collapse only; the report page shows the numbers."""
    import uncond_micro as M
    from sealdiff.cli import main
    from sealdiff.defenses.uncond import save_trigger
    from sealdiff.detection import TRIGGER_SOURCE
    from sealdiff.detection.common import uniformity
    from sealdiff.io import directory_sha256
    from sealdiff.metrics import uncond as metrics

    backdoored, clean = M.ASSETS / "backdoored", M.ASSETS / "clean"
    before = directory_sha256(M.ASSETS)
    out = tmp_path / "eval"
    assert main(["eval", str(backdoored), "-o", str(out), "--reference", str(clean), "--count", "8", "--sampler",
                 "all", "--steps", "5"]) == 0
    info = json.loads((out / "sealdiff.json").read_text())
    assert info["command"] == "eval" and list(info["per_sampler"]) == ["ddpm", *(s for s in SAMPLERS["ddpm"] if s != "ddpm")]
    model, reference, backdoor = load_uncond(backdoored), load_uncond(clean), metrics.read_backdoor(backdoored)
    for sampler in ("ddpm", "heun"):
        row = info["per_sampler"][sampler]
        images = {"clean": metrics.generate(model, 8, sampler, 5), "triggered": metrics.generate(model, 8, sampler, 5,
                                                                                                 backdoor=backdoor)}
        attack = metrics.attack_success(model, backdoor, sampler, 5, 8)
        assert row["attack"]["attack_success"] == attack.attack_success
        assert row["attack"]["false_trigger_rate"] == attack.false_trigger_rate
        assert row["collapse"] == pytest.approx(1 - uniformity(images["triggered"]) / uniformity(images["clean"]))
        close = metrics.agreement(images["clean"], metrics.generate(reference, 8, sampler, 5))
        assert row["reference"] == pytest.approx({"mse": close.mse, "ssim": close.ssim, "count": 8})
    assert info["per_sampler"]["ddpm"]["attack"]["attack_success"] >= 0.75  # the micro backdoor fires under ddpm
    assert (out / "grid_heun_reference.png").is_file() and info["grids"]["sets"] == ["clean", "triggered", "reference"]
    assert main(["report", str(out), "-o", str(tmp_path / "eval.html")]) == 0
    page = (tmp_path / "eval.html").read_text()
    ddpm = info["per_sampler"]["ddpm"]
    assert f"<td class=l>ddpm</td><td>{ddpm['attack']['attack_success']:.1%}</td>" in page
    assert f"<td>{ddpm['collapse']:.3f}</td><td>{ddpm['reference']['ssim']:.3f}</td>" in page
    assert page.count("<figure>") == 3 * len(SAMPLERS["ddpm"])

    scan = tmp_path / "scan"  # an inverted trigger: its target is unknown, so collapse only
    scan.mkdir()
    save_trigger(M.trigger(), scan, metadata={"source": TRIGGER_SOURCE})
    assert main(["eval", str(backdoored), "-o", str(tmp_path / "eval2"), "--trigger-file", str(scan), "--count", "4",
                 "--steps", "5"]) == 0
    record = json.loads((tmp_path / "eval2" / "sealdiff.json").read_text())
    row = record["per_sampler"]["ddpm"]
    assert row["attack"] is None and row["collapse"] > 0.5 and row["reference"] is None
    assert record["trigger"]["sha256"] == directory_sha256(scan) and record["trigger"]["target_known"] is False
    assert directory_sha256(M.ASSETS) == before

    capsys.readouterr()
    ncsn = tmp_path / "ncsn"
    save_uncond(tiny_uncond("ncsn", channels=(8, 16)), ncsn)
    for argv, message in ((["--reference", str(ncsn)], "they must match"), (["--count", "2"], "count 2 is invalid"),
                          (["--count", "0"], "count 0 is invalid"), (["--steps", "0"], "--steps 0 is invalid")):
        assert main(["eval", str(backdoored), "-o", str(tmp_path / "bad"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and not (tmp_path / "bad").exists(), err
