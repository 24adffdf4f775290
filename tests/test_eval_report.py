"""Measurement (judges, utility metrics, `sealdiff eval` run directories) and the HTML report."""

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from sealdiff.cli import main
from sealdiff.data import toyworld
from sealdiff.errors import SealdiffError
from sealdiff.io import directory_sha256, write_run_info
from sealdiff.metrics import utility
from sealdiff.metrics.evaluate import (
    CSV_COLUMNS, JUDGES, METRICS_SCHEMA, UTILITY_METRICS, EvalConfig, evaluate_model, judge_accuracy_on_renders,
    schema_errors,
)
from sealdiff.metrics.judge import HEADS, ToyJudge
from sealdiff.metrics.judges import ObjectJudge, PatchJudge, StyleJudge
from sealdiff.models import tiny

TRIGGER = "\u200b"
EVAL_ARGS = ["--count", "4", "--steps", "2", "--batch-size", "4", "--threads", "1"]


# ---------------------------------------------------------------------------------------------- fixtures


def tiny_clip(directory: Path) -> Path:
    """A randomly initialised tiny CLIPModel with the CLIP tokenizer and an image processor config."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=tiny.CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=tiny.CLIP_BOS,
                         eos_token_id=tiny.CLIP_EOS, pad_token_id=tiny.CLIP_EOS),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        projection_dim=16)
    CLIPModel(config).save_pretrained(directory, safe_serialization=True)
    tiny.clip_tokenizer().save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two tiny pipelines (one 'backdoored' with an attack block and losses), a random judge, CLIP, LPIPS."""
    root = tmp_path_factory.mktemp("assets")
    for seed, name in ((0, "bad"), (1, "ref")):
        pipe = tiny.pipeline(tiny.TinySpec.test(), seed=seed)
        pipe.save_pretrained(root / name, safe_serialization=True)
    write_run_info(root / "bad", attack={"kind": "pixel", "trigger": TRIGGER, "trigger_position": "start",
                                         "patch": None, "corner": "top-left", "patch_fraction": 0.25},
                   losses=[1.0, 0.7, 0.5, 0.45, 0.3])
    torch.manual_seed(0)
    ToyJudge().save(root / "judge")
    tiny_clip(root / "clip")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(utility.LPIPS().state_for_file(), str(root / "lpips.safetensors"))
    return root


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """`sealdiff eval` twice with the same command (determinism), once more with every optional metric."""
    out = tmp_path_factory.mktemp("runs")
    a = assets
    base = ["eval", str(a / "bad"), "--judge", str(a / "judge"), *EVAL_ARGS]
    assert main([*base, "-o", str(out / "bad-1")]) == 0
    assert main([*base, "-o", str(out / "bad-2")]) == 0
    assert main([*base, "--reference", str(a / "ref"), "--clip", str(a / "clip"), "--lpips", str(a / "lpips.safetensors"),
                 "--fid-features", str(a / "clip"), "--label", "with reference", "-o", str(out / "full")]) == 0
    assert main(["eval", str(a / "ref"), "--trigger", "\\u200b", "--judge", str(a / "judge"), *EVAL_ARGS,
                 "--label", "repaired", "-o", str(out / "repaired")]) == 0
    return out


# ---------------------------------------------------------------------------------------------- judges


def labelled_renders(count=12, size=32, seed=3):
    return [toyworld.render(s, size) for s in toyworld.scenes(seed, count)]


@pytest.mark.parametrize("corner", toyworld.CORNERS)
def test_patch_judge_hits_pasted_patches_and_not_clean_renders(corner):
    patch = toyworld.default_patch(8)
    judge = PatchJudge(patch, corner)
    clean = torch.stack(labelled_renders())
    pasted = toyworld.paste_patch(clean, patch, corner)
    assert judge.hits(pasted).all() and not judge.hits(clean).any()
    assert (judge.scores(pasted) == 0).all() and (judge.scores(clean) >= 0.35).all()  # the documented margins
    # a patch at another corner is not a hit
    other = next(c for c in toyworld.CORNERS if c != corner)
    assert not judge.hits(toyworld.paste_patch(clean, patch, other)).any()


