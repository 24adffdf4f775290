import json

import pytest

from sealdiff.cli import main


@pytest.mark.slow
def test_quick_demo_repairs_the_pixel_backdoor(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "-o", str(out)]) == 0
    info = json.loads((out / "sealdiff.json").read_text())
    results = info["results"]
    assert results["backdoored"]["attack_success"] >= 0.9
    assert results["repaired (SKD-CAG)"]["attack_success"] < results["backdoored"]["attack_success"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 6
