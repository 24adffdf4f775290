"""Attacks that build backdoored test subjects. `run_attack` loads, attacks and saves atomically."""

from __future__ import annotations

import logging
from pathlib import Path

from sealdiff.attacks.badt2i import BadT2I, BadT2IConfig, describe_target
from sealdiff.io import atomic_output_dir, check_not_input, directory_sha256, write_run_info
from sealdiff.models.loading import load_t2i, resolve_device, resolve_model
from sealdiff.training import Checkpointer, data_parallel_accelerator

logger = logging.getLogger(__name__)

ATTACKS = {"badt2i": (BadT2I, BadT2IConfig)}
# unconditional-model attacks (models/uncond.py); run with `run_uncond_attack`
UNCOND_ATTACKS = ("baddiffusion", "trojdiff", "villandiffusion")


def _uncond_attacks() -> dict:
    from sealdiff.attacks.baddiffusion import BadDiffusion, BadDiffusionConfig
    from sealdiff.attacks.trojdiff import TrojDiff, TrojDiffConfig
    from sealdiff.attacks.villandiffusion import VillanDiffusion, VillanDiffusionConfig

    return {"baddiffusion": (BadDiffusion, BadDiffusionConfig), "trojdiff": (TrojDiff, TrojDiffConfig),
            "villandiffusion": (VillanDiffusion, VillanDiffusionConfig)}


ATTACKS.update(_uncond_attacks())


def run_attack(model: str, config: BadT2IConfig, output: str | Path, overwrite: bool = False,
               allow_pickle: bool = False, checkpoint_every: int = 0, resume: bool = False,
               device: str = "auto") -> Path | None:
    """Implant a BadT2I backdoor into the pipeline at `model` (trained on `device`:
    `models.loading.resolve_device`); write a new pipeline directory to `output`. Under `accelerate launch` with
    several processes it trains data-parallel on Accelerate's devices (`batch_size` rows per process); the main
    process writes the output and returns its path, the others return None.

    `checkpoint_every` N > 0 saves a checkpoint to `<output>.checkpoint/` every N steps and on
    SIGINT/SIGTERM; `resume` continues from it (same model and config only). The checkpoint folder is
    removed once `output` is complete."""
    accelerator = data_parallel_accelerator(device)
    device = accelerator.device if accelerator is not None else resolve_device(device)
    main = accelerator is None or accelerator.is_main_process
    parent = resolve_model(model)
    inputs = [parent] + ([resolve_model(config.init)] if config.init is not None else [])
    check_not_input(output, inputs)
    parent_sha256 = directory_sha256(parent)
    checkpointer = None
    if checkpoint_every or resume:
        checkpointer = Checkpointer.next_to(output, checkpoint_every, resume=resume, overwrite=overwrite,
                                            inputs=inputs, context={"command": "attack",
                                                                      "parent_sha256": parent_sha256})
    pipe = load_t2i(parent, device=device, allow_pickle=allow_pickle)
    losses = BadT2I(config).run(pipe, checkpointer=checkpointer, accelerator=accelerator)
    if main:  # one writer under a multi-process launch
        with atomic_output_dir(output, overwrite, inputs) as staging:
            pipe.save_pretrained(staging, safe_serialization=True)
            write_run_info(staging, command="attack", method="badt2i", config=config, seed=config.seed,
                           device=str(device), num_processes=accelerator.num_processes if accelerator else 1,
                           attack={"kind": config.kind, "trigger": config.trigger,
                                   "trigger_position": config.trigger_position, **describe_target(config)},
                           parent={"path": str(model), "sha256": parent_sha256},
                           **({"init": {"path": config.init, "sha256": directory_sha256(inputs[1])}}
                              if config.init else {}),
                           losses=losses)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not main:
        return None
    if checkpointer is not None:
        checkpointer.remove()
    logger.info("wrote %s", output)
    return Path(output)


def run_uncond_attack(method: str, model: str | Path, config, output: str | Path, overwrite: bool = False,
                      allow_pickle: bool = False, checkpoint_every: int = 0, resume: bool = False,
                      device: str = "auto") -> Path | None:
    """Implant a BadDiffusion / TrojDiff / VillanDiffusion backdoor into the unconditional model at `model` (trained
    on `device`: `models.loading.resolve_device`); write a new model directory to `output` with
    `trigger.safetensors` (trigger = what is added to gamma * prior noise, trigger_image, target, gamma) and
    `sealdiff.json`. Under `accelerate launch` with several processes it trains data-parallel on Accelerate's
    devices (`batch_size` rows per process); the main process writes the output and returns its path, the others
    return None."""
    from safetensors.torch import save_file

    from sealdiff.errors import SealdiffError
    from sealdiff.models.uncond import load_uncond, save_uncond

    if method not in UNCOND_ATTACKS:
        raise SealdiffError(f"unknown unconditional attack {method!r}; valid: {', '.join(UNCOND_ATTACKS)}")
    attack_cls, config_cls = ATTACKS[method]
    if not isinstance(config, config_cls):
        raise SealdiffError(f"{method} needs a {config_cls.__name__}, got {type(config).__name__}")
    accelerator = data_parallel_accelerator(device)
    device = accelerator.device if accelerator is not None else resolve_device(device)
    main = accelerator is None or accelerator.is_main_process
    parent = resolve_model(model)
    data = [] if config.data == "toy" else [Path(config.data)]  # a folder of clean images
    check_not_input(output, [parent, *data])
    parent_sha256 = directory_sha256(parent)
    uncond = load_uncond(parent, allow_pickle=allow_pickle).to(device)
    attack = attack_cls(config)
    from sealdiff.attacks._uncond_training import check_kind

    check_kind(uncond, method, attack.kinds)  # before any checkpoint folder is made
    checkpointer = None
    if checkpoint_every or resume:
        checkpointer = Checkpointer.next_to(output, checkpoint_every, resume=resume, overwrite=overwrite,
                                            inputs=[parent], context={"command": "attack",
                                                                      "parent_sha256": parent_sha256})
    spec, result = attack.run(uncond, checkpointer=checkpointer, accelerator=accelerator)
    if main:  # one writer under a multi-process launch
        with atomic_output_dir(output, overwrite, [parent, *data]) as staging:
            save_uncond(uncond, staging)
            save_file(spec.tensors(), str(Path(staging) / "trigger.safetensors"))
            write_run_info(staging, command="attack", method=method, config=config, seed=config.seed,
                           model_kind=uncond.kind, device=str(device),
                           num_processes=accelerator.num_processes if accelerator is not None else 1,
                           attack={"method": method, "trigger": config.trigger, "trigger_size": config.trigger_size,
                                   "trigger_position": config.trigger_position,
                                   "trigger_intensity": config.trigger_intensity, "target": config.target,
                                   "target_position": config.target_position, "gamma": spec.gamma,
                                   "trigger_file": "trigger.safetensors",
                                   "stamping": "x_T = gamma * prior_noise + trigger"},
                           parent={"path": str(model), "sha256": parent_sha256},
                           **({"data": {"path": str(data[0]), "sha256": directory_sha256(data[0])}} if data else {}),
                           losses=result.losses, poison_losses=result.poison_losses)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not main:
        return None
    if checkpointer is not None:
        checkpointer.remove()
    logger.info("wrote %s", output)
    return Path(output)