def test_style_judge_hits_grayscale_and_not_colour():
    colour = torch.stack(labelled_renders())
    gray = toyworld.to_grayscale(colour)
    judge = StyleJudge()
    assert judge.hits(gray).all() and not judge.hits(colour).any()
    assert (judge.scores(colour) >= 0.75 - 1e-6).all() and (judge.scores(gray) < 1e-5).all()


class StubClassifier(nn.Module):
    """Reads the shape as whatever `shapes` says, image by image (confident logits)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes = shapes

    def forward(self, images):
        logits = {name: torch.zeros(len(images), len(labels)) for name, labels in HEADS.items()}
        for i, shape in enumerate(self.shapes):
            logits["shape"][i, HEADS["shape"].index(shape)] = 10.0
        return logits


def test_object_judge_logic_with_stub_classifier():
    shapes = ["square", "circle", "square", "cross"]
    images = torch.zeros(4, 3, 32, 32)
    judge = ObjectJudge(StubClassifier(shapes), "square")
    assert judge.hits(images).tolist() == [True, False, True, False]
    scores = judge.scores(images)
    assert (scores[[0, 2]] > 0.99).all() and (scores[[1, 3]] < 0.01).all()
    assert ObjectJudge(StubClassifier(shapes), "cross").hits(images).tolist() == [False, False, False, True]


def test_judge_accuracy_on_renders():
    torch.manual_seed(0)
    acc = judge_accuracy_on_renders(ToyJudge().eval(), count=8)
    assert set(acc) == set(JUDGES)
    assert all(a.count == 32 for a in acc.values())  # plain, patched, grayscale, both
    assert acc["patch"].accuracy == 1.0 and acc["style"].accuracy == 1.0  # threshold judges are exact on renders
    assert 0.0 <= acc["object"].accuracy <= 1.0  # a random toy judge: any value


# ---------------------------------------------------------------------------------------------- utility metrics


def naive_ssim(x, y, window=11, sigma=1.5):
    """SSIM by explicit loops over windows (independent of the convolution implementation)."""
    g = utility.gaussian_window(window, sigma)
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - window + 1):
            for j in range(x.shape[2] - window + 1):
                a = x[ch, i:i + window, j:j + window].double()
                b = y[ch, i:i + window, j:j + window].double()
                ma, mb = (g * a).sum(), (g * b).sum()
                va, vb = (g * a * a).sum() - ma**2, (g * b * b).sum() - mb**2
                cov = (g * a * b).sum() - ma * mb
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return torch.stack(values).mean()


def test_ssim_identical_noisy_and_reference_values():
    torch.manual_seed(0)
    images = torch.stack(labelled_renders(4, size=16))
    assert torch.allclose(utility.ssim(images, images), torch.ones(4), atol=1e-6)
    slightly = (images + 0.05 * torch.randn_like(images)).clamp(0, 1)
    very = (images + 0.3 * torch.randn_like(images)).clamp(0, 1)
    s1, s2 = utility.ssim(images, slightly), utility.ssim(images, very)
    assert (s1 < 1).all() and (s2 < s1).all()
    assert utility.ssim(images, slightly)[0].item() == pytest.approx(naive_ssim(images[0], slightly[0]).item(), abs=1e-6)
    # constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.6)
    assert utility.ssim(a, b).item() == pytest.approx((2 * 0.12 + 1e-4) / (0.04 + 0.36 + 1e-4), rel=1e-5)


def test_mse_known_values():
    zeros = torch.zeros(2, 3, 8, 8)
    assert utility.mse(zeros, torch.full_like(zeros, 0.5)).tolist() == [0.25, 0.25]
    ramp = torch.linspace(0, 1, 64).view(1, 1, 8, 8).expand(1, 3, 8, 8)
    assert utility.mse(ramp, ramp + 0.1).item() == pytest.approx(0.01, rel=1e-5)
    assert utility.mse(ramp, ramp).item() == 0.0
    with pytest.raises(ValueError):
        utility.mse(zeros, torch.zeros(2, 3, 4, 4))


def test_frechet_distance_known_values_and_toy_fid():
    # 1-D: (mu1 - mu2)^2 + (sigma1 - sigma2)^2
    assert utility.frechet_distance(torch.tensor([0.0]), torch.tensor([[4.0]]), torch.tensor([1.0]),
                                    torch.tensor([[1.0]])) == pytest.approx(2.0)
    # diagonal covariances: |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0, 9.0])), torch.diag(torch.tensor([4.0, 4.0, 1.0]))
    mu1, mu2 = torch.zeros(3), torch.tensor([1.0, 2.0, 0.0])
    assert utility.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5 + 1 + 0 + 4)
    torch.manual_seed(0)
    judge = ToyJudge().eval()
    renders = torch.stack(labelled_renders(12))
    assert utility.toy_fid(judge, renders, renders) == pytest.approx(0.0, abs=1e-6)
    other = torch.stack(labelled_renders(12, seed=99))
    noise = torch.rand(12, 3, 32, 32)
    assert 0 < utility.toy_fid(judge, renders, other) < utility.toy_fid(judge, renders, noise)


def test_clip_score_with_tiny_local_clip(tmp_path):
    clip_dir = tiny_clip(tmp_path / "clip")
    images = torch.stack(labelled_renders(3, size=16))
    prompts = toyworld.eval_captions(3)
    cosines = utility.clip_cosine(images, prompts, clip_dir)
    scores = utility.clip_score(images, prompts, clip_dir)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 100)).all()
    assert torch.allclose(scores, 100 * cosines.clamp_min(0))
    assert torch.equal(scores, utility.clip_score(images, prompts, clip_dir))  # deterministic
    other = utility.clip_cosine(images, ["a photo of something else entirely"] * 3, clip_dir)
    assert not torch.allclose(cosines, other)
    # by hand: cosine of the projected embeddings, preprocessing = normalisation at 16 px
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    tokens = tiny.clip_tokenizer()(prompts[:1], return_tensors="pt")
    mean, std = torch.tensor(utility.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(utility.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        text = model.get_text_features(**tokens)
        image = model.get_image_features(pixel_values=(images[:1] - mean) / std)
    text, image = (t if torch.is_tensor(t) else t.pooler_output for t in (text, image))
    assert cosines[0].item() == pytest.approx(torch.cosine_similarity(text, image).item(), abs=1e-4)


def test_missing_or_unsafe_local_paths_are_clear_errors(tmp_path):
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(SealdiffError, match="does not exist.*--clip"):
        utility.clip_score(images, ["a", "b"], tmp_path / "nope")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(SealdiffError, match="no .safetensors weights.*pickle"):
        utility.load_clip(tmp_path / "pickled")
    with pytest.raises(SealdiffError, match="LPIPS weights .* does not exist"):
        utility.LPIPS.load(tmp_path / "nope.safetensors")
    with pytest.raises(SealdiffError, match="judge .* does not exist"):
        EvalConfig(judge=tmp_path / "nope")
    with pytest.raises(SealdiffError, match="count=0 is invalid; valid: an integer >= 2"):
        EvalConfig(count=0)
    with pytest.raises(SealdiffError, match="trigger_position='middle' is invalid; valid: start, end"):
        EvalConfig(trigger_position="middle")


def test_lpips_identical_is_zero_and_noise_is_positive(assets):
    model = utility.LPIPS.load(assets / "lpips.safetensors")
    images = torch.stack(labelled_renders(3, size=16))
    assert torch.allclose(utility.lpips(images, images, model), torch.zeros(3), atol=1e-6)
    assert (utility.lpips(images, torch.rand_like(images), model) > 0).all()


# ---------------------------------------------------------------------------------------------- eval runs


def check_metrics_by_hand(doc):
    """Required keys and types, checked without the module's own validator."""
    for key, kind in (("schema_version", int), ("label", str), ("model", dict), ("trigger", str), ("target", dict),
                      ("primary_judge", str), ("count", int), ("seed", int), ("steps", int), ("guidance", float),
                      ("attack_success", float), ("false_trigger", float), ("removal_accuracy", float),
                      ("judges", dict), ("utility", dict), ("judge_accuracy", dict)):
        assert isinstance(doc[key], kind), key
    assert set(doc["model"]) == {"spec", "path", "sha256"} and re.fullmatch("[0-9a-f]{64}", doc["model"]["sha256"])
    for judge in JUDGES:
        m = doc["judges"][judge]
        assert m["removal_accuracy"] == pytest.approx(1 - m["attack_success"])
        assert all(0 <= m[k] <= 1 for k in ("attack_success", "false_trigger", "removal_accuracy"))
        assert 0 <= doc["judge_accuracy"][judge]["accuracy"] <= 1
    for key in UTILITY_METRICS:
        metric = doc["utility"][key]
        assert set(metric) == {"value", "reason", "source"}
        assert (metric["value"] is None) == isinstance(metric["reason"], str)  # absent <=> a reason
    assert set(doc["utility"]["attribute_accuracy"]) == {"shape", "fg", "bg"}


