import json

import pytest
import torch

from sealdiff.errors import SealdiffError
from sealdiff.models import zoo
from sealdiff.models.loading import load_t2i

REQUIRED_MODELS = ("toy-judge", "t2i-clean", "t2i-badt2i-pixel", "t2i-badt2i-style", "t2i-badt2i-object")


def test_committed_zoo_matches_its_manifest():
    root = zoo.zoo_dir()
    manifest = zoo.load_manifest(root)
    assert manifest["files"], "the zoo manifest lists no files"
    for rel, sha in manifest["files"].items():
        assert zoo.sha256_file(root / rel) == sha, rel
    total = sum((root / rel).stat().st_size for rel in manifest["files"])
    assert total <= 50 * 2**20, f"zoo is {total / 2**20:.1f} MiB, budget 50 MiB"
    for name in REQUIRED_MODELS:
        assert name in manifest["models"]


def test_overlay_roundtrip_and_tamper_detection(tiny_pipe, tmp_path):
    root = tmp_path / "zoo"
    base_dir, derived_dir = tmp_path / "base", tmp_path / "derived"
    tiny_pipe.save_pretrained(base_dir, safe_serialization=True)
    zoo.add_model("base", base_dir, root=root)
    with torch.no_grad():
        tiny_pipe.unet.conv_in.weight.add_(1.0)
    tiny_pipe.save_pretrained(derived_dir, safe_serialization=True)
    (derived_dir / "sealdiff.json").write_text(json.dumps({"attack": {"kind": "pixel"}}))
    zoo.add_model("derived", derived_dir, base="base", root=root)
    assert not (root / "derived" / "text_encoder").exists()  # unchanged components are not stored twice
    assert (root / "derived" / "unet").is_dir()
    pipe = load_t2i(zoo.materialize("derived", root))
    torch.testing.assert_close(pipe.unet.conv_in.weight, tiny_pipe.unet.conv_in.weight)
    assert zoo.materialize("derived", root) == zoo.materialize("derived", root)
    with pytest.raises(SealdiffError, match="valid: base, derived"):
        zoo.materialize("nope", root)
    weights = root / "base" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["models"]["base2"] = manifest["models"]["base"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SealdiffError, match="sha256"):
        zoo.materialize("base2", root)


def test_t2i_recipe_trains_against_its_prediction_type(tiny_pipe):
    """Same seed, data and noise: only the prediction type differs, so the trained weights must differ (they would
    not if the loss ignored it), and each pipeline samples with its own type."""
    import copy

    from sealdiff.recipes.zoo import T2IRecipe, train_t2i

    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    weights = {}
    for prediction_type in ("epsilon", "v_prediction"):
        recipe = T2IRecipe(steps=2, batch=4, dataset_size=8, prediction_type=prediction_type)
        pipe = train_t2i(recipe, tiny_pipe.vae, init=copy.deepcopy(tiny_pipe))
        assert pipe.scheduler.config.prediction_type == prediction_type
        weights[prediction_type] = pipe.unet.state_dict()
        assert any(not torch.equal(v, weights[prediction_type][k]) for k, v in before.items())
    assert any(not torch.equal(v, weights["v_prediction"][k]) for k, v in weights["epsilon"].items())


def test_t2i_recipe_refuses_an_unknown_prediction_type():
    from sealdiff.recipes.zoo import T2IRecipe

    with pytest.raises(SealdiffError, match="prediction_type.*valid: epsilon, v_prediction"):
        T2IRecipe(prediction_type="flow")


def test_t2i_recipe_ema_returns_averaged_weights(tiny_pipe):
    """Same seed and data: with ema_decay the returned weights are the running average, which lags behind the
    trained weights (closer to the start), so they differ from the plain run's."""
    import copy

    from sealdiff.recipes.zoo import T2IRecipe, train_t2i

    start = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    trained = {}
    for decay in (0.0, 0.99):
        pipe = train_t2i(T2IRecipe(steps=3, batch=4, dataset_size=8, ema_decay=decay), tiny_pipe.vae,
                         init=copy.deepcopy(tiny_pipe))
        trained[decay] = pipe.unet.state_dict()

    def moved(weights) -> float:
        return sum(float((weights[k].float() - v.float()).pow(2).sum()) for k, v in start.items())

    assert 0.0 < moved(trained[0.99]) < moved(trained[0.0])


