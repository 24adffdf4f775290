"""`sealdiff scan` (registered on the main app): detect a backdoor in an unconditional model and invert its trigger."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from sealdiff.cli.app import (ConfigOption, DeviceOption, OverwriteOption, PickleOption, SeedOption, ThreadsOption,
                              _threads, app, console)
from sealdiff.errors import SealdiffError

logger = logging.getLogger(__name__)


def per_method_config(config: Optional[Path], methods) -> dict[str, dict]:
    """`--method all`'s config file: a mapping of method names to that method's config fields (methods left out run
    with their defaults)."""
    from sealdiff.config import read_config_file

    sections = read_config_file(config)
    unknown = sorted(set(sections) - set(methods), key=str)
    if unknown:
        raise SealdiffError(f"config file {config} with --method all maps method names to their fields; unknown "
                            f"{unknown}; valid: {', '.join(methods)}")
    for name, fields in sections.items():
        if not isinstance(fields, dict):
            raise SealdiffError(f"config file {config}: {name!r} must hold a mapping of field names to values")
    return {name: sections.get(name) or {} for name in methods}


@app.command()
def scan(
    model: str = typer.Argument(..., help="unconditional model directory (DDPMPipeline / ScoreSdeVePipeline / "
                                         "LDMPipeline) or zoo:NAME"),
    output: Path = typer.Option(..., "-o", "--output", help="new folder: scan.json, trigger.safetensors, "
                                                            "trigger.png, grids, sealdiff.json (--method all: one "
                                                            "such folder per method inside it)"),
    method: str = typer.Option("elijah", help="elijah | diff-cleanse | diffdefend | all"),
    threshold: Optional[float] = typer.Option(None, help="decision threshold of the method's score"),
    sampler: Optional[str] = typer.Option(None, help="elijah / diffdefend: the one stock sampler of the detection "
                                                     "samples (default: ddpm and ddim; sde-ve and "
                                                     "sde-ve-predictor for ncsn)"),
    epochs: Optional[int] = typer.Option(None, help="optimisation steps of the inversion"),
    seed: Optional[int] = SeedOption, config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption,
    allow_pickle: bool = PickleOption, threads: Optional[int] = ThreadsOption, device: str = DeviceOption,
) -> None:
    """Scan an unconditional model: invert the trigger (never given) and decide clean / backdoored (`--method all`:
    with every detector, each into its own folder of OUTPUT)."""
    from sealdiff.detection import DETECTORS, get_detector, load_for_scan, scan_grids, write_scan
    from sealdiff.io import atomic_output_dir, directory_sha256

    _threads(threads)
    every = method == "all"
    if not every and method not in DETECTORS:
        raise SealdiffError(f"unknown detection method {method!r}; valid: {', '.join(DETECTORS)}, all")
    if sampler is not None and method in ("diff-cleanse", "all"):
        raise SealdiffError("--sampler applies to elijah and diffdefend; diff-cleanse picks its chains (config 'chains')")
    if every:
        if threshold is not None:
            raise SealdiffError("--threshold is a method's own; with --method all set it per method in --config")
        flags = {k: v for k, v in (("epochs", epochs), ("seed", seed)) if v is not None}  # flags win over the file
        detectors = {name: get_detector(name).make(**(fields | flags))
                     for name, fields in per_method_config(config, DETECTORS).items()}
    else:
        detectors = {method: get_detector(method).make(config, threshold=threshold,
                                                       samplers=[sampler] if sampler else None, epochs=epochs, seed=seed)}
    if output.exists() and not overwrite:
        raise SealdiffError(f"output {output} already exists; pass --overwrite to replace it")
    uncond, directory = load_for_scan(model, allow_pickle=allow_pickle, device=device)
    for detector in detectors.values():
        if getattr(detector.config, "samplers", None):
            from sealdiff.detection.common import detection_samplers

            detection_samplers(uncond, detector.config.samplers)  # a sampler the model's kind lacks: one line
    parent_sha256 = directory_sha256(directory)
    results = {}
    with atomic_output_dir(output, overwrite, inputs=[directory]) as staging:
        for name, detector in detectors.items():
            folder = staging / name if every else staging
            folder.mkdir(exist_ok=True)
            results[name] = result = detector.scan(uncond)
            write_scan(result, folder, model, parent_sha256, uncond.kind, uncond.device, scan_grids(uncond, result))
    for name, result in results.items():
        trigger_file = (output / name if every else output) / "trigger.safetensors"
        console.print(f"{name}: [bold]{result.verdict}[/bold] (score {result.score:.3f}, threshold "
                      f"{result.threshold:g}); inverted trigger in {trigger_file}"
                      + (f" (input {result.noise_scale:g}·ε + trigger)" if result.noise_scale != 1.0 else ""))