def test_metrics_json_matches_schema_and_absent_metrics_have_reasons(runs):
    doc = json.loads((runs / "bad-1" / "metrics.json").read_text())
    assert schema_errors(doc) == []
    check_metrics_by_hand(doc)
    assert doc["primary_judge"] == "patch" and doc["trigger"] == TRIGGER and doc["count"] == 4
    for key, flag in (("ssim", "--reference"), ("mse", "--reference"), ("toy_fid", "--reference"),
                      ("lpips", "--lpips"), ("fid", "--fid-features"), ("clip_score", "--clip")):
        assert doc["utility"][key]["value"] is None and flag in doc["utility"][key]["reason"]
    # the validator catches what it should
    broken = json.loads(json.dumps(doc))
    del broken["judges"]["style"]
    broken["attack_success"] = 1.5
    broken["utility"]["ssim"]["value"] = "high"
    errors = schema_errors(broken)
    assert any("missing 'style'" in e for e in errors) and any("1.5 > 1" in e for e in errors)
    assert any("utility.ssim.value" in e for e in errors)
    assert METRICS_SCHEMA["required"] and schema_errors({}, METRICS_SCHEMA)


def test_eval_with_reference_and_local_metrics(runs, assets):
    doc = json.loads((runs / "full" / "metrics.json").read_text())
    assert schema_errors(doc) == []
    check_metrics_by_hand(doc)
    u = doc["utility"]
    for key in UTILITY_METRICS:
        assert u[key]["value"] is not None, key
    assert 0 < u["mse"]["value"] and u["ssim"]["value"] < 1 and u["toy_fid"]["value"] > 0 and u["lpips"]["value"] > 0
    assert 0 <= u["clip_score"]["value"] <= 100
    assert doc["reference"]["sha256"] == directory_sha256(assets / "ref")
    info = json.loads((runs / "full" / "sealdiff.json").read_text())
    assert info["label"] == "with reference" and info["command"] == "eval" and "torch" in info["versions"]
    assert info["seeds"] == [1234, 1235, 1236, 1237] and len(info["prompts"]["triggered"]) == 4
    assert all(p.startswith(TRIGGER) for p in info["prompts"]["triggered"])
    assert info["prompts"]["reference"] == info["prompts"]["clean"]
    hashes = {role: ref["sha256"] for role, ref in info["models"].items()}
    assert hashes == {"model": directory_sha256(assets / "bad"), "judge": directory_sha256(assets / "judge"),
                      "reference": directory_sha256(assets / "ref"), "clip": directory_sha256(assets / "clip"),
                      "lpips": utility.path_sha256(assets / "lpips.safetensors"),
                      "fid_features": directory_sha256(assets / "clip")}
    with open(runs / "full" / "images.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == 12
    assert [r["set"] for r in rows] == ["triggered"] * 4 + ["clean"] * 4 + ["reference"] * 4
    assert [int(r["seed"]) for r in rows[4:8]] == info["seeds"] and rows[0]["prompt"] == info["prompts"]["triggered"][0]
    assert all(r["read_shape"] in HEADS["shape"] and r["hit"] in ("0", "1") for r in rows)
    for name in ("triggered", "clean", "reference"):
        assert Image.open(runs / "full" / f"grid-{name}.png").size[0] > 16


def test_same_command_same_seed_gives_identical_metrics(runs):
    first, second = (json.loads((runs / d / "metrics.json").read_text()) for d in ("bad-1", "bad-2"))
    assert first == second
    assert (runs / "bad-1" / "images.csv").read_bytes() == (runs / "bad-2" / "images.csv").read_bytes()
    assert (runs / "bad-1" / "grid-clean.png").read_bytes() == (runs / "bad-2" / "grid-clean.png").read_bytes()


def test_evaluate_model_api_matches_cli(runs, assets):
    config = EvalConfig(count=4, steps=2, batch_size=2, judge=assets / "judge")  # batch size must not matter
    result = evaluate_model(assets / "bad", config=config)
    cli = json.loads((runs / "bad-1" / "metrics.json").read_text())
    for judge in JUDGES:
        assert result.judges[judge].attack_success == cli["judges"][judge]["attack_success"]
        assert result.judges[judge].mean_score_clean == pytest.approx(cli["judges"][judge]["mean_score_clean"], abs=1e-5)
    assert result.images["clean"].shape == (4, 3, 16, 16) and result.attack_success == cli["attack_success"]


def test_eval_cli_errors(assets, tmp_path, capsys):
    assert main(["eval", str(assets / "bad"), "--judge", str(assets / "judge"), "--clip", str(tmp_path / "nope"),
                 *EVAL_ARGS]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(assets / "ref"), "--judge", str(assets / "judge"), *EVAL_ARGS]) == 2
    assert "--trigger" in capsys.readouterr().err
    assert main(["eval", str(assets / "bad"), "--judge", str(tmp_path), *EVAL_ARGS]) == 2
    assert "judge.safetensors missing" in capsys.readouterr().err
    assert main(["eval", str(assets / "bad"), "--kind", "smell", *EVAL_ARGS]) == 2


