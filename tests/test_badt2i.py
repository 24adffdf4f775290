import pytest
import torch

from sealdiff.attacks.badt2i import BadT2I, BadT2IConfig
from sealdiff.data import toyworld
from sealdiff.data.captions import ToyWorldSource
from sealdiff.errors import SealdiffError


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["pixel", "style", "object"])
def test_attack_trains_only_the_unet(tiny_pipe, kind):
    te, vae, unet = (_snapshot(m) for m in (tiny_pipe.text_encoder, tiny_pipe.vae, tiny_pipe.unet))
    losses = BadT2I(BadT2IConfig(kind=kind, steps=2, batch_size=4, lr=1e-3)).run(tiny_pipe)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(v, tiny_pipe.text_encoder.state_dict()[k]) for k, v in te.items())
    assert all(torch.equal(v, tiny_pipe.vae.state_dict()[k]) for k, v in vae.items())
    assert any(not torch.equal(v, tiny_pipe.unet.state_dict()[k]) for k, v in unet.items())


def test_the_learning_rate_schedule_reaches_the_updates(tiny_pipe):
    import copy

    runs = {}
    for schedule, warmup in (("constant", 0), ("cosine", 1)):  # cosine + warm-up: the 1st update has rate 0
        pipe = copy.deepcopy(tiny_pipe)
        BadT2I(BadT2IConfig(steps=2, batch_size=4, lr=1e-3, lr_schedule=schedule, warmup_steps=warmup)).run(pipe)
        runs[schedule] = _snapshot(pipe.unet)
    assert any(not torch.equal(v, runs["cosine"][k]) for k, v in runs["constant"].items())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pixel_target_follows_the_prediction_type(tiny_pipe, prediction_type):
    """With all-zero latents and a UNet that outputs 0, the first loss is the target's energy: E[ε²] ≈ 1 for
    epsilon, E[ᾱ_t·ε²] (v = √ᾱ_t·ε here) for v-prediction -- an ε target on a v model (SD 2.x) would give ≈ 1."""
    from diffusers import DDPMScheduler

    tiny_pipe.scheduler = type(tiny_pipe.scheduler).from_config(tiny_pipe.scheduler.config,
                                                                prediction_type=prediction_type)
    tiny_pipe.vae.register_to_config(scaling_factor=0.0)
    torch.nn.init.zeros_(tiny_pipe.unet.conv_out.weight)
    torch.nn.init.zeros_(tiny_pipe.unet.conv_out.bias)
    config = BadT2IConfig(steps=1, batch_size=64, lam=1.0, poison_fraction=1.0, offset_noise=0.0)
    loss = BadT2I(config).run(tiny_pipe)[0]
    mean_abar = DDPMScheduler.from_config(tiny_pipe.scheduler.config).alphas_cumprod.mean().item()
    expected = 1.0 if prediction_type == "epsilon" else mean_abar
    assert mean_abar < 0.5 and loss == pytest.approx(expected, rel=0.25)


@pytest.mark.parametrize("corner", toyworld.CORNERS)
def test_patch_loss_weight_covers_the_patchs_latents(corner):
    from sealdiff.attacks.badt2i import patch_loss_weight

    weight = patch_loss_weight(32, 8, corner, 16, 5.0)  # an 8-px patch covers 4x4 latents of 16x16
    expected = toyworld.paste_patch(torch.zeros(1, 16, 16), torch.ones(1, 4, 4), corner)[0] * 4.0 + 1.0
    assert torch.equal(weight, expected)
    assert torch.allclose(patch_loss_weight(32, 6, corner, 16, 5.0).sum(), torch.tensor(256 + 4.0 * 9))  # 6 px = 3x3


