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


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A saved random tiny pipeline, shared read-only by a module; cases copy it before changing it."""
    from sealdiff.models import tiny

    path = tmp_path_factory.mktemp("base") / "tiny-pipe"
    tiny.pipeline(tiny.TinySpec.test(), seed=0).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A randomly initialised toy judge (its accuracy does not matter where it is used)."""
    from sealdiff.metrics.judge import ToyJudge

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("judge") / "toy-judge"
    ToyJudge().save(path)
    return path
