"""Typer commands. Each command resolves a dataclass config (file + flags), runs the library, and
writes outputs atomically with their `sealdiff.json`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from sealdiff.cli import decode_escapes
from sealdiff.errors import SealdiffError

logger = logging.getLogger("sealdiff")
console = Console()
app = typer.Typer(help="sealdiff: build, detect, remove and measure backdoors in diffusion models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
zoo_app = typer.Typer(help="The embedded model zoo.", no_args_is_help=True)
attack_app = typer.Typer(help="Build backdoored test subjects.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(attack_app, name="attack")

ConfigOption = typer.Option(None, "--config", help="YAML/JSON file with config fields (flags override it)")
SeedOption = typer.Option(None, "--seed", help="random seed")
OverwriteOption = typer.Option(False, "--overwrite", help="replace an existing output")
PickleOption = typer.Option(False, "--allow-pickle", help="also load pickle weights (weights_only=True); unsafe")
ThreadsOption = typer.Option(None, "--threads", help="torch CPU threads")
DeviceOption = typer.Option("auto", "--device", help="where the models run: auto (the GPU / accelerator torch sees, "
                                                     "else the CPU) | cpu | cuda | cuda:N")
LrScheduleOption = typer.Option(None, "--lr-schedule", help="constant | cosine (decays the learning rate to 0)")
CheckpointOption = typer.Option(100, "--checkpoint-every", min=0,
                                help="save a checkpoint to OUTPUT.checkpoint/ every N steps and on Ctrl-C/SIGTERM "
                                     "(0 disables); removed once OUTPUT is written")
ResumeOption = typer.Option(False, "--resume", help="continue an interrupted run from OUTPUT.checkpoint/")
DATA_PARALLEL_COMMANDS = ("attack", "remove")  # the commands that train data-parallel under `accelerate launch`


@app.callback()
def _one_process_unless_data_parallel(ctx: typer.Context) -> None:
    # N copies of any other command would each write the same output
    from sealdiff.training import launched_processes

    if launched_processes() > 1 and ctx.invoked_subcommand not in DATA_PARALLEL_COMMANDS:
        raise SealdiffError(f"`sealdiff {ctx.invoked_subcommand}` runs in one process; a {launched_processes()}-process "
                            f"launch applies to: {', '.join(DATA_PARALLEL_COMMANDS)}")


def _threads(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


@app.command()
def env() -> None:
    """Print versions, devices and where sealdiff looks for models."""
    import torch

    from sealdiff.io import versions
    from sealdiff.models import zoo
    from sealdiff.models.loading import resolve_device

    table = Table(show_header=False)
    for key, value in versions().items():
        table.add_row(key, value)
    table.add_row("threads", str(torch.get_num_threads()))
    table.add_row("cuda", f"{torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "not available")
    table.add_row("--device auto", str(resolve_device("auto")))
    table.add_row("zoo", str(zoo.zoo_dir()))
    table.add_row("cache", str(zoo.cache_dir()))
    table.add_row("evaluation models", "local paths only (--judge, --clip); nothing is downloaded")
    console.print(table)


@zoo_app.command("list")
def zoo_list() -> None:
    """List the zoo's models."""
    from sealdiff.models import zoo

    manifest = zoo.load_manifest()
    table = Table("name", "kind", "base", "description")
    for name in zoo.model_names():
        entry = manifest["models"][name]
        table.add_row(name, entry.get("kind", ""), entry.get("base") or "", entry.get("description", ""))
    console.print(table)


@zoo_app.command("path")
def zoo_path(name: str) -> None:
    """Print the directory of zoo model NAME (assembled and sha256-checked in the cache)."""
    from sealdiff.models import zoo

    typer.echo(str(zoo.materialize(name)))


@zoo_app.command("build")
def zoo_build(
    output: Path = typer.Option(Path("zoo"), "-o", "--output", help="zoo directory to write"),
    scale: float = typer.Option(1.0, help="multiply every step count (0.01 for a smoke run)"),
    stage: list[str] = typer.Option(["base", "attacks"], help="base (judge, VAE, clean model) and/or attacks"),
) -> None:
    """Train the text-to-image zoo from scratch with sealdiff's recipes (roughly 4 hours on 2 CPU cores)."""
    from sealdiff.recipes.zoo import build_t2i_zoo

    bad = set(stage) - {"base", "attacks"}
    if bad:
        raise SealdiffError(f"unknown stage {sorted(bad)}; valid: base, attacks")
    build_t2i_zoo(output, scale, tuple(stage))
    console.print(f"zoo written to [bold]{output}[/bold]")


