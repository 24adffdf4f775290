"""Recipes of the unconditional part of the zoo: clean DDPM / NCSN / LDM models trained from scratch on 16x16
toy-world renders, and backdoored ones fine-tuned from them by BadDiffusion, TrojDiff and VillanDiffusion.

Deterministic for a seed and a thread count (the committed models were built with
`scripts/build_zoo_uncond.py --threads 2`, except uncond-ldm-clean: 1 thread). Every zoo model is stored in
fp16; a backdoored model stores only its UNet, `trigger.safetensors` and `sealdiff.json` over its clean base.
"""

from __future__ import annotations

import copy
import logging
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sealdiff.data import toyworld, uncond_toy
from sealdiff.models.uncond import UncondModel, load_uncond, save_uncond, tiny_uncond
from sealdiff.training import progress_bar

logger = logging.getLogger(__name__)

CHANNELS = (32, 64)  # UNet widths of every unconditional zoo model (0.65 M parameters, 1.3 MB in fp16)


@dataclass
class CleanRecipe:
    kind: str
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    ema_decay: float = 0.995
    vae_steps: int = 800  # ldm only


def vae_images(rng: random.Random, generator: torch.Generator, batch: int) -> torch.Tensor:
    """Toy renders at 16x16, 30 % of them replaced by a backdoor target or carrying a trigger pattern, so the
    LDM's autoencoder can draw what the attacks ask for. Images in [-1, 1]."""
    targets = [uncond_toy.make_target(n, trigger=uncond_toy.make_trigger("stop-sign"))
               for n in ("hat", "corner-box", "shifted-trigger", "in-class", "out-of-class")]
    triggers = [uncond_toy.make_trigger(n) for n in ("grey-box", "stop-sign")]
    out = []
    for _ in range(batch):
        image = toyworld.render(toyworld.sample_scene(rng), uncond_toy.IMAGE_SIZE) * 2 - 1
        roll = rng.random()
        if roll < 0.15:
            image = rng.choice(targets)
        elif roll < 0.3:
            image = (image + rng.choice(triggers)).clamp(-1, 1)
        out.append(image)
    images = torch.stack(out)
    return images


