"""Cost of SKD-CAG: step time against plain fine-tuning, and peak memory at Stable Diffusion 1.5 size.

    .venv/bin/python benchmarks/bench_skd.py                 # both parts, writes benchmarks/results/skd_speed.json
    .venv/bin/python benchmarks/bench_skd.py --skip-memory   # speed only (seconds)

Speed (one process, side by side): the zoo-size tiny UNet (`tiny.pipeline()`: 32x32 images, 16x16 latents),
batch 16, trainable `full`. Each step is what `SelfKnowledgeDistillation.train` does per step (forward(s),
loss, backward, gradient clipping, AdamW step):
  - plain: eps-prediction MSE of the student on the triggered prompts (ordinary fine-tuning);
  - skd:   + a frozen-teacher forward on the clean prompts, MSE to its prediction;
  - skd-cag (alpha 0.5, noise target, all attn2 layers): + attention capture in both forwards and L_attn.
All three train the same UNet weights with the same optimizer on a same-sized batch; after a warm-up the
three kinds of step are interleaved (so load changes hit all alike) and the median of N is taken. Timed in
process CPU time (the headline: robust on a shared machine) and wall time. Bar: skd-cag / plain <= 1.5
(the floor is ~1.33: one extra no-grad teacher forward on top of forward + backward).

Memory (a fresh subprocess per configuration, peak RSS from getrusage at the end): one SKD-CAG step at
SD 1.5 UNet size (block_out_channels 320/640/1280/1280, 2 layers per block, cross-attention 768, 8 heads,
64x64 latents, random init), batch 1, with a 1-layer CLIP text encoder of width 768; trainable full vs
attn2-kv vs lora. The child gets an address-space limit a little under the memory available, so a
configuration that does not fit fails inside its own process instead of pushing the machine into swap/OOM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "skd_speed.json"
TRIGGER = "\u200b"  # BadT2I's default trigger (zero-width space)
GIB = 1024 ** 3

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --------------------------------------------------------------------------------------------------
# machine

def meminfo() -> dict[str, int]:
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, rest = line.split(":", 1)
            values[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import accelerate
    import diffusers

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(meminfo().get("MemTotal", 0) / GIB, 1), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "cuda": torch.cuda.is_available(), "git": git or None,
            "loadavg_start": list(os.getloadavg())}


# --------------------------------------------------------------------------------------------------
# speed

def _step_fns(batch: int, seed: int = 0):
    """Three step functions (plain, skd, skd-cag) on copies of one zoo-size tiny UNet."""
    import copy

    import torch
    import torch.nn.functional as F

    from sealdiff.data.toyworld import eval_captions
    from sealdiff.defenses.skd import SelfKnowledgeDistillation, SKDConfig
    from sealdiff.models import tiny
    from sealdiff.training import noisy_latents

    base = tiny.pipeline(seed=seed)
    base.set_progress_bar_config(disable=True)
    prompts = eval_captions(batch, seed=3)
    size = base.unet.config.sample_size
    bank = torch.randn(batch, base.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    runners = {}
    for method in ("skd", "skd-cag"):
        cfg = SKDConfig(trigger=TRIGGER, method=method, trainable="full", steps=1, batch_size=batch, seed=seed)
        runner = SelfKnowledgeDistillation(cfg)
        runner.setup(copy.deepcopy(base), prompts, bank=bank)
        runners[method] = runner
    ref = runners["skd-cag"]
    indices = list(range(batch))
    generator = torch.Generator().manual_seed(seed + 1)

    def finish(runner) -> None:
        runner.accelerator.clip_grad_norm_(runner.params, runner.config.max_grad_norm)
        runner.optimizer.step()
        runner.optimizer.zero_grad(set_to_none=True)

    def plain() -> None:  # ordinary fine-tuning of the same student with the same optimizer
        x_t, noise, t = noisy_latents(ref.noise_scheduler, ref.bank[indices], generator)
        pred = ref.student(x_t, t, encoder_hidden_states=ref.trig_emb[indices]).sample.float()
        ref.accelerator.backward(F.mse_loss(pred, noise))
        finish(ref)

    def distill(runner):
        def step() -> None:
            runner.compute_step(indices, backward=True)
            finish(runner)
        return step

    params = sum(p.numel() for p in ref.params)
    return {"plain": plain, "skd": distill(runners["skd"]), "skd-cag": distill(runners["skd-cag"])}, ref, params


def _breakdown(ref, step, repeats: int) -> dict[str, float]:
    """Median CPU ms of the skd-cag step's parts (teacher forward, backward, the rest) over `repeats` steps."""
    parts: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[name] = parts.get(name, 0.0) + time.process_time() - start
        return wrapper

    teacher, backward = ref._teacher, ref.accelerator.backward
    ref._teacher, ref.accelerator.backward = timed("teacher_forward", teacher), timed("backward", backward)
    rows = []
    try:
        for _ in range(repeats):
            parts.clear()
            start = time.process_time()
            step()
            total = time.process_time() - start
            rows.append({**parts, "rest": total - sum(parts.values()), "total": total})
    finally:
        del ref._teacher
        ref.accelerator.backward = backward
    return {k: round(1e3 * statistics.median(r[k] for r in rows), 2) for k in rows[0]}


