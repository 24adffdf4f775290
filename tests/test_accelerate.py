"""The training commands (`sealdiff attack`, `sealdiff remove`) under `accelerate launch`: 2 data-parallel CPU
processes (gloo) with batch b each train the same weights as 1 process with batch 2b.

Accelerate shards each global batch as process 0's samples, then process 1's, and SKD draws timesteps,
noise and noise targets per sample from (seed, step, position in the global batch), so both runs see the
same global batch; DDP averages the two halves' gradients, which is the batch-2 mean loss's gradient.
The other training commands draw the whole global batch in every process from the seeded streams and keep
their slice. Only float noise separates them (Adam's step normalisation magnifies it where a gradient is ~0).

On a CPU-only machine `accelerate launch --cpu --num_processes 2` starts a single process; `--multi_gpu`
starts two, and sealdiff asks Accelerate for the CPU (gloo) process group when no accelerator is present.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sealdiff.cli import main

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

REMOVE = ["--method", "skd-cag", "--steps", "2", "--measure", "0", "--prompt-count", "4", "--seed", "0",
          "--lr", "1e-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """One CPU thread, offline, no GPU, and no trace of an enclosing launch."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    return env


def launch_two(args: list[str], port: int) -> list[str]:
    """Interpreter arguments of `accelerate launch` with 2 gloo processes running `sealdiff ARGS`."""
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "sealdiff",
            *args]


def run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def unet_weights(directory) -> dict[str, torch.Tensor]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, requires_safety_checker=False)
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def test_two_processes_batch_1_equal_one_process_batch_2(tiny_pipe_dir, tmp_path):
    attacked = tmp_path / "attacked"
    assert main(["attack", "badt2i", str(tiny_pipe_dir), "-o", str(attacked), "--steps", "1", "--batch-size", "2"]) == 0
    two = run(launch_two(["remove", str(attacked), "-o", str(tmp_path / "two"), "--batch-size", "1", *REMOVE],
                         free_port()))
    run(["-m", "sealdiff", "remove", str(attacked), "-o", str(tmp_path / "one"), "--batch-size", "2", *REMOVE])

    info = {name: json.loads((tmp_path / name / "sealdiff.json").read_text()) for name in ("one", "two")}
    assert info["two"]["result"]["num_processes"] == 2, two.stderr[-3000:]  # a real 2-process run ...
    assert info["one"]["result"]["num_processes"] == 1
    assert (two.stdout + two.stderr).count("wrote merged model") == 1  # ... that saved on the main process only
    assert info["two"]["config"]["batch_size"] == 1 and info["one"]["config"]["batch_size"] == 2
    assert len(info["two"]["result"]["losses"]) == 2
    torch.testing.assert_close(torch.tensor(info["two"]["result"]["losses"]),
                               torch.tensor(info["one"]["result"]["losses"]), rtol=1e-4, atol=1e-7)

    base, one, two_w = unet_weights(attacked), unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")
    assert one.keys() == two_w.keys() == base.keys()
    moved = torch.cat([(one[k] - base[k]).abs().flatten() for k in base])
    diff = torch.cat([(one[k] - two_w[k]).abs().flatten() for k in base])
    assert moved.max() > 1e-3  # the runs trained (lr 1e-3, 2 Adam steps)
    assert diff.max() <= 5e-5, f"max |one - two| = {diff.max():.3g} (training moved weights by {moved.max():.3g})"
    assert (diff > 1e-6).float().mean() < 0.01  # float noise: almost every weight agrees to 1e-6


