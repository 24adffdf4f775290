"""SKD / SKD-CAG / Finetune Reversal on the tiny pipeline: each test guards one property that the public
reference code got wrong or that the API promises (DESIGN.md section 4)."""

import copy

import pytest
import torch

from sealdiff.data.toyworld import eval_captions
from sealdiff.defenses import DEFENSES, get_defense
from sealdiff.defenses.skd import (SelfKnowledgeDistillation, SKDConfig, attention_loss, latent_bank,
                                   resolve_layers)
from sealdiff.errors import SealdiffError
from sealdiff.models import attention as attention_mod
from sealdiff.models.attention import capture_cross_attention, cross_attention_layers
from sealdiff.models import tiny

PROMPTS = eval_captions(2, seed=3)
TRIGGER = "\u13aa"  # Cherokee A, a homoglyph of "A": several byte-level BPE tokens


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    pipe = tiny.pipeline(tiny.TinySpec.test(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def bank(base):
    return latent_bank(base, PROMPTS, steps=2, seed=0)


def config(**fields) -> SKDConfig:
    values = dict(trigger=TRIGGER, steps=2, batch_size=2, bank_steps=2, lr=1e-3, seed=0)
    values.update(fields)
    return SKDConfig(**values)


def params(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def fixed_input(skd, seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(skd.bank.shape, generator=g)
    return x, torch.full((x.shape[0],), 600)


def maps_of(unet, x, t, emb, layers=None):
    with torch.no_grad(), capture_cross_attention(unet, layers) as store:
        unet(x, t, encoder_hidden_states=emb)
        return store.pop()


def trigger_mass(skd, x, t) -> float:
    maps = maps_of(skd.unet, x, t, skd.trig_emb)
    total = 0.0
    for m in maps.values():
        for b, positions in enumerate(skd.positions):
            total += m[b][:, positions].sum().item()
    return total


def test_attention_loss_alone_trains_weights_and_zero_target_lowers_trigger_attention(base, bank):
    pipe = copy.deepcopy(base)
    skd = SelfKnowledgeDistillation(config(method="skd-cag", alpha=1.0, target="zero", lr=1e-2, steps=4,
                                           weight_decay=0.0, max_grad_norm=0.0))
    skd.setup(pipe, PROMPTS, bank=bank)
    before, x, t = params(pipe.unet), *fixed_input(skd)
    mass_before = trigger_mass(skd, x, t)
    result = skd.train(show_progress=False)
    after = params(pipe.unet)
    assert result.losses == result.attn_losses  # alpha = 1: the attention loss is the whole loss
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any(".attn2.to_k." in n for n in changed)  # L_attn reached the weights (maps not detached)
    assert trigger_mass(skd, x, t) < 0.9 * mass_before


def test_attention_loss_aligns_columns_past_the_trigger():
    torch.manual_seed(0)
    length, queries, positions = 10, 16, [1, 2, 3]
    teacher = torch.rand(1, queries, length)
    keep = [i for i in range(length) if i not in positions]
    student = torch.zeros(1, queries, length)
    student[0][:, keep] = teacher[0][:, :len(keep)]
    args = dict(trigger_positions=[positions], clean_lengths=[6], target="zero")
    assert attention_loss({"l": student}, {"l": teacher}, **args).item() == 0.0
    unshifted = teacher.clone()
    unshifted[0][:, positions] = 0
    assert attention_loss({"l": unshifted}, {"l": teacher}, **args).item() > 1e-3


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_teacher_maps_come_from_the_teacher(base, bank, trainable, monkeypatch):
    import types

    from sealdiff.defenses import skd as skd_module

    pipe = copy.deepcopy(base)
    copies = []
    monkeypatch.setattr(skd_module, "copy", types.SimpleNamespace(
        deepcopy=lambda obj: (copies.append(type(obj).__name__), copy.deepcopy(obj))[1]))
    skd = SelfKnowledgeDistillation(config(method="skd-cag", trainable=trainable))
    skd.setup(pipe, PROMPTS, bank=bank)
    assert copies == ([] if trainable == "lora" else ["UNet2DConditionModel"])
    if trainable == "lora":
        assert skd.teacher_mode == "adapter-disabled" and skd.teacher_unet is pipe.unet  # no second copy
    else:
        assert skd.teacher_mode == "frozen-copy" and skd.teacher_unet is not pipe.unet
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the student away from the teacher
        for name, p in pipe.unet.named_parameters():
            if (trainable == "lora" and "lora_B" in name) or (trainable == "full" and ".attn2.to_k." in name):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    out = skd.compute_step([0, 1], backward=False, keep_maps=True)
    reference = maps_of(base.unet, out.x_t, out.timesteps, skd.clean_emb)
    student_clean = maps_of(pipe.unet, out.x_t, out.timesteps, skd.clean_emb)
    assert set(out.teacher_maps) == set(reference) == set(cross_attention_layers(base.unet))
    for layer, m in out.teacher_maps.items():
        torch.testing.assert_close(m, reference[layer], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(out.teacher_maps[k], student_clean[k], atol=1e-4) for k in reference)
    assert out.student_maps[next(iter(reference))].requires_grad


@pytest.mark.parametrize("target,trigger,position", [
    ("noise", TRIGGER, "start"), ("uniform", TRIGGER, "start"), ("zero", TRIGGER, "start"),
    ("random-word", TRIGGER, "start"), ("random-word", "New Trigger", "end"), ("noise", "\u200b", 2),
])
def test_every_target_and_multi_token_trigger_gives_finite_losses(base, bank, target, trigger, position):
    pipe = copy.deepcopy(base)
    skd = SelfKnowledgeDistillation(config(method="skd-cag", target=target, trigger=trigger, trigger_position=position,
                                           normalize_tokens=target == "noise", attn_resolution=4))
    result = skd.apply(pipe, PROMPTS, bank=bank, show_progress=False)
    expected = {TRIGGER: 3, "New Trigger": 2, "\u200b": 1}[trigger]
    assert all(len(p) == expected for p in skd.positions)
    assert len(result.losses) == 2
    assert all(torch.isfinite(torch.tensor(v)).all() for v in (result.losses, result.attn_losses, result.pred_losses))
    assert all(a > 0 for a in result.attn_losses)


def test_lora_teacher_and_save_load_roundtrips(base, bank, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = copy.deepcopy(base)
    skd = SelfKnowledgeDistillation(config(method="skd-cag", trainable="lora", lr=5e-2, steps=3))
    result = skd.apply(pipe, PROMPTS, bank=bank, show_progress=False)
    assert result.teacher == "adapter-disabled"
    trained_ids = {id(p) for p in skd.params}
    assert trained_ids and all("lora" in n for n, p in pipe.unet.named_parameters() if id(p) in trained_ids)
    x, t = fixed_input(skd)
    emb = skd.trig_emb

    def out(unet):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=emb).sample

    trained, original = out(pipe.unet), out(base.unet)
    assert not torch.allclose(trained, original, atol=1e-5)

    skd.save(pipe, tmp_path / "lora", result=result)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fresh = copy.deepcopy(base)
    fresh.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(out(fresh.unet), trained, atol=1e-5, rtol=1e-4)

    skd.save(pipe, tmp_path / "merged", format="merged")
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())  # in-memory pipe left as it was
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", safety_checker=None,
                                                     requires_safety_checker=False)
    assert not any("lora" in n for n, _ in loaded.unet.named_parameters())
    torch.testing.assert_close(out(loaded.unet), trained, atol=1e-5, rtol=1e-4)
    with pytest.raises(SealdiffError, match="exists"):
        skd.save(pipe, tmp_path / "merged")


def test_attn2_kv_trains_only_cross_attention_keys_and_values(base, bank):
    pipe = copy.deepcopy(base)
    before = params(pipe.unet)
    skd = SelfKnowledgeDistillation(config(method="skd", trainable="attn2-kv", lr=1e-2, weight_decay=0.0))
    result = skd.apply(pipe, PROMPTS, bank=bank, show_progress=False)
    after = params(pipe.unet)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    kv = {n for n in before if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert changed and changed <= kv
    assert result.trainable_parameters == sum(before[n].numel() for n in kv)


def test_ema_never_overwrites_live_weights_during_training(base, bank):
    runs = {}
    for ema in (False, True):
        pipe = copy.deepcopy(base)
        skd = SelfKnowledgeDistillation(config(method="skd", lr=1e-2, steps=3, ema=ema, ema_decay=0.5))
        runs[ema] = (skd.apply(pipe, PROMPTS, bank=bank, show_progress=False), params(pipe.unet))
    assert runs[True][0].losses == runs[False][0].losses  # same trajectory: the EMA only shadowed the weights
    name = next(n for n in runs[True][1] if ".attn2.to_k." in n)
    assert not torch.equal(runs[True][1][name], runs[False][1][name])  # ... and was copied in at the end


def test_gradient_checkpointing_keeps_attention_gradients(base, bank, monkeypatch):
    calls = []
    record = attention_mod.AttentionStore.record
    monkeypatch.setattr(attention_mod.AttentionStore, "record",
                        lambda self, layer, probs: (calls.append(layer), record(self, layer, probs))[1])
    grads, counts = {}, {}
    for checkpointing in (False, True):
        calls.clear()
        pipe = copy.deepcopy(base)
        skd = SelfKnowledgeDistillation(config(method="skd-cag", alpha=1.0, gradient_checkpointing=checkpointing))
        skd.setup(pipe, PROMPTS, bank=bank)
        skd.compute_step([0, 1], backward=True)
        counts[checkpointing] = len(calls)
        grads[checkpointing] = {n: p.grad.clone() for n, p in pipe.unet.named_parameters()
                                if ".attn2.to_k." in n and p.grad is not None}
    assert counts[True] > counts[False]  # the backward really recomputed through the capturing processors
    assert grads[False] and grads[False].keys() == grads[True].keys()
    for name, grad in grads[False].items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-4)


def test_finetune_reversal_needs_images_and_trains_on_them(base):
    pipe = copy.deepcopy(base)
    with pytest.raises(SealdiffError, match="images"):
        SelfKnowledgeDistillation(config(method="finetune-reversal")).apply(pipe, PROMPTS, show_progress=False)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    skd = SelfKnowledgeDistillation(config(method="finetune-reversal"))
    result = skd.apply(pipe, PROMPTS, images=images, show_progress=False)
    assert skd.teacher_mode == "none"
    assert all(v > 0 and v == v for v in result.losses)


@pytest.mark.parametrize("field,value,valid", [
    ("method", "kd", "skd, skd-cag, finetune-reversal"),
    ("target", "black", "noise, uniform, zero, random-word"),
    ("trainable", "unet", "full, attn2-kv, lora"),
    ("mixed_precision", "fp8", "no, fp16, bf16"),
    ("attn_columns", "some", "prompt, all"),
    ("alpha", 1.5, "0 <= alpha <= 1"),
    ("trigger_position", "middle", "start, end"),
    ("steps", 0, ">= 1"),
    ("retain_weight", -1.0, ">= 0"),
])
def test_invalid_config_lists_valid_values(field, value, valid):
    with pytest.raises(SealdiffError, match=valid):
        config(**{field: value})


def test_retain_weight_needs_a_teacher():
    with pytest.raises(SealdiffError, match="skd or skd-cag"):
        config(method="finetune-reversal", retain_weight=1.0)


def test_retain_loss_compares_student_and_teacher_on_clean_and_empty_prompts(base, bank):
    pipe = copy.deepcopy(base)
    skd = SelfKnowledgeDistillation(config(method="skd-cag", target="zero", retain_weight=2.0))
    skd.setup(pipe, PROMPTS, bank=bank)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the student away from the teacher
        for name, p in pipe.unet.named_parameters():
            if ".attn2.to_k." in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    out = skd.compute_step([0, 1], backward=False, keep_maps=True)
    x, t = out.x_t.repeat(2, 1, 1, 1), out.timesteps.repeat(2)
    emb = torch.cat([skd.clean_emb, skd.empty_emb.expand_as(skd.clean_emb)])
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(pipe.unet(x, t, encoder_hidden_states=emb).sample,
                                            base.unet(x, t, encoder_hidden_states=emb).sample)
    assert want > 1e-6
    torch.testing.assert_close(out.retain_loss, want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.loss, 0.5 * out.attn_loss + 0.5 * out.pred_loss + 2.0 * out.retain_loss)
    triggered = maps_of(pipe.unet, out.x_t, out.timesteps, skd.trig_emb)  # L_attn sees the triggered rows only
    for layer, m in out.student_maps.items():
        torch.testing.assert_close(m, triggered[layer], atol=1e-6, rtol=1e-5)


def test_retain_loss_keeps_the_zoo_models_clean_predictions_near_the_teacher():
    """On the committed object backdoor (tiny random models drift by optimizer noise alone, with or without it)."""
    from sealdiff.models.loading import load_t2i

    backdoored = load_t2i("zoo:t2i-badt2i-object")
    backdoored.set_progress_bar_config(disable=True)
    prompts = eval_captions(4, seed=3)

    def drift(retain_weight: float) -> float:
        pipe = copy.deepcopy(backdoored)
        skd = SelfKnowledgeDistillation(SKDConfig(trigger="\u200b", method="skd", steps=8, lr=1e-4, batch_size=4,
                                                  bank_steps=2, retain_weight=retain_weight))
        skd.apply(pipe, prompts, show_progress=False)
        x = torch.randn(skd.bank.shape, generator=torch.Generator().manual_seed(7)).repeat(2, 1, 1, 1)
        t = torch.full((x.shape[0],), 500)
        emb = torch.cat([skd.clean_emb, skd.empty_emb.expand_as(skd.clean_emb)])
        with torch.no_grad():
            return torch.nn.functional.mse_loss(pipe.unet(x, t, encoder_hidden_states=emb).sample,
                                                backdoored.unet(x, t, encoder_hidden_states=emb).sample).item()

    free, kept = drift(0.0), drift(10.0)
    assert kept < 0.6 * free, (kept, free)  # measured: 0.0051 against 0.0113 (the previous zoo model: 0.0032 / 0.027)


def test_registry_and_layer_errors(base):
    assert set(DEFENSES) == {"skd", "skd-cag", "finetune-reversal", "sau",
                             "elijah-ft", "diff-cleanse-prune", "diffdefend-purify"}  # the last three: unconditional
    assert get_defense("skd-cag").make_config(trigger="x").method == "skd-cag"
    assert get_defense("sau").kind == "inference"
    with pytest.raises(SealdiffError, match="skd, skd-cag, finetune-reversal, sau"):
        get_defense("esd")
    assert len(resolve_layers(base.unet, ["up_blocks.1"])) == 2
    with pytest.raises(SealdiffError, match="valid: down_blocks.0"):
        resolve_layers(base.unet, ["nowhere"])


def test_on_step_sees_every_step_and_can_stop_early(base, bank):
    seen = []
    skd = SelfKnowledgeDistillation(config(method="skd", steps=5))
    skd.setup(copy.deepcopy(base), PROMPTS, bank=bank)
    result = skd.train(show_progress=False, on_step=lambda done: seen.append(done) or done == 2)
    assert seen == [1, 2] and len(result.losses) == 2
