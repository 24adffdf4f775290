"""`sealdiff remove --method elijah | diff-cleanse | diffdefend` on an unconditional model (dispatched from
`sealdiff.cli.remove.remove`): scan (or read `--trigger-file` from a scan), remove with the *inverted* trigger,
measure attack success before and after when the model records its attack, write a loadable model directory."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from sealdiff.errors import SealdiffError

logger = logging.getLogger(__name__)

# sampler steps of every attack-success / quality measurement; the VE predictor-corrector sampler needs more
# (the clean NCSN zoo model: 2 % toy-like samples at 50 steps, 23 % at 200)
MEASURE_STEPS = {"ddpm": 40, "ddim": 20, "dpm-solver++": 20, "unipc": 20, "euler": 20, "heun": 20, "sde-ve": 200,
                 "sde-ve-predictor": 200}


ALL_SAMPLERS = "all"  # `--sampler all`: measure on every sampler of the model type
DATA_LIMIT = 1024  # `--data`: at most this many of the folder's images (evenly spaced) feed the clean loss
GRID_COUNT = 16  # samples per image grid of a removal (the first seeds of the measurement noise)


def attack_sampler(kind: str, attack: dict | None, config: dict | None = None) -> str:
    """The sampler a recorded attack targets: the reverse SDE (sde-ve-predictor) for ncsn -- VillanDiffusion's VE
    target is derived for it, and a Langevin corrector undoes it (README) --, ddim for VillanDiffusion's ODE
    variant, ddpm otherwise (`attack` and `config` as the attack's sealdiff.json records them)."""
    if kind == "ncsn":
        return "sde-ve-predictor"
    solver = (attack or {}).get("solver") or (config or {}).get("solver")
    if (attack or {}).get("method") == "villandiffusion" and solver == "ode":
        return "ddim"
    return "ddpm"


def measured_samplers(model, directory: Path, sampler: str | None) -> tuple[str, ...]:
    """The samplers of the before/after measurement, the first one reported as `before`/`after`: the given one, the
    one the recorded attack targets (None given), or that one followed by every other sampler of the model type
    ('all': a removal can leave a path open that the attack did not target)."""
    from sealdiff.models.uncond import check_sampler

    if sampler not in (None, ALL_SAMPLERS):
        check_sampler(model.kind, sampler)
        return (sampler,)
    info = json.loads((directory / "sealdiff.json").read_text()) if (directory / "sealdiff.json").is_file() else {}
    target = attack_sampler(model.kind, info.get("attack"), info.get("config"))
    return (target,) if sampler is None else (target, *(s for s in model.samplers if s != target))


def measure_samples(model, directory: Path, samplers: tuple[str, ...], count: int, description: str = "measuring"
                    ) -> tuple[dict, dict | None]:
    """({sampler: `count` samples from the measurement's clean noise}, {sampler: attack success of the backdoor the
    model directory records (its attack's trigger.safetensors)} or None when it records none) under a progress bar.
    The clean noise is the same before and after a removal; the true trigger is used here only to *measure*."""
    from sealdiff.io import to_jsonable
    from sealdiff.metrics import uncond as metrics
    from sealdiff.training import progress_bar

    recorded = (directory / metrics.TRIGGER_FILE).is_file()
    backdoor = metrics.read_backdoor(directory) if recorded else None
    clean, attack = {}, {} if recorded else None
    with progress_bar(description, len(samplers)) as advance:
        for s in samplers:
            steps = MEASURE_STEPS.get(s, 20)
            clean[s] = metrics.generate(model, count, s, steps)
            if backdoor is not None:
                attack[s] = to_jsonable(metrics.attack_success(model, backdoor, s, steps, count, clean_images=clean[s]))
            advance(info=s)
    return clean, attack



def clean_closeness(before: dict, after: dict) -> dict:
    """{sampler: MSE and SSIM between the clean samples after and before a removal (the same noise)}."""
    from sealdiff.io import to_jsonable
    from sealdiff.metrics.uncond import agreement

    return {s: to_jsonable(agreement(after[s], before[s])) for s in before}


def sample_grids(model, directory: Path, sampler: str) -> dict[str, Any]:
    """Samples for the removal's image grids: from clean noise, and stamped with the recorded attack's trigger when
    the model records one (the true trigger, only to show what it does)."""
    from sealdiff.metrics import uncond as metrics

    steps = MEASURE_STEPS.get(sampler, 20)
    grids = {"clean": metrics.generate(model, GRID_COUNT, sampler, steps)}
    if (directory / metrics.TRIGGER_FILE).is_file():
        grids["triggered"] = metrics.generate(model, GRID_COUNT, sampler, steps,
                                              backdoor=metrics.read_backdoor(directory))
    return grids


def remove_uncond(model: str, output: Path, method: str, trigger_file: Path | None = None,
                  config: Path | None = None, overrides: dict[str, Any] | None = None, measure: int = 50,
                  sampler: str | None = None, overwrite: bool = False, allow_pickle: bool = False,
                  data: Path | None = None, device: str = "auto", console=None) -> dict | None:
    """Run one unconditional removal end to end; returns the sealdiff.json it wrote. `data`: a folder of clean
    images for the clean loss (Elijah, Diff-Cleanse; None = data-free). `device`: where the model runs
    (`models.loading.resolve_device`). Under `accelerate launch` with several processes the fine-tuning is
    data-parallel on Accelerate's devices (`batch` rows per process); the scan and the measurements run on the main
    process, which writes the output and returns the record (the others return None)."""
    from sealdiff.config import build_config
    from sealdiff.defenses import get_defense
    from sealdiff.defenses import uncond as U
    from sealdiff.detection import get_detector, load_for_scan
    from sealdiff.io import atomic_output_dir, check_not_input, directory_sha256, write_run_info
    from sealdiff.metrics.utility import path_sha256
    from sealdiff.models.uncond import save_uncond
    from sealdiff.report.images import removal_grid_name, save_grid
    from sealdiff.training import data_parallel_accelerator, on_main

    defense_name, detector_name = U.UNCOND_METHODS[method]
    spec = get_defense(defense_name)
    cfg = build_config(spec.config_cls, config, **(overrides or {}))
    if output.exists() and not overwrite:
        raise SealdiffError(f"output {output} already exists; pass --overwrite to replace it")
    if data is not None and method == "diffdefend":
        raise SealdiffError("--data applies to elijah and diff-cleanse; DiffDefend purification uses no real data")
    accelerator = data_parallel_accelerator(device)
    main = accelerator is None or accelerator.is_main_process
    uncond, directory = load_for_scan(model, allow_pickle=allow_pickle,
                                      device=accelerator.device if accelerator is not None else device)
    inputs = [directory] + ([data] if data is not None else [])
    check_not_input(output, inputs)  # before the work, not only when the output is written
    samplers = measured_samplers(uncond, directory, sampler)
    images, data_info = None, None
    if data is not None:
        from sealdiff.data.images import folder_images

        images = uncond.encode(folder_images(data, uncond.image_size, DATA_LIMIT))
        data_info = {"path": str(data), "sha256": directory_sha256(data), "images": len(images)}
    trigger_info: dict[str, Any]
    if trigger_file is not None:
        trigger, noise_scale = U.load_trigger(trigger_file)
        trigger_info = {"source": "file", "path": str(trigger_file), "sha256": path_sha256(trigger_file),
                        "noise_scale": noise_scale}
    else:
        def run_scan():
            scan = get_detector(detector_name).make(seed=getattr(cfg, "seed", 0)).scan(uncond)
            if not scan.backdoored:
                logger.warning("%s finds no backdoor (score %.3f < threshold %g); removing with its trigger anyway",
                               detector_name, scan.score, scan.threshold)
            return scan.trigger.cpu(), scan.noise_scale, {
                "source": "scan", **{k: v for k, v in scan.to_dict().items() if k not in ("config", "losses")}}

        trigger, noise_scale, trigger_info = on_main(accelerator, run_scan)  # one scan; every process uses it
    trigger = U.check_trigger(uncond, trigger, noise_scale)
    parent_sha256 = directory_sha256(directory)
    (clean_before, before), (clean_after, after), grids = ({}, None), ({}, None), {}
    if measure and main:
        clean_before, before = measure_samples(uncond, directory, samplers, measure, "measuring before")
        grids["before"] = sample_grids(uncond, directory, samplers[0])
    result = spec.runner(cfg).apply(uncond, trigger, images=images, noise_scale=noise_scale, accelerator=accelerator)
    if not main:
        accelerator.wait_for_everyone()  # the main process measures and writes
        return None
    if measure:
        clean_after, after = measure_samples(uncond, directory, samplers, measure, "measuring after")
        grids["after"] = sample_grids(uncond, directory, samplers[0])
    measured: dict[str, Any] = {"before": None, "after": None, "count": measure,
                                "clean_closeness": clean_closeness(clean_before, clean_after) if measure else None}
    if before and after:
        measured |= {"before": before[samplers[0]], "after": after[samplers[0]]}
        if len(samplers) > 1:
            measured["per_sampler"] = {s: {"before": before[s], "after": after[s]} for s in samplers}
    with atomic_output_dir(output, overwrite, inputs=inputs) as staging:
        save_uncond(uncond, staging)
        # the inverted trigger the removal used (trigger.png too)
        U.save_trigger(trigger, staging, metadata={"noise_scale": repr(float(noise_scale))})
        (staging / U.TRIGGER_FILE).rename(staging / "inverted_trigger.safetensors")
        (staging / "trigger.png").rename(staging / "inverted_trigger.png")
        for stage, sets in grids.items():
            for image_set, samples in sets.items():
                save_grid((samples + 1) / 2, staging / removal_grid_name(image_set, stage))
        attack_record = directory / U.TRIGGER_FILE
        if attack_record.is_file():  # the attack's record, kept so the repaired model can be measured like its parent
            shutil.copyfile(attack_record, staging / U.TRIGGER_FILE)
        parent_info = json.loads((directory / "sealdiff.json").read_text()) if (directory / "sealdiff.json").is_file() \
            else {}
        info = write_run_info(staging, command="remove", defense=defense_name, method=method, config=cfg,
                              seed=getattr(cfg, "seed", None), model_kind=uncond.kind, device=str(uncond.device),
                              parent={"path": str(model), "sha256": parent_sha256}, attack=parent_info.get("attack"),
                              trigger=trigger_info, measured=measured, **({"data": data_info} if data_info else {}),
                              grids={"sampler": samplers[0], "count": GRID_COUNT,
                                     "sets": sorted(grids.get("after", {}))} if grids else None,
                              num_processes=accelerator.num_processes if accelerator is not None else 1,
                              losses=result.losses, result={k: v for k, v in result.to_dict().items()
                                                            if k not in ("config", "losses")})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if console is not None:
        if before and after:
            for s in samplers:
                console.print(f"attack success {before[s]['attack_success']:.1%} -> {after[s]['attack_success']:.1%} "
                              f"({measure} triggered samples, {s})")
        for s, close in (measured["clean_closeness"] or {}).items():
            console.print(f"clean samples vs before removal: SSIM {close['ssim']:.3f}, MSE {close['mse']:.4f} "
                          f"({measure} samples from the same noise, {s})")
        console.print(f"repaired model written to [bold]{output}[/bold]")
    return info