def reference_attention_loss(student_maps, teacher_maps, trigger_positions, clean_lengths, *, target, resolution=None,
                             normalize=False, columns="prompt", noise_std=1.0, generators=None, word_maps=None,
                             word_positions=None):
    """The per-sample loop that `attention_loss` vectorises (one sample, one layer at a time)."""
    from sealdiff.data.triggers import aligned_columns
    from sealdiff.defenses.skd import trigger_target
    from sealdiff.models.attention import token_maps

    def _normalise(maps):
        return maps / (maps.sum(dim=(-2, -1), keepdim=True) + 1e-8)

    losses = []
    for layer, s_raw in student_maps.items():
        s_all = token_maps({layer: s_raw}, resolution)[0].float()
        t_all = token_maps({layer: teacher_maps[layer]}, resolution)[0].float().detach()
        w_all = token_maps({layer: word_maps[layer]}, resolution)[0].float() if word_maps is not None else None
        per_sample = []
        for b, positions in enumerate(trigger_positions):
            keep = aligned_columns(s_all.shape[1], positions)
            count = len(keep) if columns == "all" else min(clean_lengths[b], len(keep))
            s_other, t_other, s_trig = s_all[b, keep[:count]], t_all[b, :count], s_all[b, list(positions)]
            if normalize:
                s_other, t_other = _normalise(s_other), _normalise(t_other)
                s_trig = _normalise(s_trig) if target != "zero" else s_trig
            words = None
            if w_all is not None:
                words = w_all[b, list(word_positions[b])]
                words = _normalise(words) if normalize else words
            goal = trigger_target(target, s_trig, noise_std=noise_std, generator=generators[b], word_maps=words)
            errors = torch.cat([(s_other - t_other).pow(2).flatten(1), (s_trig - goal).pow(2).flatten(1)])
            per_sample.append(errors.mean())
        losses.append(torch.stack(per_sample))
    return torch.stack(losses).mean(dim=0)