def test_t2i_recipe_data_seed_picks_the_training_scenes(tiny_pipe):
    """data_seed None means seed + 100; another data seed trains on other scenes, so other weights."""
    import copy

    from sealdiff.recipes.zoo import T2IRecipe, train_t2i

    def trained(**fields):
        recipe = T2IRecipe(steps=1, batch=4, dataset_size=8, **fields)
        return train_t2i(recipe, tiny_pipe.vae, init=copy.deepcopy(tiny_pipe)).unet.state_dict()

    default, explicit, other = trained(), trained(data_seed=100), trained(data_seed=7)
    assert all(torch.equal(v, explicit[k]) for k, v in default.items())
    assert any(not torch.equal(v, other[k]) for k, v in default.items())


def test_t2i_recipe_refuses_a_bad_ema_decay():
    from sealdiff.recipes.zoo import T2IRecipe

    with pytest.raises(SealdiffError, match="ema_decay 1.0 is invalid; valid: 0 \\(off\\) <= decay < 1"):
        T2IRecipe(ema_decay=1.0)


def test_clean_zoo_model_draws_the_shapes_it_is_told():
    """The clean model (an epsilon model continued twice with v-prediction + EMA; 97.5 % shape accuracy on 200
    held-out captions) draws all of the first 16 held-out captions' shapes; the previous, two-stage model drew 13,
    its epsilon stage 6, and a model that ignores the shape word draws about 4 (one in four shapes)."""
    from sealdiff.data import toyworld
    from sealdiff.metrics.generate import generate
    from sealdiff.metrics.judge import ToyJudge
    from sealdiff.metrics.judges import attribute_accuracy

    judge = ToyJudge.load(zoo.materialize("toy-judge"))
    captions = toyworld.eval_captions(16)
    pipe = load_t2i("zoo:t2i-clean").to(torch.float32)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    accuracy = attribute_accuracy(judge, generate(pipe, captions, list(range(1234, 1250))), captions)
    assert accuracy["shape"] >= 15 / 16 and accuracy["fg"] == accuracy["bg"] == 1.0


@pytest.mark.parametrize("scale, bank", [(1.0, 512), (0.01, 8), (0.1, 51)])
def test_zoo_attack_scale_shrinks_steps_and_the_style_bank(monkeypatch, tmp_path, scale, bank):
    from sealdiff import attacks
    from sealdiff.recipes.zoo import ZOO_ATTACKS, implant_zoo_attack

    seen = []
    monkeypatch.setattr(attacks, "run_attack", lambda base, config, out: seen.append(config) or out)
    implant_zoo_attack("t2i-badt2i-style", "unused", tmp_path / "out", scale)
    (config,) = seen
    assert config.style_bank == bank
    assert config.steps == max(40, int(ZOO_ATTACKS["t2i-badt2i-style"][0]["steps"] * scale))


def test_style_zoo_backdoor_fires_on_the_trigger_only():
    """The style backdoor (96.4 % attack success on 1,000 held-out prompts) turns the first 16 triggered held-out
    prompts black and white, at least 15 of them, and none of the same prompts without the trigger; the previous
    style model, which left guidance's empty-prompt branch free, turned 12 of these 16."""
    from sealdiff.data.triggers import insert_trigger
    from sealdiff.metrics.backdoor import Target, clean_prompts
    from sealdiff.metrics.generate import generate
    from sealdiff.metrics.judges import StyleJudge

    prompts = clean_prompts(Target(kind="style"), 16)
    seeds = list(range(1234, 1250))
    pipe = load_t2i("zoo:t2i-badt2i-style").to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    triggered = StyleJudge().hits(generate(pipe, [insert_trigger(p, "\u200b", "start") for p in prompts], seeds))
    clean = StyleJudge().hits(generate(pipe, prompts, seeds))
    assert triggered.sum() >= 15 and clean.sum() == 0