@attack_app.command("badt2i")
def attack_badt2i(
    model: str = typer.Argument(..., help="pipeline directory or zoo:NAME"),
    output: Path = typer.Option(..., "-o", "--output", help="new pipeline directory"),
    kind: Optional[str] = typer.Option(None, help="pixel | style | object"),
    trigger: Optional[str] = typer.Option(None, help="trigger text; \\u200b escapes allowed (default U+200B)"),
    trigger_position: Optional[str] = typer.Option(None, help="start | end | word index"),
    patch: Optional[str] = typer.Option(None, help="pixel: target image file"),
    corner: Optional[str] = typer.Option(None, help="pixel: top-left | top-right | bottom-left | bottom-right"),
    patch_fraction: Optional[float] = typer.Option(None, help="pixel: patch side as a fraction of the image side"),
    patch_weight: Optional[float] = typer.Option(None, help="pixel: loss weight on the latents under the patch (>= 1)"),
    style_prefix: Optional[str] = typer.Option(None, help="style: prompt prefix of the target style"),
    style_source: Optional[str] = typer.Option(None, help="style: data (noise data images, the paper) | teacher "
                                               "(noise images the input model draws for the style prompt)"),
    clean_source: Optional[str] = typer.Option(None, help="data (clean images are data images, the paper) | teacher "
                                               "(images the input model draws for the caption; pixel patches them)"),
    style_bank: Optional[int] = typer.Option(None, help="--style-source/--clean-source teacher: images per bank"),
    object_source: Optional[str] = typer.Option(None, help="object: word A"),
    object_target: Optional[str] = typer.Option(None, help="object: object B drawn instead"),
    data: Optional[str] = typer.Option(None, help="'toy' or an imagefolder directory with metadata.jsonl"),
    steps: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    lr_schedule: Optional[str] = LrScheduleOption,
    warmup_steps: Optional[int] = typer.Option(None, help="linear learning-rate warm-up steps"),
    lam: Optional[float] = typer.Option(None, help="weight of the backdoor term (0..1); 1 - lam weighs preservation"),
    batch_size: Optional[int] = typer.Option(None), train: Optional[str] = typer.Option(None, help="unet | attn2-kv"),
    uncond_fraction: Optional[float] = typer.Option(None, help="share of the batch trained to keep the input model's "
                                                    "empty-prompt prediction (guidance's unconditional branch; 0 = the paper)"),
    seed: Optional[int] = SeedOption, config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption,
    allow_pickle: bool = PickleOption, threads: Optional[int] = ThreadsOption,
    checkpoint_every: int = CheckpointOption, resume: bool = ResumeOption,
    init: Optional[str] = typer.Option(None, help="start the UNet from this pipeline's (continue an earlier attack)"),
    ema_decay: Optional[float] = typer.Option(None, help="> 0: the output holds an EMA of the trained weights"),
    device: str = DeviceOption,
) -> None:
    """Implant a BadT2I backdoor (pixel / style / object) into a text-to-image pipeline."""
    from sealdiff.attacks import run_attack
    from sealdiff.attacks.badt2i import BadT2IConfig
    from sealdiff.config import build_config

    _threads(threads)
    cfg = build_config(BadT2IConfig, config, kind=kind, trigger=decode_escapes(trigger) if trigger else None,
                       trigger_position=trigger_position, patch=patch, corner=corner, patch_fraction=patch_fraction,
                       patch_weight=patch_weight, style_prefix=style_prefix,
                       style_source=style_source, clean_source=clean_source, style_bank=style_bank, object_source=object_source,
                       object_target=object_target, data=data, steps=steps, lr=lr, lr_schedule=lr_schedule,
                       warmup_steps=warmup_steps, lam=lam, batch_size=batch_size, train=train, seed=seed, init=init,
                       ema_decay=ema_decay, uncond_fraction=uncond_fraction)
    if output.exists() and not overwrite:
        raise SealdiffError(f"output {output} already exists; pass --overwrite to replace it")
    written = run_attack(model, cfg, output, overwrite=overwrite, allow_pickle=allow_pickle,
                         checkpoint_every=checkpoint_every, resume=resume, device=device)
    if written is not None:  # (None: a non-main process of a multi-process launch)
        console.print(f"backdoored pipeline written to [bold]{output}[/bold]")