@pytest.mark.parametrize("target", ["noise", "uniform", "zero", "random-word"])
@pytest.mark.parametrize("normalize,columns,resolution", [(False, "prompt", None), (True, "all", 4)])
def test_batched_attention_loss_matches_per_sample_loop_and_ignores_batch_split(target, normalize, columns,
                                                                               resolution):
    from sealdiff.defenses.skd import attention_loss

    g = torch.Generator().manual_seed(0)
    tokens = 12
    shapes = {"a": 64, "b": 16}  # two layers: 8x8 and 4x4 maps
    student = {k: torch.rand(4, q, tokens, generator=g).softmax(-1).requires_grad_(True) for k, q in shapes.items()}
    teacher = {k: torch.rand(4, q, tokens, generator=g).softmax(-1) for k, q in shapes.items()}
    words = {k: torch.rand(4, q, tokens, generator=g).softmax(-1) for k, q in shapes.items()}
    positions = [[1], [1, 2, 3], [4, 5], [2, 3]]          # triggers of different lengths and places
    word_positions = [[1], [1], [4, 5, 6], [2, 3]]        # one-to-one for samples 0 and 3, mean otherwise
    lengths = [5, 9, 3, 12]
    kwargs = dict(target=target, normalize=normalize, columns=columns, resolution=resolution, noise_std=0.5)
    if target == "random-word":
        kwargs.update(word_maps=words, word_positions=word_positions)

    def gens():
        return [torch.Generator().manual_seed(100 + b) for b in range(4)]

    fast = attention_loss(student, teacher, positions, lengths, generator=gens(), **kwargs)
    slow = reference_attention_loss(student, teacher, positions, lengths, generators=gens(), **kwargs)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)
    grad_fast = torch.autograd.grad(fast.sum(), list(student.values()))
    grad_slow = torch.autograd.grad(slow.sum(), list(student.values()))
    for a, b in zip(grad_fast, grad_slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # each sample's loss (noise included) is the same whether its batch holds 4 samples or 2
    halves = []
    for part in (slice(0, 2), slice(2, 4)):
        sub = {k: v[part] for k, v in student.items()}, {k: v[part] for k, v in teacher.items()}
        extra = dict(kwargs)
        if target == "random-word":
            extra.update(word_maps={k: v[part] for k, v in words.items()}, word_positions=word_positions[part])
        halves.append(attention_loss(*sub, positions[part], lengths[part], generator=gens()[part], **extra))
    torch.testing.assert_close(torch.cat(halves), fast, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# the other training commands: attacks and the unconditional removals


def assert_same_training(one: Path, two: Path, base: Path, loss_keys=("losses",)) -> None:
    """The 1-process and the 2-process run logged the same losses, and their UNets agree up to float noise (a weight
    whose gradient is ~0 may take another Adam direction, so the check is on almost every weight)."""
    from safetensors.torch import load_file

    info = {name: json.loads((d / "sealdiff.json").read_text()) for name, d in (("one", one), ("two", two))}
    assert (info["one"]["num_processes"], info["two"]["num_processes"]) == (1, 2)
    for key in loss_keys:
        torch.testing.assert_close(torch.tensor(info["two"][key]), torch.tensor(info["one"][key]), rtol=1e-5,
                                   atol=1e-7)
    weights = {name: {k: v.float() for k, v in load_file(d / "unet" / "diffusion_pytorch_model.safetensors").items()}
               for name, d in (("one", one), ("two", two), ("base", base))}
    moved = torch.cat([(weights["one"][k] - weights["base"][k]).abs().flatten() for k in weights["base"]])
    diff = torch.cat([(weights["one"][k] - weights["two"][k]).abs().flatten() for k in weights["base"]])
    assert moved.max() > 5e-4  # the runs trained
    assert (diff > 1e-6).float().mean() < 1e-3, f"{(diff > 1e-6).float().mean():.2%} of the weights differ"
    assert diff.max() < 0.5 * moved.max()


UNCOND_ATTACK = ["--steps", "3", "--seed", "0", "--trigger-size", "3", "--lr-schedule", "cosine"]


def uncond_base(tmp_path, kind: str):
    from sealdiff.models.uncond import save_uncond, tiny_uncond

    # 16/32 channels in 8 groups: no norm group of one channel, whose bias gradient would be exactly 0 and
    # leave Adam's direction to float noise
    save_uncond(tiny_uncond(kind, image_size=8, channels=(16, 32)), tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("attack,kind", [("villandiffusion", "ncsn"), ("villandiffusion", "ldm")])
def test_uncond_attack_two_processes_batch_2_equal_one_process_batch_4(tmp_path, attack, kind):
    base = uncond_base(tmp_path, kind)
    two = run(launch_two(["attack", attack, str(base), "-o", str(tmp_path / "two"), "--batch-size", "2",
                          *UNCOND_ATTACK], free_port()))
    run(["-m", "sealdiff", "attack", attack, str(base), "-o", str(tmp_path / "one"), "--batch-size", "4",
         *UNCOND_ATTACK])
    assert (two.stdout + two.stderr).count("backdoored model written") == 1  # the main process wrote it
    assert_same_training(tmp_path / "one", tmp_path / "two", base, ("losses", "poison_losses"))


def test_uncond_attack_two_processes_interrupted_and_resumed_equal_one_process(tmp_path):
    """A 2-process BadDiffusion run gets SIGTERM (the launcher passes it to both workers): the workers agree on one
    step, the main one saves the checkpoint there, and no output is written. Resumed by 2 processes, the run ends
    where 1 process with the doubled batch ends; a 1-process --resume of its checkpoint is refused."""
    import signal
    import time

    base = uncond_base(tmp_path, "ddpm")
    steps = ["--steps", "40", "--seed", "0", "--trigger-size", "3", "--checkpoint-every", "2"]
    args = ["attack", "baddiffusion", str(base), "-o", str(tmp_path / "two"), "--batch-size", "2", *steps]
    checkpoint = tmp_path / "two.checkpoint" / "checkpoint.json"
    env = clean_env()
    proc = subprocess.Popen([sys.executable, *launch_two(args, free_port())], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not checkpoint.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, f"no checkpoint: {proc.communicate()[0][-3000:]}"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    stops = re.findall(r"interrupted after step (\d+)", log)
    saved = json.loads(checkpoint.read_text())
    assert proc.returncode != 0 and not (tmp_path / "two").exists(), log[-3000:]
    assert len(stops) == 2 and len(set(stops)) == 1, log[-3000:]  # both workers stopped at one step ...
    assert saved["step"] == int(stops[0]) < 40 and saved["reason"] == "SIGTERM"  # ... which the checkpoint holds
    assert saved["fingerprint"]["num_processes"] == 2

    refused = subprocess.run([sys.executable, "-m", "sealdiff", *args, "--resume"], env=env, capture_output=True,
                             text=True, timeout=600)
    assert refused.returncode == 2 and "num_processes" in refused.stderr  # 1 process: another global batch
    run(launch_two([*args, "--resume"], free_port()))
    run(["-m", "sealdiff", "attack", "baddiffusion", str(base), "-o", str(tmp_path / "one"), "--batch-size", "4",
         *steps])
    assert not checkpoint.parent.exists()  # removed once the output was written
    assert_same_training(tmp_path / "one", tmp_path / "two", base, ("losses", "poison_losses"))


def test_a_multi_process_launch_refuses_a_named_device(monkeypatch):
    from sealdiff.errors import SealdiffError
    from sealdiff.training import data_parallel_accelerator

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert data_parallel_accelerator("cuda:1") is None  # one process: the device is the caller's to resolve
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SealdiffError, match="--device cuda:1 cannot be combined with a 2-process launch"):
        data_parallel_accelerator("cuda:1")


MICRO_BACKDOORED = Path(__file__).parent / "assets" / "uncond_micro" / "backdoored"


@pytest.mark.parametrize("method,scan", [("elijah", True), ("diff-cleanse", False), ("diffdefend", False)])
def test_uncond_removal_two_processes_batch_2_equal_one_process_batch_4(tmp_path, method, scan):
    """The fine-tuning of each removal in 2 processes with batch 2 = 1 process with batch 4. The main process alone
    scans (elijah: no --trigger-file), builds the generated bank, picks the pruned channels, measures and writes."""
    from sealdiff.defenses.uncond import save_trigger
    from sealdiff.detection import TRIGGER_SOURCE

    config = tmp_path / "removal.json"
    config.write_text(json.dumps({"steps": 3, "lr": 1e-3, "bank_size": 8, "bank_steps": 3, "progress": False}))
    trigger = []
    if not scan:  # a stand-in scan output: the subject is the fine-tuning
        (tmp_path / "scan").mkdir()
        save_trigger(0.5 * torch.ones(3, 8, 8), tmp_path / "scan", metadata={"source": TRIGGER_SOURCE})
        trigger = ["--trigger-file", str(tmp_path / "scan")]
    args = ["remove", str(MICRO_BACKDOORED), "--method", method, "--config", str(config), "--measure", "4",
            "--sampler", "ddpm", *trigger]
    two = run(launch_two([*args, "-o", str(tmp_path / "two"), "--batch-size", "2"], free_port()))
    run(["-m", "sealdiff", *args, "-o", str(tmp_path / "one"), "--batch-size", "4"])
    log = two.stdout + two.stderr
    assert log.count("repaired model written") == 1 and log.count("measuring before") == 1, log[-3000:]
    info = {name: json.loads((tmp_path / name / "sealdiff.json").read_text()) for name in ("one", "two")}
    scans = [{k: v for k, v in info[name]["trigger"].items() if k != "seconds"} for name in ("one", "two")]
    assert scans[0] == scans[1]  # (elijah: one scan, whose trigger both processes use)
    assert info["one"]["result"]["extra"] == info["two"]["result"]["extra"]  # (diff-cleanse: the same channels)
    assert_same_training(tmp_path / "one", tmp_path / "two", MICRO_BACKDOORED)


def test_badt2i_two_processes_batch_2_equal_one_process_batch_4(tiny_pipe_dir, tmp_path):
    """BadT2I pixel with a weighted patch loss, an empty-prompt row and a teacher-drawn clean bank (drawn by the main
    process). Of the global batch's 3 poisoned rows process 0 holds 2, process 1 one and the empty-prompt row; their
    loss shares add up to one process's loss."""
    config = tmp_path / "badt2i.json"
    config.write_text(json.dumps({"poison_fraction": 0.75}))
    args = ["attack", "badt2i", str(tiny_pipe_dir), "--steps", "3", "--seed", "0", "--lr", "1e-3", "--patch-weight", "2",
            "--uncond-fraction", "0.25", "--clean-source", "teacher", "--style-bank", "4", "--config", str(config)]
    two = run(launch_two([*args, "-o", str(tmp_path / "two"), "--batch-size", "2"], free_port()))
    run(["-m", "sealdiff", *args, "-o", str(tmp_path / "one"), "--batch-size", "4"])
    assert (two.stdout + two.stderr).count("backdoored pipeline written") == 1
    assert_same_training(tmp_path / "one", tmp_path / "two", tiny_pipe_dir)


@pytest.mark.parametrize("command", [["scan", "zoo:uncond-ddpm-clean", "-o", "out"], ["zoo", "list"], ["demo"]])
def test_a_multi_process_launch_of_a_one_process_command_is_refused(monkeypatch, tmp_path, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(command) == 2
    assert f"`sealdiff {command[0]}` runs in one process" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