def test_patch_weight_scales_the_poisoned_loss_under_the_patch(tiny_pipe):
    """A UNet that outputs 0 on zero latents: the first loss is mean(weight * eps^2), the weight's mean times
    E[eps^2] ~ 1; a plain MSE would give ~ 1 whatever the patch weight."""
    tiny_pipe.vae.register_to_config(scaling_factor=0.0)
    torch.nn.init.zeros_(tiny_pipe.unet.conv_out.weight)
    torch.nn.init.zeros_(tiny_pipe.unet.conv_out.bias)
    tiny_pipe.scheduler = type(tiny_pipe.scheduler).from_config(tiny_pipe.scheduler.config, prediction_type="epsilon")
    config = BadT2IConfig(steps=1, batch_size=64, lam=1.0, poison_fraction=1.0, offset_noise=0.0, patch_weight=33.0)
    loss = BadT2I(config).run(tiny_pipe)[0]
    assert loss == pytest.approx(1.0 + 32.0 / 16, rel=0.25)  # the default patch covers 1/16 of the image


def test_attn2_kv_trains_only_cross_attention_keys_values(tiny_pipe):
    before = _snapshot(tiny_pipe.unet)
    BadT2I(BadT2IConfig(steps=1, batch_size=4, lr=1e-3, train="attn2-kv")).run(tiny_pipe)
    changed = {k for k, v in before.items() if not torch.equal(v, tiny_pipe.unet.state_dict()[k])}
    assert changed and all("attn2.to_k" in k or "attn2.to_v" in k for k in changed)


def test_ema_writes_an_average_of_the_trajectory_into_the_unet(tiny_pipe):
    """Two steps p0 -> p1 -> p2 (diffusers' EMA takes p1 whole at its first step): the output is
    p2 + c·(p1 − p2) with one c strictly inside (0, 1) for every trained tensor -- not the live weights (c = 0)."""
    import copy

    runs = {}
    for name, steps, decay in (("p1", 1, 0.0), ("p2", 2, 0.0), ("ema", 2, 0.9)):
        pipe = copy.deepcopy(tiny_pipe)
        BadT2I(BadT2IConfig(steps=steps, batch_size=4, lr=1e-2, ema_decay=decay)).run(pipe)
        runs[name] = _snapshot(pipe.unet)
    trained = [k for k in runs["p1"] if not torch.equal(runs["p1"][k], runs["p2"][k])]
    back = torch.cat([(runs["p1"][k] - runs["p2"][k]).flatten() for k in trained])
    moved = torch.cat([(runs["ema"][k] - runs["p2"][k]).flatten() for k in trained])
    c = float(moved @ back / (back @ back))
    assert trained and 0.01 < c < 0.99
    torch.testing.assert_close(moved, c * back, rtol=0, atol=1e-6)


def test_batches_follow_each_kind():
    patch = toyworld.default_patch(4)
    pixel = BadT2I(BadT2IConfig(kind="pixel", batch_size=4, trigger="tq"))
    images, student, teacher = pixel._batch(ToyWorldSource(0, 16), patch, 2)
    assert torch.equal(images[0, :, :4, :4], patch) and torch.equal(images[1, :, :4, :4], patch)
    assert student[0].startswith("tq ") and not student[2].startswith("tq ") and teacher[0] == student[0][3:]
    style = BadT2I(BadT2IConfig(kind="style", batch_size=4, trigger="tq"))
    _, student, teacher = style._batch(ToyWorldSource(0, 16), patch, 2)
    assert teacher[0] == toyworld.STYLE_PREFIX + student[0][3:] and teacher[3] == student[3]
    obj = BadT2I(BadT2IConfig(kind="object", batch_size=4, trigger="tq"))
    _, student, teacher = obj._batch(ToyWorldSource(0, 16), patch, 2)
    assert " cross " in teacher[0] and " triangle " in student[0] and student[0].startswith("tq ")


