"""Interruptible long runs: `attack badt2i` and `remove` save `<output>.checkpoint/` every N steps and on
SIGTERM/Ctrl-C, and `--resume` continues it to the weights and losses of an uninterrupted run.

The CLI runs in subprocesses that are SIGKILLed (no chance to clean up) or SIGTERMed once a checkpoint
appears; the last resume runs in-process (it only has to read what the killed processes left)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sealdiff.cli import main
from sealdiff.errors import SealdiffError
from sealdiff.training import Checkpointer, checkpoint_dir

ATTACK = ["--steps", "12", "--batch-size", "2", "--seed", "0", "--threads", "1", "--lr-schedule", "cosine",
          "--warmup-steps", "2", "--ema-decay", "0.9"]  # a decaying rate and an EMA: their states must survive the kills too
REMOVE = ["--method", "skd-cag", "--steps", "8", "--measure", "0", "--prompt-count", "4", "--seed", "0",
          "--threads", "1", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny pipeline, an uninterrupted attack of it, and an uninterrupted removal of that attack."""
    from sealdiff.models import tiny

    root = tmp_path_factory.mktemp("resume")
    tiny.pipeline(tiny.TinySpec.test()).save_pretrained(root / "tiny", safe_serialization=True)
    assert main(["attack", "badt2i", str(root / "tiny"), "-o", str(root / "attacked"), *ATTACK,
                 "--checkpoint-every", "0"]) == 0
    assert main(["remove", str(root / "attacked"), "-o", str(root / "removed"), *REMOVE,
                 "--checkpoint-every", "0"]) == 0
    return root


def launch(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "sealdiff", *args], env=env, stdout=handle,
                                stderr=subprocess.STDOUT)


