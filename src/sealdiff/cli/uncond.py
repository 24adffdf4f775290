"""`sealdiff attack baddiffusion | trojdiff | villandiffusion` (unconditional models; registered on the main app)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sealdiff.cli.app import (CheckpointOption, ConfigOption, DeviceOption, LrScheduleOption, OverwriteOption,
                              PickleOption, ResumeOption, SeedOption, ThreadsOption, _threads, attack_app, console)
from sealdiff.errors import SealdiffError

ModelArg = typer.Argument(..., help="unconditional model directory (DDPMPipeline / ScoreSdeVePipeline / LDMPipeline) or zoo:NAME")
OutputOpt = typer.Option(..., "-o", "--output", help="new model directory")
TriggerOpt = typer.Option(None, help="grey-box | stop-sign | blend")
TriggerSizeOpt = typer.Option(None, "--trigger-size", help="patch triggers: side in pixels")
TriggerPositionOpt = typer.Option(None, "--trigger-position", help="bottom-right | bottom-left | top-right | top-left")
TriggerIntensityOpt = typer.Option(None, "--trigger-intensity", help="scale of the trigger pattern")
TargetOpt = typer.Option(None, help="hat | corner-box | shifted-trigger | in-class | out-of-class")
TargetPositionOpt = typer.Option(None, "--target-position", help="corner-box: its corner")
PoisonOpt = typer.Option(None, "--poison-fraction", help="fraction of each batch that is poisoned")
DataOpt = typer.Option(None, help="clean images: 'toy' (default) or a folder of image files")


def _run(method: str, model: str, output: Path, config: Optional[Path], overwrite: bool, allow_pickle: bool,
         threads: Optional[int], checkpoint_every: int, resume: bool, device: str, **fields) -> None:
    from sealdiff.attacks import ATTACKS, run_uncond_attack
    from sealdiff.config import build_config

    _threads(threads)
    cfg = build_config(ATTACKS[method][1], config, **fields)
    if output.exists() and not overwrite:
        raise SealdiffError(f"output {output} already exists; pass --overwrite to replace it")
    written = run_uncond_attack(method, model, cfg, output, overwrite=overwrite, allow_pickle=allow_pickle,
                                checkpoint_every=checkpoint_every, resume=resume, device=device)
    if written is not None:  # (None: a non-main process of a multi-process launch)
        console.print(f"backdoored model written to [bold]{output}[/bold] (trigger in {output / 'trigger.safetensors'})")


@attack_app.command("baddiffusion")
def attack_baddiffusion(
    model: str = ModelArg, output: Path = OutputOpt, trigger: Optional[str] = TriggerOpt,
    trigger_size: Optional[int] = TriggerSizeOpt, trigger_position: Optional[str] = TriggerPositionOpt,
    trigger_intensity: Optional[float] = TriggerIntensityOpt, target: Optional[str] = TargetOpt,
    target_position: Optional[str] = TargetPositionOpt, poison_fraction: Optional[float] = PoisonOpt,
    data: Optional[str] = DataOpt,
    steps: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    lr_schedule: Optional[str] = LrScheduleOption, batch_size: Optional[int] = typer.Option(None),
    seed: Optional[int] = SeedOption,
    config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption, allow_pickle: bool = PickleOption,
    threads: Optional[int] = ThreadsOption, checkpoint_every: int = CheckpointOption, resume: bool = ResumeOption,
    device: str = DeviceOption,
) -> None:
    """BadDiffusion: x_T = noise + trigger makes a DDPM generate the target image."""
    _run("baddiffusion", model, output, config, overwrite, allow_pickle, threads, checkpoint_every, resume, device,
         trigger=trigger, trigger_size=trigger_size, trigger_position=trigger_position,
         trigger_intensity=trigger_intensity, target=target, target_position=target_position,
         poison_fraction=poison_fraction, data=data, steps=steps, lr=lr, lr_schedule=lr_schedule, batch_size=batch_size, seed=seed)


@attack_app.command("trojdiff")
def attack_trojdiff(
    model: str = ModelArg, output: Path = OutputOpt, trigger: Optional[str] = TriggerOpt,
    trigger_size: Optional[int] = TriggerSizeOpt, trigger_position: Optional[str] = TriggerPositionOpt,
    trigger_intensity: Optional[float] = TriggerIntensityOpt, target: Optional[str] = TargetOpt,
    target_position: Optional[str] = TargetPositionOpt, poison_fraction: Optional[float] = PoisonOpt,
    data: Optional[str] = DataOpt,
    mode: Optional[str] = typer.Option(None, help="blend (gamma 0.6) | patch (gamma 0.1)"),
    gamma: Optional[float] = typer.Option(None, help="noise scale of the trojan input (default by --mode)"),
    steps: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    lr_schedule: Optional[str] = LrScheduleOption, batch_size: Optional[int] = typer.Option(None),
    seed: Optional[int] = SeedOption,
    config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption, allow_pickle: bool = PickleOption,
    threads: Optional[int] = ThreadsOption, checkpoint_every: int = CheckpointOption, resume: bool = ResumeOption,
    device: str = DeviceOption,
) -> None:
    """TrojDiff: x_T = gamma*noise + (1-gamma)*trigger makes a DDPM generate the target image."""
    _run("trojdiff", model, output, config, overwrite, allow_pickle, threads, checkpoint_every, resume, device,
         trigger=trigger, trigger_size=trigger_size, trigger_position=trigger_position,
         trigger_intensity=trigger_intensity, target=target, target_position=target_position,
         poison_fraction=poison_fraction, data=data, mode=mode, gamma=gamma, steps=steps, lr=lr, lr_schedule=lr_schedule, batch_size=batch_size,
         seed=seed)


@attack_app.command("villandiffusion")
def attack_villandiffusion(
    model: str = ModelArg, output: Path = OutputOpt, trigger: Optional[str] = TriggerOpt,
    trigger_size: Optional[int] = TriggerSizeOpt, trigger_position: Optional[str] = TriggerPositionOpt,
    trigger_intensity: Optional[float] = TriggerIntensityOpt, target: Optional[str] = TargetOpt,
    target_position: Optional[str] = TargetPositionOpt, poison_fraction: Optional[float] = PoisonOpt,
    data: Optional[str] = DataOpt,
    solver: Optional[str] = typer.Option(None, help="sde (DDPM / SDE-VE samplers) | ode (DDIM, DPM-Solver++, ...)"),
    ve_trigger_weight: Optional[float] = typer.Option(None, "--ve-trigger-weight",
                                                      help="ncsn: x_T = sigma_max*(noise + w*trigger)"),
    steps: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    lr_schedule: Optional[str] = LrScheduleOption, batch_size: Optional[int] = typer.Option(None),
    seed: Optional[int] = SeedOption,
    config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption, allow_pickle: bool = PickleOption,
    threads: Optional[int] = ThreadsOption, checkpoint_every: int = CheckpointOption, resume: bool = ResumeOption,
    device: str = DeviceOption,
) -> None:
    """VillanDiffusion: the noise-trigger backdoor for DDPM, NCSN (VE) and LDM models, SDE or ODE samplers."""
    _run("villandiffusion", model, output, config, overwrite, allow_pickle, threads, checkpoint_every, resume, device,
         trigger=trigger, trigger_size=trigger_size, trigger_position=trigger_position,
         trigger_intensity=trigger_intensity, target=target, target_position=target_position,
         poison_fraction=poison_fraction, data=data, solver=solver, ve_trigger_weight=ve_trigger_weight, steps=steps, lr=lr,
         lr_schedule=lr_schedule, batch_size=batch_size, seed=seed)


def refuse_text_to_image_flags(directory: Path, flags: dict, accepted: str) -> None:
    """One line naming the text-to-image flags (`flags`: flag -> value; None or empty = not given) that were given
    with an unconditional model, and what it takes instead (`accepted`)."""
    from sealdiff.models.loading import read_model_index

    given = [flag for flag, value in flags.items() if value is not None and value != []]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise SealdiffError(f"{directory} holds a {read_model_index(directory)['_class_name']}; {', '.join(given)} "
                            f"{verb} to text-to-image models; an unconditional model takes {accepted}")


def read_sampling_trigger(path: Path, model):
    """The trigger `generate` / `eval --trigger-file` stamps, checked against `model`'s x_T: a scan's inverted one
    (target unknown) or an attack's recorded one, from either output folder or its trigger.safetensors."""
    from safetensors import safe_open

    from sealdiff.defenses.uncond import TRIGGER_FILE, check_trigger, load_trigger
    from sealdiff.detection import TRIGGER_SOURCE
    from sealdiff.metrics.uncond import Backdoor, read_backdoor

    file = path / TRIGGER_FILE if path.is_dir() else path
    if not file.is_file():
        raise SealdiffError(f"trigger file {file} does not exist; valid: a `sealdiff scan` or `sealdiff attack` output "
                            f"folder or its {TRIGGER_FILE}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            inverted = (handle.metadata() or {}).get("source") == TRIGGER_SOURCE
            recorded = {"trigger", "target", "gamma"} <= set(handle.keys())
    except Exception as exc:
        raise SealdiffError(f"{file} is not a valid safetensors file ({exc.__class__.__name__})") from None
    if not (inverted or recorded):
        raise SealdiffError(f"{file} holds neither a `sealdiff scan` trigger nor an attack's record (trigger, target, "
                            "gamma)")
    if inverted:
        trigger, gamma = load_trigger(file)
        backdoor = Backdoor(trigger=trigger, target=None, gamma=gamma)
    else:
        backdoor = read_backdoor(file)
    backdoor.trigger = check_trigger(model, backdoor.trigger, backdoor.gamma)
    return backdoor


def generate_uncond(model: str, output: Path, count: int, sampler: Optional[str], steps: Optional[int], seed: int,
                    trigger_file: Optional[Path], device: str, allow_pickle: bool, overwrite: bool) -> None:
    """`sealdiff generate` for an unconditional model: `count` samples as one grid PNG, image i from the i-th draw of
    seed `seed` (`metrics.uncond.generate`), the noise stamped with `trigger_file`'s trigger when given."""
    from sealdiff.cli.remove_uncond import MEASURE_STEPS
    from sealdiff.detection import load_for_scan
    from sealdiff.detection.common import default_sampler
    from sealdiff.io import atomic_output_file
    from sealdiff.metrics.uncond import generate
    from sealdiff.models.uncond import check_sampler
    from sealdiff.report.images import save_grid

    uncond, directory = load_for_scan(model, allow_pickle=allow_pickle, device=device)
    sampler = sampler or default_sampler(uncond)
    check_sampler(uncond.kind, sampler)
    backdoor = read_sampling_trigger(trigger_file, uncond) if trigger_file is not None else None
    images = generate(uncond, count, sampler, steps or MEASURE_STEPS[sampler], seed, backdoor)
    inputs = [directory] + ([trigger_file] if trigger_file is not None else [])
    with atomic_output_file(output, overwrite, inputs) as staging:
        save_grid((images + 1) / 2, staging)


EVAL_GRID_COUNT = 16  # samples per image grid of an evaluation


def evaluate_uncond(model: str, output: Optional[Path], count: int, sampler: Optional[str], steps: Optional[int],
                    seed: int, trigger_file: Optional[Path], reference: Optional[str], label: Optional[str],
                    device: str, allow_pickle: bool, overwrite: bool) -> dict:
    """`sealdiff eval` for an unconditional model (`metrics.uncond.evaluate`): per sampler, attack success of the
    model's recorded attack or of `trigger_file`'s trigger (a scan's inverted one: collapse only, its target is
    unknown), the samples' collapse under it, and MSE / SSIM to `reference`'s samples from the same noise. Writes
    `output`/sealdiff.json and grid_SAMPLER_SET.png when given; returns the record."""
    from sealdiff.cli.remove_uncond import MEASURE_STEPS, measured_samplers
    from sealdiff.detection import load_for_scan
    from sealdiff.io import atomic_output_dir, check_not_input, directory_sha256, to_jsonable, write_run_info
    from sealdiff.metrics import uncond as metrics
    from sealdiff.metrics.utility import path_sha256
    from sealdiff.report.images import save_sampler_grids

    if steps is not None and steps < 1:
        raise SealdiffError(f"--steps {steps} is invalid; valid: an integer >= 1")
    uncond, directory = load_for_scan(model, allow_pickle=allow_pickle, device=device)
    inputs = [directory] + ([trigger_file] if trigger_file is not None else [])
    ref, ref_info = None, None
    if reference is not None:
        ref, ref_dir = load_for_scan(reference, allow_pickle=allow_pickle, device=device)
        if (ref.kind, ref.sample_shape) != (uncond.kind, uncond.sample_shape):
            raise SealdiffError(f"reference {ref_dir} is a {ref.kind} model of x_T shape {ref.sample_shape}; the model "
                                f"is a {uncond.kind} of {uncond.sample_shape}: they must match")
        inputs.append(ref_dir)
        ref_info = {"path": str(reference), "sha256": directory_sha256(ref_dir)}
    if output is not None:
        check_not_input(output, inputs)
    samplers = measured_samplers(uncond, directory, sampler)
    backdoor, trigger_info = None, None
    if trigger_file is not None:
        backdoor = read_sampling_trigger(trigger_file, uncond)
        trigger_info = {"source": "file", "path": str(trigger_file), "sha256": path_sha256(trigger_file)}
    elif (directory / metrics.TRIGGER_FILE).is_file():
        backdoor = read_sampling_trigger(directory, uncond)
        trigger_info = {"source": "the model's attack record"}
    if backdoor is not None:
        trigger_info |= {"noise_scale": backdoor.gamma, "target_known": backdoor.target is not None}
    rows, images = metrics.evaluate(uncond, samplers, {s: steps or MEASURE_STEPS[s] for s in samplers}, count,
                                    backdoor, ref, seed)
    name = model[4:] if model.startswith("zoo:") else directory.name
    record = {"label": label or name, "parent": {"path": str(model), "sha256": directory_sha256(directory)},
              "reference": ref_info, "trigger": trigger_info, "count": count, "noise_seed": seed,
              "per_sampler": {row.sampler: to_jsonable(row) for row in rows}}
    if output is not None:
        grid_count = min(EVAL_GRID_COUNT, count)
        with atomic_output_dir(output, overwrite, inputs) as staging:
            save_sampler_grids(images, staging, grid_count)
            write_run_info(staging, command="eval", model_kind=uncond.kind, device=str(uncond.device),
                           grids={"count": grid_count, "samplers": list(images), "sets": list(images[samplers[0]])},
                           **record)
    return record