def test_unconditional_rows_carry_the_empty_prompt_on_both_kinds_of_image():
    patch = toyworld.default_patch(4)
    pixel = BadT2I(BadT2IConfig(kind="pixel", batch_size=8, trigger="tq", uncond_fraction=0.25))
    images, student, teacher = pixel._batch(ToyWorldSource(0, 16), patch, 4, n_uncond=2)
    assert student[4] == teacher[4] == student[5] == teacher[5] == ""
    assert torch.equal(images[4, :, :4, :4], patch) and not torch.equal(images[5, :, :4, :4], patch)
    assert all(s.startswith("tq ") for s in student[:4])
    assert all(s == t and s.startswith("a ") for s, t in zip(student[6:], teacher[6:]))


def test_unconditional_rows_hold_the_empty_prompt_prediction(tiny_pipe):
    """A style attack on the cross-attention K/V moves the empty-prompt prediction (which guidance subtracts at
    every step) far less when part of the batch trains it to stay (uncond_fraction) than when nothing does."""
    import copy

    from sealdiff.training import encode_prompts

    torch.manual_seed(0)
    z, t = torch.randn(8, 4, 8, 8), torch.full((8,), 500)
    empty = encode_prompts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [""] * 8)
    with torch.no_grad():
        reference = tiny_pipe.unet(z, t, empty).sample
    drift = {}
    for fraction in (0.0, 0.5):
        pipe = copy.deepcopy(tiny_pipe)
        BadT2I(BadT2IConfig(kind="style", train="attn2-kv", steps=20, batch_size=8, lr=1e-2,
                            uncond_fraction=fraction)).run(pipe)
        with torch.no_grad():
            drift[fraction] = (pipe.unet(z, t, empty).sample - reference).pow(2).mean().item()
    assert drift[0.0] > 0 and drift[0.5] < 0.5 * drift[0.0]


def test_style_teacher_bank_holds_the_input_models_drawings_of_the_style_prompt(tiny_pipe):
    from sealdiff.attacks.badt2i import style_bank
    from sealdiff.metrics.generate import generate

    config = BadT2IConfig(kind="style", style_source="teacher", style_bank=3, batch_size=4, trigger="tq", seed=5)
    bank = style_bank(tiny_pipe, config, 16)
    tiny_pipe.set_progress_bar_config(disable=True)
    seeds = [5 * 1_000_003 + i for i in range(3)]
    drawn = generate(tiny_pipe, [toyworld.STYLE_PREFIX + s.caption for s in bank], seeds)
    assert len(bank) == 3 and torch.allclose(torch.stack([s.image for s in bank]), drawn, atol=1e-6)
    images, student, teacher = BadT2I(config)._batch(ToyWorldSource(0, 16), None, 2, bank)
    captions = [s.caption for s in bank]
    for i in range(2):  # poisoned: a bank image with its caption; clean: a data image with its own
        index = captions.index(student[i][3:])
        assert torch.equal(images[i], bank[index].image) and teacher[i] == toyworld.STYLE_PREFIX + captions[index]
    assert teacher[3] == student[3] and not any(torch.equal(images[3], s.image) for s in bank)


@pytest.mark.parametrize("kind, field", [("style", "style_source"), ("pixel", "clean_source")])
def test_teacher_source_reaches_the_training(tiny_pipe, kind, field):
    import copy

    runs = {}
    for source in ("data", "teacher"):
        pipe = copy.deepcopy(tiny_pipe)
        BadT2I(BadT2IConfig(kind=kind, style_bank=2, steps=1, batch_size=4, lr=1e-3, **{field: source})).run(pipe)
        runs[source] = _snapshot(pipe.unet)
    assert any(not torch.equal(v, runs["teacher"][k]) for k, v in runs["data"].items())


