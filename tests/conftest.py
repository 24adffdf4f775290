import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # determinism needs a fixed thread count


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SEALDIFF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def tiny_pipe():
    from sealdiff.models import tiny

    pipe = tiny.pipeline(tiny.TinySpec.test(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipe_dir(tiny_pipe, tmp_path):
    path = tmp_path / "tiny-pipe"
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    return path
