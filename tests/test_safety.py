"""Untrusted models, inputs never modified, outputs never half-written.

- A malicious pickle (its `__reduce__` runs `exec`, which creates a marker file) shipped as a model's
  weights never runs through any command that loads models, with or without `--allow-pickle`.
- Legitimate pickled weights load with `--allow-pickle`, and every `torch.load` uses weights_only=True.
- Every command that takes a model leaves the model directory byte-for-byte (and stat-for-stat) unchanged.
- A command that fails or is interrupted midway leaves no output and no `.partial-` staging folder, and an
  existing output it was asked to replace stays intact.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fs_snapshot import snapshot
from sealdiff.cli import main
from sealdiff.errors import SealdiffError
from sealdiff.io import atomic_output_dir, atomic_output_file, directory_sha256

QUICK_ATTACK = ["--steps", "1", "--batch-size", "2"]


def run_cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except BaseException as exc:
        pytest.fail(f"sealdiff {' '.join(map(str, args))} raised {exc.__class__.__name__}: {exc}")
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sealdiff: error: ") and "Traceback" not in err, err


def command(name: str, model: Path, out: Path, judge: Path) -> list:
    """The cheapest successful invocation of each command that loads a model."""
    return {
        "attack": ["attack", "badt2i", model, "-o", out, *QUICK_ATTACK, "--trigger", "tq"],
        "generate": ["generate", model, "-p", "a red circle", "-p", "\\u200b a blue square",
                     "-o", out.with_suffix(".png"), "--steps", "1"],
        "eval": ["eval", model, "--trigger", "tq", "--kind", "pixel", "--count", "2", "--steps", "1", "--judge", judge,
                 "-o", out],
        "remove": ["remove", model, "-o", out, "--method", "skd", "--trigger", "tq", "--steps", "1", "--measure", "0",
                   "--prompt-count", "2"],
    }[name]


COMMANDS = ("attack", "generate", "eval", "remove")


# ------------------------------------------------------------------------------------------- malicious pickles


class Payload:
    """Unpickling this runs `exec`, which creates `marker`: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def plant(model: Path, layout: str, marker: Path) -> Path:
    """Put the payload into `model`; returns the planted file."""
    evil = {"conv_in.weight": Payload(marker)}
    if layout == "unet-alone":  # the only UNet weights
        (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        file = model / "unet" / "diffusion_pytorch_model.bin"
        torch.save(evil, file)
    elif layout == "unet-beside":  # next to valid safetensors
        file = model / "unet" / "diffusion_pytorch_model.bin"
        torch.save(evil, file)
    elif layout == "text-encoder-legacy":  # torch's pre-zip format, as the only text-encoder weights
        (model / "text_encoder" / "model.safetensors").unlink()
        file = model / "text_encoder" / "pytorch_model.bin"
        torch.save(evil, file, _use_new_zipfile_serialization=False)
    elif layout == "stray-ckpt":  # a bare pickle lying at the top of the directory
        file = model / "model.ckpt"
        file.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        raise ValueError(layout)
    return file


LAYOUTS = ("unet-alone", "unet-beside", "text-encoder-legacy", "stray-ckpt")


def test_the_payload_is_live(tmp_path):
    """The test payload really runs code when unpickled without weights_only (so its absence below means something)."""
    marker = tmp_path / "PWNED"
    torch.save({"w": Payload(marker)}, tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["refused", "allow-pickle"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", COMMANDS)
def test_malicious_pickle_never_runs(name, layout, allow_pickle, base_model, judge_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    marker = tmp_path / "PWNED"
    planted = plant(model, layout, marker)
    before = snapshot(tmp_path)
    args = command(name, model, tmp_path / "out", judge_dir) + (["--allow-pickle"] if allow_pickle else [])
    code, err = run_cli(args, capsys)
    assert_one_line_error(code, err)
    assert not marker.exists()
    assert str(planted) in err
    if allow_pickle:  # weights_only=True refuses the object, and says which global it wanted
        assert "weights_only=True) rejects" in err and "exec" in err
    else:
        assert "refusing pickle-based weights" in err and "--allow-pickle" in err
    assert snapshot(tmp_path) == before


def test_custom_code_in_a_component_folder_never_runs(base_model, tmp_path, capsys):
    import json

    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    index = json.loads((model / "model_index.json").read_text())
    index["unet"] = ["evil", "UNet2DConditionModel"]
    (model / "model_index.json").write_text(json.dumps(index))
    (model / "unet" / "evil.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w')\n"
                                            "from diffusers import UNet2DConditionModel\n")
    code, err = run_cli(["generate", model, "-p", "x", "-o", tmp_path / "o.png", "--allow-pickle"], capsys)
    assert_one_line_error(code, err)
    assert not (tmp_path / "PWNED").exists()


def _pickle_everything(model: Path) -> None:
    """Convert every weight file to a legitimate torch pickle (what old checkpoints look like)."""
    for rel, name in (("unet/diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
                      ("vae/diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
                      ("text_encoder/model", "pytorch_model.bin")):
        source = model / f"{rel}.safetensors"
        torch.save(load_file(str(source)), source.with_name(name))
        source.unlink()


def test_legitimate_pickles_load_only_with_the_flag_and_weights_only(base_model, tmp_path, monkeypatch, capsys):
    from sealdiff.models.loading import load_t2i

    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    _pickle_everything(model)
    code, err = run_cli(["generate", model, "-p", "x", "-o", tmp_path / "a.png", "--steps", "1"], capsys)
    assert_one_line_error(code, err)
    assert "refusing pickle-based weights" in err and not (tmp_path / "a.png").exists()

    calls = []
    original = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    pipe = load_t2i(model, allow_pickle=True)
    assert len(calls) >= 6  # our check of each of the 3 files, then the libraries' own loads
    assert all(flag is True for flag in calls), calls  # diffusers and transformers as well as sealdiff
    reference = load_t2i(base_model)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    code, err = run_cli(["generate", model, "-p", "x", "-o", tmp_path / "b.png", "--steps", "1", "--allow-pickle"],
                        capsys)
    assert code == 0 and (tmp_path / "b.png").is_file(), err


# ------------------------------------------------------------------------------------------- inputs untouched


@pytest.mark.parametrize("name", COMMANDS)
def test_commands_never_modify_their_input(name, base_model, judge_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    (model / "sealdiff.json").write_text('{"note": "an input run record is input too"}\n')
    digest, before = directory_sha256(model), snapshot(model)
    judge_before = snapshot(judge_dir)
    code, err = run_cli(command(name, model, tmp_path / "out", judge_dir), capsys)
    assert code == 0, err
    assert directory_sha256(model) == digest
    assert snapshot(model) == before  # sealdiff.json too, which directory_sha256 leaves out
    assert snapshot(judge_dir) == judge_before
    assert not list(tmp_path.glob(".*partial-*"))


def test_output_may_not_overwrite_or_sit_inside_an_input(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    (source / "w").write_text("weights")
    for target in (source, source / "sub", tmp_path):
        with pytest.raises(SealdiffError, match="would overwrite the input"):
            with atomic_output_dir(target, overwrite=True, inputs=[source]):
                pytest.fail("the block must not run")
    with pytest.raises(SealdiffError, match="would overwrite the input"):
        with atomic_output_file(source / "metrics.json", overwrite=True, inputs=[source]):
            pytest.fail("the block must not run")
    assert (source / "w").read_text() == "weights" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ------------------------------------------------------------------------------------------- interrupted outputs


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left on device")],
                         ids=["ctrl-c", "disk-full"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_attack_interrupted_while_saving_leaves_nothing(failure, existing, base_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "earlier.txt").write_text("the previous result")
    before = snapshot(tmp_path)
    seen = []

    def fail_after_saving(directory, **fields):
        seen.extend(p.name for p in Path(directory).iterdir())  # the pipeline is already in the staging folder
        raise failure

    monkeypatch.setattr("sealdiff.attacks.write_run_info", fail_after_saving)
    args = ["attack", "badt2i", base_model, "-o", out, *QUICK_ATTACK] + (["--overwrite"] if existing else [])
    code, err = run_cli(args, capsys)
    assert "unet" in seen
    assert snapshot(tmp_path) == before  # no output (or the old one intact), no staging folder
    assert not _partials(tmp_path)
    assert "Traceback" not in err
    if failure is not KeyboardInterrupt:
        assert_one_line_error(code, err)
        assert "No space left on device" in err


def test_ctrl_c_exits_130_with_one_line(base_model, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sealdiff.attacks.write_run_info", interrupt)
    code, err = run_cli(["attack", "badt2i", base_model, "-o", tmp_path / "out", *QUICK_ATTACK], capsys)
    assert code == 130 and err.strip().startswith("sealdiff: interrupted; no output was written")
    assert list(tmp_path.iterdir()) == []


def test_library_failure_midway_leaves_nothing(base_model, tmp_path, monkeypatch):
    from sealdiff.attacks import run_attack
    from sealdiff.attacks.badt2i import BadT2IConfig

    def explode(self, directory, **kwargs):
        Path(directory, "unet").mkdir()
        Path(directory, "unet", "half.safetensors").write_bytes(b"half")
        raise RuntimeError("boom")

    monkeypatch.setattr("diffusers.StableDiffusionPipeline.save_pretrained", explode)
    with pytest.raises(RuntimeError, match="boom"):
        run_attack(str(base_model), BadT2IConfig(steps=1, batch_size=2), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_final_rename_keeps_the_previous_output(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    real_rename = os.rename

    def rename(src, dst):
        if ".partial-" in str(src):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(SealdiffError, match="could not write .*No space left on device") as info:
        with atomic_output_dir(target, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
    assert "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "old.txt").read_text() == "previous"
    monkeypatch.setattr(os, "rename", real_rename)
    with atomic_output_dir(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target.stat().st_mode & 0o777) == (0o777 & ~_umask())  # not mkdtemp's private 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_output_file(tmp_path):
    target = tmp_path / "grid.png"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_file(target) as staging:
            assert staging.suffix == ".png" and staging.parent == tmp_path
            staging.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_output_file(target) as staging:
        staging.write_bytes(b"image")
    assert target.read_bytes() == b"image" and (target.stat().st_mode & 0o777) == (0o666 & ~_umask())
    with pytest.raises(SealdiffError, match="already exists"):
        with atomic_output_file(target):
            pass
    with pytest.raises(SealdiffError, match="No space left"):
        with atomic_output_file(target, overwrite=True) as staging:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"image" and [p.name for p in tmp_path.iterdir()] == ["grid.png"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_is_one_line(base_model, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, err = run_cli(["attack", "badt2i", base_model, "-o", parent / "out", *QUICK_ATTACK], capsys)
        assert_one_line_error(code, err)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)