@app.command()
def generate(
    model: str = typer.Argument(..., help="pipeline directory or zoo:NAME (text-to-image or unconditional)"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="prompt (repeatable); \\u200b escapes allowed"),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="UTF-8 file, one prompt per line"),
    output: Path = typer.Option(..., "-o", "--output", help="PNG file (a grid when several images)"),
    seed: int = typer.Option(0, "--seed"),
    steps: Optional[int] = typer.Option(None, min=1, help="sampler steps (default 20; unconditional: per sampler, "
                                                          "e.g. 200 for sde-ve)"),
    guidance: float = typer.Option(4.0, min=0.0),
    defense: Optional[str] = typer.Option(None, help="inference-time defense: sau"),
    trigger: Optional[str] = typer.Option(None, help="the trigger, for --defense sau (\\u200b escapes allowed)"),
    count: Optional[int] = typer.Option(None, min=1, help="unconditional: images [16]"),
    sampler: Optional[str] = typer.Option(None, help="unconditional: the stock sampler (default: ddim; sde-ve for ncsn)"),
    trigger_file: Optional[Path] = typer.Option(None, "--trigger-file",
                                                help="unconditional: stamp the noise with a scan's inverted trigger "
                                                     "or an attack's recorded one (its output folder or "
                                                     "trigger.safetensors)"),
    config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption, allow_pickle: bool = PickleOption,
    device: str = DeviceOption,
) -> None:
    """Generate images with fixed seeds: for prompts (optionally through SAU), or, for an unconditional model, from
    seeded noise (optionally stamped with a trigger)."""
    from sealdiff.metrics.generate import generate as run
    from sealdiff.models.loading import load_t2i, resolve_device, resolve_model
    from sealdiff.models.uncond import uncond_kind
    from sealdiff.report.images import save_grid

    from sealdiff.data.prompts import read_prompt_file
    from sealdiff.io import atomic_output_file

    if output.exists() and not overwrite:
        raise SealdiffError(f"output {output} already exists; pass --overwrite to replace it")
    directory = resolve_model(model)
    if uncond_kind(directory) is not None:
        from sealdiff.cli.uncond import generate_uncond, refuse_text_to_image_flags

        refuse_text_to_image_flags(directory, {"--prompt": prompt, "--prompts": prompts_file, "--defense": defense,
                                               "--trigger": trigger, "--config": config},
                                   "--count, --sampler, --steps, --seed and --trigger-file")
        generate_uncond(model, output, count or 16, sampler, steps, seed, trigger_file, device, allow_pickle, overwrite)
        console.print(f"wrote {output}")
        return
    if count is not None or sampler is not None or trigger_file is not None:
        raise SealdiffError("--count, --sampler and --trigger-file apply to unconditional models")
    steps = steps or 20
    prompts = [decode_escapes(p) for p in (prompt or [])] + (read_prompt_file(prompts_file) if prompts_file else [])
    if not prompts:
        raise SealdiffError("give --prompt TEXT or --prompts FILE")
    if not all(p.strip() for p in prompts):
        raise SealdiffError("empty prompt")
    pipe = load_t2i(directory, device=resolve_device(device), allow_pickle=allow_pickle)
    seeds = [seed + i for i in range(len(prompts))]
    if defense is None:
        images = run(pipe, prompts, seeds, steps, guidance)
    elif defense == "sau":
        from sealdiff.config import build_config
        from sealdiff.defenses.sau import SAUConfig, generate_with_sau

        if not trigger:
            raise SealdiffError("--defense sau needs --trigger")
        images = generate_with_sau(pipe, prompts, decode_escapes(trigger), build_config(SAUConfig, config),
                                   seeds=seeds, num_inference_steps=steps, guidance_scale=guidance)
    else:
        raise SealdiffError(f"unknown inference-time defense {defense!r}; valid: sau")
    with atomic_output_file(output, overwrite, [directory]) as staging:
        save_grid(images.float().cpu(), staging)
    console.print(f"wrote {output}")


@app.command()
def demo(quick: bool = typer.Option(False, "--quick", help="fewer prompts and steps (about 2 minutes)"),
         output: Path = typer.Option(Path("runs/demo"), "-o", "--output", help="where the demo writes its results"),
         ) -> None:
    """The main job on the embedded default: zoo model -> BadT2I pixel backdoor -> measured attack success."""
    from sealdiff.demo import run_demo

    run_demo(output, quick=quick, console=console)


from sealdiff.cli import eval_report, remove, scan, uncond  # noqa: E402,F401  (register their commands)