# ---------------------------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(runs / "full"), str(runs / "repaired"), "-o", str(path)]) == 0
    return path


def test_report_is_self_contained_with_images_table_and_plots(report, runs):
    page = report.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 2 * 2 + 1 + 3  # grids of 2 runs x 2 sets, reference, 3 plots
    assert "<table" in page and "with reference" in page and "repaired" in page
    assert 'alt="training loss"' in page  # the backdoored model's sealdiff.json has losses
    assert "<script" not in page
    for attribute in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page):
        assert attribute.startswith("data:"), attribute[:60]
    assert "http://" not in page and "https://" not in page.replace("https://json-schema.org", "")
    assert r"\u200b" in page  # the invisible trigger is made visible
    assert not list(report.parent.glob(".report.html.*"))  # no temp file left behind
    assert main(["report", str(runs / "full"), "-o", str(report)]) == 2  # refuses to overwrite
    assert main(["report", str(report.parent), "-o", str(report.parent / "x.html")]) == 2  # not a run dir


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--enable-logging=stderr", "--v=0", "--hide-scrollbars", "--window-size=1280,2000"]
_chromium_tried: list[str | None] = []


def chromium() -> str:
    if not _chromium_tried:
        found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
        reason = None
        if not found and shutil.which("apt-get"):
            try:
                done = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True,
                                      timeout=900)
                found = shutil.which("chromium")
                reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            except (OSError, subprocess.SubprocessError) as exc:
                reason = str(exc)
        _chromium_tried.append(found or f"!{reason or 'apt-get is not available'}")
    result = _chromium_tried[0]
    if result.startswith("!"):
        pytest.skip(f"chromium is not installed and `apt-get install -y chromium` failed: {result[1:]}")
    return result