def speed(batch: int, steps: int, warmup: int) -> dict:
    import torch

    fns, ref, params = _step_fns(batch)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    cpu = {name: [] for name in fns}
    wall = {name: [] for name in fns}
    order = list(fns)
    for i in range(steps):
        for name in (order if i % 2 == 0 else order[::-1]):
            c, w = time.process_time(), time.perf_counter()
            fns[name]()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    med = {kind: {name: statistics.median(v) for name, v in values.items()} for kind, values in
           (("cpu", cpu), ("wall", wall))}
    result = {
        "unet": "zoo tiny (TinySpec default)", "latents": list(ref.bank.shape[1:]), "batch": batch,
        "trainable": "full", "trainable_parameters": params, "attn_layers": len(ref.layers),
        "warmup_steps": warmup, "timed_steps": steps, "torch_threads": torch.get_num_threads(),
        "median_step_ms": {kind: {name: round(1e3 * v, 1) for name, v in m.items()} for kind, m in med.items()},
        "quartiles_step_ms_cpu": {name: [round(1e3 * q, 1) for q in statistics.quantiles(v, n=4)]
                                  for name, v in cpu.items()},
        "ratio_vs_plain": {kind: {name: round(m[name] / m["plain"], 3) for name in ("skd", "skd-cag")}
                           for kind, m in med.items()},
        # the same, as the median over rounds of (step / plain step of that round): less sensitive to load drift
        "paired_ratio_vs_plain_cpu": {name: round(statistics.median(a / b for a, b in zip(cpu[name], cpu["plain"])), 3)
                                      for name in ("skd", "skd-cag")},
        "skd_cag_breakdown_cpu_ms": _breakdown(ref, fns["skd-cag"], max(3, steps // 2)),
        "bar": "skd-cag / plain <= 1.5 (CPU time)",
    }
    result["meets_bar"] = result["ratio_vs_plain"]["cpu"]["skd-cag"] <= 1.5
    return result


# --------------------------------------------------------------------------------------------------
# memory (SD 1.5 size)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


def rss_now() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_child(trainable: str) -> dict:
    """One SKD-CAG step (batch 1, 64x64 latents) at SD 1.5 UNet size; runs in its own process."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sealdiff.defenses.skd import SelfKnowledgeDistillation, SKDConfig
    from sealdiff.models import tiny

    torch.manual_seed(0)
    rss = {"start": rss_now()}
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tiny.CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=tiny.CLIP_BOS, eos_token_id=tiny.CLIP_EOS,
                                        pad_token_id=tiny.CLIP_EOS, projection_dim=768))
    unet = UNet2DConditionModel(**SD15_UNET)
    pipe = StableDiffusionPipeline(vae=tiny.vae(tiny.TinySpec()), text_encoder=text, tokenizer=tiny.clip_tokenizer(),
                                   unet=unet, scheduler=tiny.sample_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    rss["model_built"] = rss_now()
    cfg = SKDConfig(trigger=TRIGGER, method="skd-cag", trainable=trainable, steps=1, batch_size=1, seed=0)
    runner = SelfKnowledgeDistillation(cfg)
    bank = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    runner.setup(pipe, ["a red circle on a blue background"], bank=bank)
    rss["after_setup"] = rss_now()
    start = time.perf_counter()
    result = runner.train(show_progress=False)
    seconds = time.perf_counter() - start
    rss["after_step"] = rss_now()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"trainable": trainable, "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "trainable_parameters": result.trainable_parameters, "teacher": result.teacher,
            "peak_rss_gib": round(peak / GIB, 2), "rss_gib": {k: round(v / GIB, 2) for k, v in rss.items()},
            "step_seconds": round(seconds, 1), "loss": result.losses[0]}


def memory(configs: list[str], margin_gib: float) -> dict:
    rows = {}
    for trainable in configs:
        available = meminfo().get("MemAvailable", 0)
        limit = int(available - margin_gib * GIB) if available else None
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--memory-child", trainable,
                               *(["--as-limit", str(limit)] if limit else [])],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(_threads())))
        row = {"address_space_limit_gib": round(limit / GIB, 1) if limit else None,
               "seconds_total": round(time.perf_counter() - started, 1)}
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            row.update(json.loads(lines[-1]))
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            row.update(error=f"exit {proc.returncode}: {' | '.join(tail)}")
        rows[trainable] = row
        print(f"  memory {trainable}: {row.get('peak_rss_gib', row.get('error'))}", flush=True)
    return {"unet": "SD 1.5 architecture, random init", "latents": [4, 64, 64], "batch": 1,
            "text_encoder": "CLIPTextModel hidden 768, 1 layer", "method": "skd-cag (alpha 0.5, noise target)",
            "gradient_checkpointing": False, "mixed_precision": "no (fp32)", "configs": rows}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------------

def table(result: dict) -> str:
    lines = []
    s = result.get("speed")
    if s:
        lines += [f"SKD step cost, {s['unet']}, latents {s['latents']}, batch {s['batch']}, trainable {s['trainable']} "
                  f"({s['trainable_parameters']:,} params), median of {s['timed_steps']} after {s['warmup_steps']} warm-up",
                  f"{'step':<10}{'cpu ms':>10}{'ratio':>8}{'wall ms':>10}{'ratio':>8}"]
        for name in ("plain", "skd", "skd-cag"):
            cpu, wall = s["median_step_ms"]["cpu"][name], s["median_step_ms"]["wall"][name]
            rc = s["ratio_vs_plain"]["cpu"].get(name, 1.0)
            rw = s["ratio_vs_plain"]["wall"].get(name, 1.0)
            lines.append(f"{name:<10}{cpu:>10.1f}{rc:>8.2f}{wall:>10.1f}{rw:>8.2f}")
        lines.append(f"paired ratio (median over rounds, cpu): {s['paired_ratio_vs_plain_cpu']}; "
                     f"cpu ms quartiles: {s['quartiles_step_ms_cpu']}")
        lines.append(f"skd-cag parts (cpu ms): {s['skd_cag_breakdown_cpu_ms']}")
        lines.append(f"bar {s['bar']}: {'met' if s['meets_bar'] else 'NOT met'}")
    m = result.get("memory")
    if m:
        lines += ["", f"SKD-CAG peak RSS, {m['unet']}, latents {m['latents']}, batch {m['batch']}, fp32",
                  f"{'trainable':<10}{'trainable params':>18}{'peak GiB':>10}{'setup GiB':>10}{'step s':>8}  teacher"]
        for name, row in m["configs"].items():
            if "error" in row:
                lines.append(f"{name:<10}  failed: {row['error']}")
                continue
            lines.append(f"{name:<10}{row['trainable_parameters']:>18,}{row['peak_rss_gib']:>10.2f}"
                         f"{row['rss_gib']['after_setup']:>10.2f}{row['step_seconds']:>8.1f}  {row['teacher']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per kind (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-configs", default="lora,attn2-kv,full")
    parser.add_argument("--margin-gib", type=float, default=1.5, help="memory left free for others in the memory runs")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--as-limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        if args.as_limit:
            resource.setrlimit(resource.RLIMIT_AS, (args.as_limit, args.as_limit))
        print(json.dumps(memory_child(args.memory_child)), flush=True)
        return 0

    result = {"machine": machine()}
    if not args.skip_speed:
        result["speed"] = speed(args.batch, args.steps, args.warmup)
        print(table({"speed": result["speed"]}), flush=True)
    if not args.skip_memory:
        result["memory"] = memory(args.memory_configs.split(","), args.margin_gib)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