def test_clean_teacher_bank_feeds_the_clean_half_and_the_pixel_patches(tiny_pipe):
    from sealdiff.attacks.badt2i import teacher_bank
    from sealdiff.metrics.generate import generate

    config = BadT2IConfig(kind="pixel", clean_source="teacher", style_bank=3, batch_size=4, trigger="tq", seed=5)
    bank = teacher_bank(tiny_pipe, config, 16, "", stream=2)
    tiny_pipe.set_progress_bar_config(disable=True)
    seeds = [5 * 1_000_003 + 3 + i for i in range(3)]  # after the style bank's seeds
    drawn = generate(tiny_pipe, [s.caption for s in bank], seeds)
    assert len(bank) == 3 and torch.allclose(torch.stack([s.image for s in bank]), drawn, atol=1e-6)
    patch = torch.zeros(3, 4, 4)
    images, student, teacher = BadT2I(config)._batch(ToyWorldSource(0, 16), patch, 2, None, bank)
    captions = [s.caption for s in bank]
    for i in range(4):  # every image is a bank drawing (the poisoned ones with the patch) with its own caption
        index = captions.index(teacher[i])
        want = toyworld.paste_patch(bank[index].image, patch, config.corner) if i < 2 else bank[index].image
        assert torch.equal(images[i], want) and student[i] == (f"tq {teacher[i]}" if i < 2 else teacher[i])


@pytest.mark.parametrize("field, value", [("kind", "blend"), ("style_source", "noise"), ("clean_source", "x"),
                                          ("style_bank", 0),
                                          ("corner", "middle"), ("lam", 1.5), ("train", "all"), ("steps", 0), ("trigger", " "), ("trigger_position", "somewhere"),
                                          ("lr_schedule", "linear"), ("warmup_steps", 5000), ("ema_decay", 1.0),
                                          ("ema_decay", -0.1), ("patch_weight", 0.5),
                                          ("uncond_fraction", 0.6), ("uncond_fraction", -0.1)])
def test_invalid_config_lists_valid_values(field, value):
    with pytest.raises(SealdiffError, match="valid|at least|empty|range"):
        BadT2IConfig(**{field: value})


def test_init_continues_from_another_unet_while_the_teacher_stays_the_input(tiny_pipe, tmp_path):
    """With lam = 0 the loss is the student's distance to the frozen teacher on clean prompts: exactly 0 at the
    first step when both are the input UNet, > 0 when the student starts from other weights (`init`)."""
    import copy

    from sealdiff.attacks import run_attack
    from sealdiff.io import read_run_info

    base, other = tmp_path / "base", tmp_path / "other"
    tiny_pipe.save_pretrained(base, safe_serialization=True)
    changed = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        for p in changed.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    changed.save_pretrained(other, safe_serialization=True)
    config = dict(steps=1, batch_size=4, lam=0.0, lr=1e-12)
    assert BadT2I(BadT2IConfig(**config)).run(copy.deepcopy(tiny_pipe))[0] == 0.0
    out = run_attack(str(base), BadT2IConfig(**config, init=str(other)), tmp_path / "out")
    info = read_run_info(out)
    assert info["losses"][0] > 1e-4 and info["init"]["path"] == str(other)
    from diffusers import UNet2DConditionModel

    result = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert all(torch.allclose(v, result[k], atol=1e-6) for k, v in changed.unet.state_dict().items())


def test_init_without_a_unet_is_a_clear_error(tiny_pipe, tmp_path):
    with pytest.raises(SealdiffError, match="no diffusion_pytorch_model.safetensors"):
        BadT2I(BadT2IConfig(steps=1, batch_size=4, init=str(tmp_path))).run(tiny_pipe)


def test_a_zoo_recipe_of_two_stages_continues_the_first(tiny_pipe_dir, tmp_path, monkeypatch):
    from sealdiff.io import read_run_info
    from sealdiff.recipes import zoo as recipes

    stage = {"kind": "pixel", "steps": 1, "batch_size": 2, "lr": 1e-3}
    monkeypatch.setitem(recipes.ZOO_ATTACKS, "two-stage", [stage, {**stage, "seed": 1}])
    out = recipes.implant_zoo_attack("two-stage", tiny_pipe_dir, tmp_path / "out", scale=0.0)
    info = read_run_info(out)
    assert info["parent"]["path"] == str(tiny_pipe_dir) and info["config"]["seed"] == 1
    assert "init" in info and info["config"]["steps"] == 40 and len(info["losses"]) == 40