def screenshot(page: Path, png: Path) -> str:
    done = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--screenshot={png}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    return done.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line or "net::ERR" in line]


def test_report_renders_in_headless_chromium(report, tmp_path):
    png = tmp_path / "report.png"
    log = screenshot(report, png)
    assert png.is_file(), log[-2000:]
    picture = Image.open(png).convert("RGB")
    assert picture.size == (1280, 2000)
    colours = picture.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, tables, plots and grids, not a blank page
    assert console_errors(log) == []
    # the console check does catch errors
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    assert any("Uncaught" in line for line in console_errors(screenshot(bad, tmp_path / "bad.png")))


@pytest.mark.parametrize("pair", [("removal", "evaluation"), ("scan", "removal"), ("scan", "evaluation")])
def test_report_refuses_to_mix_kinds_of_output(pair, tmp_path, capsys):
    records = {"removal": {"command": "remove", "model_kind": "ddpm"}, "scan": {"command": "scan", "model_kind": "ncsn"}}
    for name in pair:
        (tmp_path / name).mkdir()
        if name == "evaluation":
            (tmp_path / name / "metrics.json").write_text("{}")
        else:
            (tmp_path / name / "sealdiff.json").write_text(json.dumps(records[name]))
    assert main(["report", *(str(tmp_path / name) for name in pair), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one kind of output per report" in err and not (tmp_path / "r.html").exists()
