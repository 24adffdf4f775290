"""Clean images from a folder (`--data`) for the unconditional attacks and removals: loading, refusals, and the
CLI paths that take them; and the text-to-image attack's captioned `imagefolder`, which reads images the same way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sealdiff.cli import main
from sealdiff.data.images import FolderImageSource, folder_images, image_files, load_image
from sealdiff.errors import SealdiffError
from sealdiff.io import directory_sha256
from sealdiff.models.uncond import save_uncond, tiny_uncond


def _write(path, rgb, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), rgb, dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    _write(root / "a" / "red.png", (255, 0, 0))
    _write(root / "b" / "blue.jpg", (0, 0, 255), size=(24, 16))
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_images_are_found_resized_and_centre_cropped(folder, tmp_path):
    assert [p.name for p in image_files(folder)] == ["red.png", "blue.jpg"]  # subfolders, sorted, images only
    wide = tmp_path / "wide.png"
    array = np.zeros((10, 20, 3), dtype=np.uint8)
    array[:, :10] = (255, 255, 255)  # left half white, right half black
    Image.fromarray(array).save(wide)
    image = load_image(wide, 8)  # 10x20 -> 8x16 -> the centre 8x8: half white, half black
    assert image.shape == (3, 8, 8) and image.min() >= -1 and image.max() <= 1
    assert image[:, :, :3].mean() > 0.9 and image[:, :, -3:].mean() < -0.9
    red = load_image(folder / "a" / "red.png", 8)
    torch.testing.assert_close(red[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert folder_images(folder, 8, limit=1).shape == (1, 3, 8, 8)


def test_the_stream_is_seeded_and_draws_only_folder_images(folder):
    a, b = FolderImageSource(folder, 3, 8), FolderImageSource(folder, 3, 8)
    first = a.batch(6)
    assert torch.equal(first, b.batch(6))
    colours = {tuple(img[:, 0, 0].round().tolist()) for img in first}
    assert colours <= {(1.0, -1.0, -1.0), (-1.0, -1.0, 1.0)}


def test_bad_folders_are_refused(tmp_path):
    with pytest.raises(SealdiffError, match="not a folder of images"):
        image_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SealdiffError, match="holds no images; valid suffixes"):
        image_files(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SealdiffError, match="cannot read the image .*broken.png"):
        FolderImageSource(tmp_path / "bad", 0, 8).batch(1)


@pytest.fixture
def ddpm_dir(tmp_path):
    save_uncond(tiny_uncond("ddpm", channels=(8, 16)), tmp_path / "ddpm")
    return tmp_path / "ddpm"


def _one_line(code, err):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_attack_trains_on_the_folder_and_records_it(ddpm_dir, folder, tmp_path, capsys):
    args = ["attack", "baddiffusion", str(ddpm_dir), "--steps", "2", "--batch-size", "4", "--seed", "1"]
    assert main(args + ["-o", str(tmp_path / "toy")]) == 0
    before = directory_sha256(folder)
    assert main(args + ["-o", str(tmp_path / "folder"), "--data", str(folder)]) == 0
    assert directory_sha256(folder) == before
    toy = json.loads((tmp_path / "toy" / "sealdiff.json").read_text())
    info = json.loads((tmp_path / "folder" / "sealdiff.json").read_text())
    assert info["data"] == {"path": str(folder), "sha256": before} and info["config"]["data"] == str(folder)
    assert "data" not in toy and info["losses"] != toy["losses"]  # same seed, other clean images
    capsys.readouterr()
    _one_line(main(args + ["-o", str(tmp_path / "x"), "--data", str(tmp_path / "nowhere")]), capsys.readouterr().err)
    assert not (tmp_path / "x").exists()
    _one_line(main(args + ["-o", str(folder / "out"), "--data", str(folder)]), capsys.readouterr().err)
    assert directory_sha256(folder) == before


def test_removal_uses_the_folder_for_its_clean_loss(ddpm_dir, folder, tmp_path, capsys):
    from sealdiff.detection import ScanResult, write_scan

    model = tiny_uncond("ddpm", channels=(8, 16))
    scan = ScanResult(method="elijah", backdoored=True, score=1.0, threshold=0.5, scores={}, seconds=0.0,
                      trigger=torch.zeros(model.sample_shape).index_fill_(2, torch.tensor([0]), 1.0), config={"seed": 0})
    write_scan(scan, tmp_path, "model", "0" * 64, "ddpm")
    args = ["remove", str(ddpm_dir), "--method", "elijah", "--trigger-file", str(tmp_path), "--steps", "1",
            "--measure", "0"]
    assert main(args + ["-o", str(tmp_path / "free")]) == 0
    assert main(args + ["-o", str(tmp_path / "real"), "--data", str(folder)]) == 0
    free = json.loads((tmp_path / "free" / "sealdiff.json").read_text())
    real = json.loads((tmp_path / "real" / "sealdiff.json").read_text())
    assert real["data"] == {"path": str(folder), "sha256": directory_sha256(folder), "images": 2}
    assert real["result"]["extra"]["data"] == "real images" and free["result"]["extra"]["data"] == "model-generated"
    capsys.readouterr()
    _one_line(main(args + ["-o", str(folder / "out"), "--data", str(folder)]), err := capsys.readouterr().err)
    assert "would overwrite the input" in err and not (folder / "out").exists()
    _one_line(main(["remove", str(ddpm_dir), "-o", str(tmp_path / "d"), "--method", "diffdefend", "--trigger-file",
                    str(tmp_path), "--data", str(folder)]), err := capsys.readouterr().err)
    assert "uses no real data" in err
    _one_line(main(["remove", str(ddpm_dir), "-o", str(tmp_path / "t"), "--method", "skd", "--data", str(folder)]),
              err := capsys.readouterr().err)
    assert "--data apply to the unconditional methods" in err


def test_the_captioned_imagefolder_crops_like_the_folder_source_and_refuses_bad_images(tmp_path):
    """The text-to-image attack's `imagefolder` source (metadata.jsonl captions) reads its images as `load_image` does:
    shorter side resized, centre-cropped (a wide image is not stretched), in [0, 1]; an unreadable one is one line."""
    from sealdiff.data.captions import ImageFolderSource

    array = np.zeros((10, 30, 3), dtype=np.uint8)
    array[:, 10:20] = (0, 255, 0)  # green middle third, black sides: stretching would show the sides
    Image.fromarray(array).save(tmp_path / "wide.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "wide.png", "text": "a green square"}) + "\n")
    sample = ImageFolderSource(tmp_path, seed=0, size=8).sample_matching("green")
    assert sample.caption == "a green square" and sample.image.shape == (3, 8, 8)
    torch.testing.assert_close(sample.image, (load_image(tmp_path / "wide.png", 8) + 1) / 2)
    assert sample.image[1].min() > 0.9 and sample.image[0].max() < 0.1  # all green: the centre crop
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "broken.png", "text": "x"}) + "\n")
    with pytest.raises(SealdiffError, match="cannot read the image .*broken.png"):
        ImageFolderSource(tmp_path, seed=0, size=8).sample()