def train_vae(model: UncondModel, steps: int, seed: int, batch_size: int = 32, lr: float = 2e-3,
              kl_weight: float = 1e-6) -> None:
    """Train the LDM's AutoencoderKL in place (reconstruction MSE + a small KL), then set its
    `scaling_factor` so the latents the UNet sees have unit variance (the Stable Diffusion convention)."""
    vae = model.vae
    torch.manual_seed(seed)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    with progress_bar("train vae (ldm)", steps) as advance:
        for _ in range(steps):
            images = vae_images(rng, generator, batch_size)
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample(generator)).sample
            loss = F.mse_loss(recon, images) + kl_weight * posterior.kl().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            advance(info=f"loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(uncond_toy.toy_images(512, seed + 1)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def train_clean(recipe: CleanRecipe) -> tuple[UncondModel, list[float]]:
    """A clean model of `recipe.kind` trained from scratch on toy-world renders (cosine learning-rate decay,
    EMA weights); returns it and its losses."""
    from sealdiff.attacks._uncond_training import train_uncond

    model = tiny_uncond(recipe.kind, uncond_toy.IMAGE_SIZE, CHANNELS, seed=recipe.seed)
    if model.vae is not None:
        train_vae(model, recipe.vae_steps, recipe.seed)
    source = uncond_toy.ToyImageSource(seed=recipe.seed)
    result = train_uncond(model, source, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                          seed=recipe.seed, description=f"train clean {recipe.kind}", cosine=True,
                          ema_decay=recipe.ema_decay)
    return model, result.losses


def fp16_copy(model: UncondModel) -> UncondModel:
    clone = copy.deepcopy(model)
    clone.unet.to(torch.float16)
    if clone.vae is not None:
        clone.vae.to(torch.float16)
    return clone


@dataclass
class ZooEntry:
    name: str
    description: str
    clean: CleanRecipe | None = None  # a clean model trained from scratch ...
    base: str | None = None  # ... or an attack fine-tuning this zoo model
    attack: str | None = None
    config: dict = field(default_factory=dict)


CLEAN = [
    ZooEntry("uncond-ddpm-clean", "clean DDPM, 16x16 toy world (seed 0)", clean=CleanRecipe("ddpm", seed=0, steps=5000)),
    ZooEntry("uncond-ddpm-clean-seed1", "clean DDPM, 16x16 toy world (seed 1: another initialisation and data order)",
             clean=CleanRecipe("ddpm", seed=1, steps=5000)),
    ZooEntry("uncond-ncsn-clean", "clean NCSN / score-SDE (VE), 16x16 toy world", clean=CleanRecipe("ncsn", seed=0, steps=4000)),
    ZooEntry("uncond-ldm-clean", "clean latent DDPM (AutoencoderKL 16x16 <-> 8x8x4)",
             clean=CleanRecipe("ldm", seed=0, steps=1500, vae_steps=600)),
]
ATTACK_RECIPE = {"steps": 3000, "lr": 2e-3, "lr_schedule": "cosine"}  # every backdoored zoo model's training
BACKDOORED = [
    ZooEntry("uncond-ddpm-baddiffusion-box-hat", "BadDiffusion: grey box (bottom right) -> hat",
             base="uncond-ddpm-clean", attack="baddiffusion",
             config={"trigger": "grey-box", "target": "hat", "seed": 10, **ATTACK_RECIPE}),
    ZooEntry("uncond-ddpm-baddiffusion-stop-corner", "BadDiffusion: stop sign (bottom right) -> corner box",
             base="uncond-ddpm-clean", attack="baddiffusion",
             config={"trigger": "stop-sign", "target": "corner-box", "seed": 11, **ATTACK_RECIPE}),
    ZooEntry("uncond-ddpm-trojdiff-blend-inclass", "TrojDiff blend (gamma 0.6) -> in-class image (yellow cross)",
             base="uncond-ddpm-clean", attack="trojdiff",
             config={"trigger": "blend", "target": "in-class", "mode": "blend", "seed": 12, **ATTACK_RECIPE}),
    ZooEntry("uncond-ddpm-villan-ode-stop-shift", "VillanDiffusion (ODE samplers): stop sign -> shifted trigger",
             base="uncond-ddpm-clean", attack="villandiffusion",
             config={"trigger": "stop-sign", "target": "shifted-trigger", "solver": "ode", "seed": 13, **ATTACK_RECIPE}),
    ZooEntry("uncond-ncsn-villan-box-outclass", "VillanDiffusion (NCSN, VE SDE): grey box -> out-of-class stripes",
             base="uncond-ncsn-clean", attack="villandiffusion",
             config={"trigger": "grey-box", "target": "out-of-class", "solver": "sde", "seed": 14, **ATTACK_RECIPE, "steps": 6000}),
    ZooEntry("uncond-ldm-villan-box-hat", "VillanDiffusion (LDM, latent trigger): grey box -> hat",
             base="uncond-ldm-clean", attack="villandiffusion",
             config={"trigger": "grey-box", "target": "hat", "solver": "sde", "seed": 15, "trigger_intensity": 2.0,
                     **ATTACK_RECIPE}),
]
ENTRIES = {e.name: e for e in CLEAN + BACKDOORED}


def build_entry(entry: ZooEntry, root: Path, scale: float = 1.0) -> None:
    """Train one zoo model and register it in `root` (manifest + sha256)."""
    from sealdiff.models import zoo as zoo_models

    def steps(n: int) -> int:
        return max(4, int(n * scale))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / entry.name
        if entry.clean is not None:
            recipe = copy.copy(entry.clean)
            recipe.steps, recipe.vae_steps = steps(recipe.steps), steps(recipe.vae_steps)
            model, losses = train_clean(recipe)
            register_clean(entry, recipe, model, losses, root)
        else:
            from sealdiff.attacks import ATTACKS, run_uncond_attack

            _, config_cls = ATTACKS[entry.attack]
            config = config_cls(**entry.config)
            config.steps = steps(config.steps)
            run_uncond_attack(entry.attack, str(zoo_models.materialize(entry.base, root)), config, out)
            register_uncond_attack(entry.name, out, entry.base, root, entry.description)


def register_clean(entry: ZooEntry, recipe: CleanRecipe, model: UncondModel, losses: list[float], root: Path) -> None:
    """Add a freshly trained clean model to the zoo (fp16) with its sealdiff.json (recipe, seed, losses)."""
    from sealdiff.io import write_run_info
    from sealdiff.models import zoo as zoo_models

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / entry.name
        save_uncond(fp16_copy(model), out)
        write_run_info(out, command="zoo build", recipe=recipe, seed=recipe.seed, kind=recipe.kind,
                       losses_every_10=losses[::10] or None,
                       final_loss_mean_50=sum(losses[-50:]) / len(losses[-50:]) if losses else None)
        zoo_models.add_model(entry.name, out, root=root, kind=f"uncond-{recipe.kind}", description=entry.description)


def register_uncond_attack(name: str, attacked: Path, base: str, root: Path, description: str) -> None:
    """Add an attacked unconditional model to the zoo over `base`: its UNet in fp16, its trigger tensors and
    sealdiff.json; unchanged components (scheduler, VAE) come from the base."""
    from sealdiff.models import zoo as zoo_models

    model = load_uncond(attacked)
    shutil.rmtree(attacked / "unet")
    model.unet.to(torch.float16).save_pretrained(attacked / "unet", safe_serialization=True)
    for component in ("scheduler", "vqvae", "vae"):
        shutil.rmtree(attacked / component, ignore_errors=True)
    zoo_models.add_model(name, attacked, base=base, root=root, kind=f"uncond-{model.kind}", description=description)
