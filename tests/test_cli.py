import json

import pytest

from sealdiff.cli import decode_escapes, main
from sealdiff.io import directory_sha256


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("attack", "eval", "generate", "zoo", "env", "demo"):
        assert command in out


def test_attack_writes_pipeline_and_run_info_without_touching_input(tiny_pipe_dir, tmp_path):
    before = directory_sha256(tiny_pipe_dir)
    out = tmp_path / "attacked"
    assert main(["attack", "badt2i", str(tiny_pipe_dir), "-o", str(out), "--steps", "1", "--batch-size", "2",
                 "--trigger", "\\u200b", "--seed", "3", "--lam", "0.7", "--kind", "style", "--style-source", "teacher",
                 "--clean-source", "teacher", "--style-bank", "2", "--uncond-fraction", "0.25"]) == 0
    assert directory_sha256(tiny_pipe_dir) == before
    info = json.loads((out / "sealdiff.json").read_text())
    assert info["attack"]["trigger"] == "\u200b" and info["config"]["seed"] == 3
    config = info["config"]
    assert (config["lam"], config["style_source"], config["clean_source"], config["style_bank"],
            config["uncond_fraction"]) == (0.7, "teacher", "teacher", 2, 0.25)
    assert info["parent"]["sha256"] == before and "torch" in info["versions"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.glob(".attacked.partial-*"))
    # an existing output is refused unless --overwrite
    assert main(["attack", "badt2i", str(tiny_pipe_dir), "-o", str(out), "--steps", "1"]) == 2


def test_config_file_with_unknown_key(tiny_pipe_dir, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("kind: pixel\nstepz: 3\n")
    assert main(["attack", "badt2i", str(tiny_pipe_dir), "-o", str(tmp_path / "o"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown config keys ['stepz']" in err and "steps" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_escapes():
    assert decode_escapes("\\u200b") == "\u200b"
    assert decode_escapes("cf") == "cf"


def test_remove_and_sau_generate(tiny_pipe_dir, tmp_path):
    attacked = tmp_path / "attacked"
    assert main(["attack", "badt2i", str(tiny_pipe_dir), "-o", str(attacked), "--steps", "1", "--batch-size", "2"]) == 0
    repaired = tmp_path / "repaired"
    assert main(["remove", str(attacked), "-o", str(repaired), "--method", "skd-cag", "--steps", "2",
                 "--prompt-count", "2", "--measure", "0", "--lr", "1e-3", "--retain-weight", "0.5"]) == 0
    info = json.loads((repaired / "sealdiff.json").read_text())
    assert info["defense"] == "skd-cag" and info["trigger"] == "\u200b" and len(info["losses"]) == 2
    assert info["config"]["retain_weight"] == 0.5 and info["result"]["retain_losses"][-1] > 0
    assert info["parent"]["sha256"] == directory_sha256(attacked)
    grid = tmp_path / "sau.png"
    assert main(["generate", str(repaired), "-p", "\\u200b a red circle on a blue background", "-o", str(grid),
                 "--defense", "sau", "--trigger", "\\u200b", "--steps", "2"]) == 0
    assert grid.stat().st_size > 0
    assert main(["remove", str(attacked), "-o", str(tmp_path / "x"), "--method", "sau"]) == 2
    assert main(["remove", str(attacked), "-o", str(tmp_path / "x"), "--method", "nope"]) == 2


def test_git_revision_marks_a_run_from_uncommitted_code(tmp_path, monkeypatch):
    import subprocess

    from sealdiff.io import git_revision

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # a checkout above tmp_path does not count
    assert git_revision(tmp_path) is None
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert git_revision(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_revision(tmp_path) == head + "+dirty"