def saved_step(directory: Path) -> int | None:
    try:
        return json.loads((directory / "checkpoint.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def signal_after(proc: subprocess.Popen, directory: Path, step: int, log: Path, sig=signal.SIGKILL) -> int:
    """Send `sig` once the checkpoint in `directory` holds `step` or more steps; returns the exit code."""
    deadline = time.monotonic() + 300
    while (saved_step(directory) or 0) < step:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint of step {step} before the run ended (rc {proc.wait()}):\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.005)
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def unet_weights(directory: Path) -> dict[str, torch.Tensor]:
    from sealdiff.models.loading import load_t2i

    pipe = load_t2i(directory)  # the result is a complete, loadable pipeline
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def assert_same_run(result: Path, reference: Path, loss_key) -> None:
    got, want = unet_weights(result), unet_weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    info, ref = (json.loads((d / "sealdiff.json").read_text()) for d in (result, reference))
    torch.testing.assert_close(torch.tensor(loss_key(info)), torch.tensor(loss_key(ref)), rtol=1e-6, atol=1e-7)
    assert not checkpoint_dir(result).exists()  # removed once the output is complete
    assert not [p for p in result.parent.iterdir() if ".partial-" in p.name or ".tmp-" in p.name]


def test_attack_sigkilled_twice_resumes_to_the_uninterrupted_weights(models, tmp_path):
    out, args = tmp_path / "out", ["attack", "badt2i", str(models / "tiny"), "-o", str(tmp_path / "out"), *ATTACK,
                                   "--checkpoint-every", "3"]
    ckpt, log = checkpoint_dir(out), tmp_path / "log"
    assert signal_after(launch(args, log), ckpt, 3, log) == -signal.SIGKILL  # after the 1st checkpoint
    assert not out.exists() and saved_step(ckpt) >= 3
    # after the 2nd: the 3rd (step 9) would leave 3 steps, which a loaded machine's poll can miss
    assert signal_after(launch([*args, "--resume"], log), ckpt, 6, log) == -signal.SIGKILL
    assert not out.exists() and saved_step(ckpt) >= 6
    assert main([*args, "--resume"]) == 0
    assert_same_run(out, models / "attacked", lambda info: info["losses"])


@pytest.mark.parametrize("kills", [pytest.param((6,), id="after-3rd-checkpoint"),
                                   pytest.param((2, 4), id="after-1st-and-2nd", marks=pytest.mark.slow)])
def test_remove_sigkilled_resumes_to_the_uninterrupted_weights(models, tmp_path, kills):
    out = tmp_path / "out"
    args = ["remove", str(models / "attacked"), "-o", str(out), *REMOVE, "--checkpoint-every", "2"]
    ckpt, log = checkpoint_dir(out), tmp_path / "log"
    for number, step in enumerate(kills):
        assert signal_after(launch([*args, "--resume"] if number else args, log), ckpt, step, log) == -signal.SIGKILL
        assert not out.exists() and saved_step(ckpt) >= step
    assert main([*args, "--resume"]) == 0  # fast-forwards the data order across an epoch (4 prompts, batch 1)
    assert_same_run(out, models / "removed", lambda info: info["result"]["losses"])
    info = json.loads((out / "sealdiff.json").read_text())
    assert info["losses"] == info["result"]["losses"] and len(info["losses"]) == 8


@pytest.mark.slow  # a third CLI start; the in-process SKD test below covers SIGTERM handling by default
def test_sigterm_saves_a_checkpoint_and_resume_completes(models, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    args = ["attack", "badt2i", str(models / "tiny"), "-o", str(out), *ATTACK, "--checkpoint-every", "3"]
    ckpt = checkpoint_dir(out)
    code = signal_after(launch(args, log), ckpt, 3, log, sig=signal.SIGTERM)
    assert code != 0 and code != -signal.SIGTERM, log.read_text()[-2000:]  # handled: a clean, non-zero exit
    assert not out.exists() and "interrupted" in log.read_text()
    index = json.loads((ckpt / "checkpoint.json").read_text())
    assert index["reason"] == "SIGTERM" and index["step"] > 3  # saved on the signal, not by the schedule
    assert main([*args, "--resume"]) == 0
    assert_same_run(out, models / "attacked", lambda info: info["losses"])


def test_nan_loss_keeps_the_last_good_checkpoint_and_resume_checks_settings(models, tmp_path, monkeypatch, capsys):
    import types

    import torch.nn.functional as F

    from sealdiff.attacks import badt2i, run_attack

    calls = []

    def mse_loss(a, b):  # two calls per step; NaN from step 5 on
        calls.append(1)
        return F.mse_loss(a, b) * (float("nan") if len(calls) > 8 else 1.0)

    out = tmp_path / "out"
    ckpt = checkpoint_dir(out)
    cfg = badt2i.BadT2IConfig(steps=6, batch_size=2, seed=0)
    monkeypatch.setattr(badt2i, "F", types.SimpleNamespace(mse_loss=mse_loss))
    with pytest.raises(SealdiffError, match=r"NaN/inf at step 5.*checkpoint \(after step 4\) is kept"):
        run_attack(str(models / "tiny"), cfg, out, checkpoint_every=2)
    monkeypatch.undo()
    assert not out.exists()
    step, state, _ = Checkpointer(ckpt, resume=True).load()
    assert step == 4 and len(state["losses"]) == 4
    assert all(torch.isfinite(w).all() for w in state["weights"].values())
    assert set(os.listdir(ckpt)) == {"checkpoint.json", "state-00000004.safetensors"}

    args = ["attack", "badt2i", str(models / "tiny"), "-o", str(out), "--steps", "6", "--batch-size", "2",
            "--seed", "0", "--checkpoint-every", "2"]
    capsys.readouterr()
    assert main([*args[:5], "--steps", "7", *args[7:], "--resume"]) == 2  # a different config is refused
    assert "steps: checkpoint 6, now 7" in capsys.readouterr().err
    assert main(args) == 2  # an existing checkpoint without --resume is refused ...
    assert "--resume" in capsys.readouterr().err
    assert saved_step(ckpt) == 4
    assert main([*args, "--resume"]) == 0  # ... and resuming it finishes the run
    losses = json.loads((out / "sealdiff.json").read_text())["losses"]
    assert losses[:4] == state["losses"] and len(losses) == 6 and all(v == v for v in losses)
    assert not ckpt.exists()


def test_resume_without_a_checkpoint_and_unsafe_saves_are_refused(models, tmp_path, capsys):
    assert main(["attack", "badt2i", str(models / "tiny"), "-o", str(tmp_path / "o"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["remove", str(models / "attacked"), "-o", str(tmp_path / "o"), "--resume", *REMOVE]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    # the checkpoint folder may not overlap the input model
    with pytest.raises(SealdiffError, match="would overwrite the input"):
        Checkpointer.next_to(models / "tiny" / "unet" / "x", 1, inputs=[models / "tiny"])
    # NaN tensors are never written over a good checkpoint
    ckpt = Checkpointer(tmp_path / "c", every=1)
    ckpt.start({"config": {"a": 1}})
    ckpt.save(1, {"w": torch.ones(2)})
    with pytest.raises(SealdiffError, match=r"NaN/inf after step 2.*after step 1"):
        ckpt.save(2, {"w": torch.tensor([1.0, float("nan")])})
    assert Checkpointer(tmp_path / "c", resume=True).load()[0] == 1


def test_state_round_trips_exactly(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    rng, generator = random.Random(5), torch.Generator().manual_seed(3)
    rng.random(), torch.randn(2, generator=generator)
    state = {"optimizer": optimizer.state_dict(), "random": rng.getstate(), "generator": generator.get_state(),
             "losses": [0.1, 1 / 3], "nested": {1: (None, "x", True)}}
    ckpt = Checkpointer(tmp_path / "c")
    ckpt.start({"config": {"steps": 3}})
    ckpt.save(7, state)
    step, loaded, fingerprint = Checkpointer(tmp_path / "c", resume=True).load()
    assert step == 7 and fingerprint == {"config": {"steps": 3}}
    assert loaded["random"] == rng.getstate() and loaded["losses"] == [0.1, 1 / 3]
    assert loaded["nested"] == {1: (None, "x", True)}
    assert torch.equal(loaded["generator"], generator.get_state())
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-2)
    fresh.load_state_dict(loaded["optimizer"])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value)
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    with pytest.raises(SealdiffError, match=r"different settings \(config.steps: checkpoint 3, now 4\)"):
        Checkpointer(tmp_path / "c", resume=True).start({"config": {"steps": 4}})


def test_skd_lora_ema_interrupted_in_process_resumes_exactly(tmp_path, monkeypatch):
    """SIGTERM (to this process) during step 2 of a LoRA + EMA run: checkpoint after step 2, KeyboardInterrupt;
    a fresh process-state resume gives the uninterrupted run's weights (EMA shadow and optimizer included)."""
    from sealdiff.data.toyworld import eval_captions
    from sealdiff.defenses.skd import SelfKnowledgeDistillation, SKDConfig
    from sealdiff.models import tiny

    prompts = eval_captions(2, seed=3)
    cfg = dict(trigger="\u13aa", steps=4, batch_size=1, bank_steps=2, lr=5e-2, seed=0, trainable="lora", ema=True,
               ema_decay=0.5)

    def run(checkpointer=None, interrupt_at=None):
        pipe = tiny.pipeline(tiny.TinySpec.test(), seed=0)
        pipe.set_progress_bar_config(disable=True)
        skd = SelfKnowledgeDistillation(SKDConfig(**cfg))
        if interrupt_at is not None:
            compute = skd.compute_step

            def step(*args, **kwargs):
                if skd.draws == interrupt_at - 1:
                    signal.raise_signal(signal.SIGTERM)  # arrives mid-step; the step still completes
                return compute(*args, **kwargs)

            monkeypatch.setattr(skd, "compute_step", step)
        result = skd.apply(pipe, prompts, show_progress=False, checkpointer=checkpointer)
        return result, {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora" in n}

    want, weights = run()
    directory = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run(Checkpointer(directory, every=100), interrupt_at=2)
    index = json.loads((directory / "checkpoint.json").read_text())
    assert index["step"] == 2 and index["reason"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    got, resumed = run(Checkpointer(directory, every=100, resume=True))
    assert got.losses == want.losses and got.attn_losses == want.attn_losses
    assert resumed.keys() == weights.keys() and weights
    for name in weights:
        torch.testing.assert_close(resumed[name], weights[name], rtol=0, atol=1e-6)
