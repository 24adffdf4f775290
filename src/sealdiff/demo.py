"""`sealdiff demo`: the main job on the embedded default, end to end.

1. Take the zoo's clean model and its U+200B pixel backdoor (`t2i-badt2i-pixel`).
2. Repair the backdoored model with SKD-CAG (noise target) from toy prompts only.
3. Evaluate clean / backdoored / repaired on the same prompts and seeds (attack success, false triggers,
   clean accuracy, SSIM and toy FID against the backdoored model).
4. Write the HTML report and print a short table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sealdiff.data import toyworld
from sealdiff.defenses.skd import SelfKnowledgeDistillation, SKDConfig
from sealdiff.io import atomic_output_dir, directory_sha256, read_run_info, write_run_info
from sealdiff.metrics.evaluate import EvalConfig, evaluate_model
from sealdiff.models import zoo
from sealdiff.models.loading import load_t2i
from sealdiff.report.html import write_report

logger = logging.getLogger(__name__)

BACKDOORED = "t2i-badt2i-pixel"
REPAIR_PROMPT_SEED = 555


@dataclass(frozen=True)
class DemoPlan:
    prompts: int  # evaluation prompts per set
    repair_steps: int
    repair_prompts: int

    @classmethod
    def choose(cls, quick: bool) -> "DemoPlan":
        # sized for the bars of benchmarks/bench_demo.py on 2 CPU cores: <= 2 min quick, <= 10 min full
        return cls(prompts=12, repair_steps=150, repair_prompts=32) if quick else cls(100, 150, 100)


def run_demo(output: Path, quick: bool = False, console: Console | None = None) -> dict:
    console = console or Console()
    plan = DemoPlan.choose(quick)
    with atomic_output_dir(output, overwrite=True) as staging:
        if BACKDOORED in zoo.model_names():
            backdoored_dir, backdoored_spec = zoo.materialize(BACKDOORED), f"zoo:{BACKDOORED}"
        else:  # implant it the way the zoo's recipe does
            from sealdiff.recipes.zoo import ZOO_ATTACKS, implant_zoo_attack

            steps = sum(stage["steps"] for stage in ZOO_ATTACKS[BACKDOORED])
            console.print(f"[bold]0/3 attack[/bold] zoo:t2i-clean with the BadT2I pixel backdoor ({steps} steps)")
            backdoored_dir = backdoored_spec = staging / "backdoored-model"
            implant_zoo_attack(BACKDOORED, "zoo:t2i-clean", backdoored_dir)
        trigger = read_run_info(backdoored_dir)["attack"]["trigger"]
        console.print(f"[bold]1/3 repair[/bold] {backdoored_spec} with SKD-CAG (noise target, cross-attention "
                      f"K/V only), {plan.repair_steps} steps on {plan.repair_prompts} toy prompts")
        pipe = load_t2i(backdoored_dir)
        # the recipe chosen on the validation prompts (README, "Removal on the zoo")
        config = SKDConfig(trigger=trigger, method="skd-cag", target="noise", steps=plan.repair_steps,
                           batch_size=8, lr=1e-4, trainable="attn2-kv", seed=0)
        runner = SelfKnowledgeDistillation(config)
        prompts = [s.caption for s in toyworld.scenes(REPAIR_PROMPT_SEED, plan.repair_prompts)]
        result = runner.apply(pipe, prompts)
        repaired = staging / "repaired-model"
        runner.save(pipe, repaired, result, trigger=trigger, losses=result.losses,
                    parent={"path": str(backdoored_spec), "sha256": directory_sha256(backdoored_dir)},
                    attack=read_run_info(backdoored_dir)["attack"])
        del pipe
        console.print(f"[bold]2/3 evaluate[/bold] clean, backdoored and repaired models on {plan.prompts} "
                      "triggered and clean prompts (same seeds)")
        runs, results = [], {}
        for label, model in (("clean", "zoo:t2i-clean"), ("backdoored", str(backdoored_spec)),
                             ("repaired (SKD-CAG)", str(repaired))):
            run_dir = staging / "runs" / label.split()[0]
            eval_config = EvalConfig(count=plan.prompts, label=label, reference=str(backdoored_spec))
            results[label] = evaluate_model(model, trigger=trigger, config=eval_config, output=run_dir,
                                            target=_pixel_target(backdoored_dir))
            runs.append(run_dir)
        console.print("[bold]3/3 report[/bold]")
        write_report(runs, staging / "report.html", title="sealdiff demo: U+200B pixel backdoor, SKD-CAG repair")
        summary = {label: r.metrics() for label, r in results.items()}
        write_run_info(staging, command="demo", quick=quick, plan=plan, trigger=trigger, results=summary)
    table = Table("model", "attack success", "false trigger", "clean shape / fg / bg", "SSIM vs backdoored")
    for label, r in results.items():
        metrics = r.metrics()
        acc = metrics["utility"]["attribute_accuracy"]
        ssim = metrics["utility"]["ssim"]["value"]
        table.add_row(label, f"{metrics['attack_success']:.1%}", f"{metrics['false_trigger']:.1%}",
                      f"{acc['shape']:.0%} / {acc['fg']:.0%} / {acc['bg']:.0%}",
                      "—" if ssim is None else f"{ssim:.3f}")
    console.print(table)
    console.print(f"report: [bold]{output / 'report.html'}[/bold]")
    return summary


def _pixel_target(backdoored_dir: Path):
    from sealdiff.metrics.backdoor import Target

    return Target.from_run_info(read_run_info(backdoored_dir))

