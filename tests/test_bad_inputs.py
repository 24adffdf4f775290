"""Bad input, one row per case: the CLI exits 2 with exactly one line `sealdiff: error: ...` on stderr,
no traceback, and writes nothing (the whole test directory is unchanged, inputs included).

Plus the library-level checks the CLI cannot reach yet (prompt files, sample sizes) and property-based
tests of prompt-file and config parsing."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fs_snapshot import snapshot
from sealdiff.cli import main
from sealdiff.config import build_config
from sealdiff.data.prompts import parse_prompts, read_prompt_file
from sealdiff.errors import SealdiffError

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
TEXT_FILE = "text_encoder/model.safetensors"
QUICK_ATTACK = ["--steps", "1", "--batch-size", "2"]


# ------------------------------------------------------------------------------------------- helpers


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except BaseException as exc:  # an escaped exception is exactly what these tests forbid
        pytest.fail(f"sealdiff {' '.join(map(str, args))} raised {exc.__class__.__name__}: {exc}")
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sealdiff: error: "), err
    assert "Traceback" not in err


@dataclass
class Ctx:
    tmp: Path
    model: Path  # a private copy of the tiny pipeline
    judge: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def edit_json(self, rel: str, **changes) -> None:
        path = self.model / rel
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    def edit_tensors(self, rel: str, edit) -> None:
        path = self.model / rel
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))

    def generate(self, model: Path | str | None = None, *extra) -> list:
        return ["generate", model or self.model, "-p", "a red circle", "-o", self.tmp / "out.png", "--steps", "1",
                *extra]

    def attack(self, *extra) -> list:
        return ["attack", "badt2i", self.model, "-o", self.out, *QUICK_ATTACK, *extra]

    def remove(self, *extra) -> list:
        return ["remove", self.model, "-o", self.out, "--method", "skd", "--trigger", "tq", "--steps", "1",
                "--measure", "0", *extra]


def _set(tensors, key, value):
    tensors[key] = torch.full_like(tensors[key], value)


def _truncate(ctx: Ctx, rel: str) -> None:
    path = ctx.model / rel
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _save_then_fill_disk(self, directory, *args, **kwargs):
    """The first component lands, then the disk is full."""
    Path(directory, "unet").mkdir(parents=True, exist_ok=True)
    Path(directory, "unet", "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
    _enospc()


def _dropping_tokenizer(ctx: Ctx) -> None:
    """CLIP's tokenizer without ftfy drops U+200B; this environment has ftfy, so simulate it."""
    from transformers import CLIPTokenizer

    original = CLIPTokenizer.__call__

    def call(self, text=None, *args, **kwargs):
        strip = lambda s: "".join(c for c in s if ord(c) < 128) if isinstance(s, str) else s  # noqa: E731
        text = [strip(t) for t in text] if isinstance(text, (list, tuple)) else strip(text)
        return original(self, text, *args, **kwargs)

    ctx.monkeypatch.setattr(CLIPTokenizer, "__call__", call)


def _custom_code(ctx: Ctx) -> list:
    ctx.edit_json("model_index.json", unet=["evil", "Evil"])
    (ctx.model / "unet" / "evil.py").write_text(
        f"open({str(ctx.tmp / 'PWNED')!r}, 'w').write('x')\nclass Evil:\n    pass\n")
    return ctx.generate()


def _pickled(ctx: Ctx) -> list:
    tensors = load_file(str(ctx.model / UNET_FILE))
    (ctx.model / UNET_FILE).unlink()
    torch.save(tensors, ctx.model / "unet" / "diffusion_pytorch_model.bin")
    return ctx.generate()


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _malicious_pickle(ctx: Ctx) -> list:
    torch.save({"conv_in.weight": _Exec(ctx.tmp / "PWNED")}, ctx.model / "unet" / "diffusion_pytorch_model.bin")
    return ctx.generate(None, "--allow-pickle")


def _index_outside(ctx: Ctx) -> list:
    (ctx.model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"conv_in.weight": "../../secret.safetensors"}}))
    return ctx.generate()


def _output_parent_is_file(ctx: Ctx) -> list:
    blocker = ctx.write("blocker", "a file where a folder should be")
    return ["attack", "badt2i", ctx.model, "-o", blocker / "out", *QUICK_ATTACK]


def _existing_output(ctx: Ctx) -> list:
    ctx.out.mkdir()
    (ctx.out / "keep.txt").write_text("an earlier result")
    return ctx.attack()


def _config(name: str, text: str | bytes):
    return lambda ctx: ctx.attack("--config", ctx.write(name, text))


# (id, setup(ctx) -> argv, a substring the error line must contain)
CASES = [
    # --- model paths and directories
    ("missing model path", lambda c: c.generate(c.tmp / "no-such-model"), "does not exist"),
    ("model path is a file", lambda c: c.generate(c.write("model.safetensors", b"x")), "is a file"),
    ("empty model path", lambda c: c.generate(" "), "model path is empty"),
    ("directory that is not a diffusers model", lambda c: c.generate(c.write("README", "hi").parent),
     "no model_index.json"),
    ("model_index.json is not JSON", lambda c: ((c.model / "model_index.json").write_text("{"), c.generate())[-1],
     "not a valid model_index.json"),
    ("model_index.json is a list", lambda c: ((c.model / "model_index.json").write_text("[1, 2]"), c.generate())[-1],
     "not a valid model_index.json"),
    ("wrong model type (DDPMPipeline)", lambda c: (c.edit_json("model_index.json", _class_name="DDPMPipeline"),
                                                  c.generate())[-1], "holds a DDPMPipeline"),
    ("component from another library", lambda c: (c.edit_json("model_index.json", unet=["os", "system"]),
                                                 c.generate())[-1], "component 'unet'"),
    ("component with custom code", _custom_code, "component 'unet'"),
    ("component missing", lambda c: (shutil.rmtree(c.model / "vae"), c.generate())[-1],
     "lacks the pipeline components"),
    ("component config missing", lambda c: ((c.model / "text_encoder" / "config.json").unlink(), c.generate())[-1],
     "config.json is missing"),
    ("component config not JSON", lambda c: ((c.model / "unet" / "config.json").write_text("{oops"), c.generate())[-1],
     "could not load"),
    ("tokenizer without vocabulary", lambda c: ((c.model / "tokenizer" / "tokenizer.json").unlink(), c.generate())[-1],
     "no vocabulary"),
    # --- weights
    ("truncated safetensors", lambda c: (_truncate(c, UNET_FILE), c.generate())[-1], "not a valid safetensors file"),
    ("corrupted safetensors header", lambda c: ((c.model / VAE_FILE).write_bytes(b"\xff" * 8 + b"{}"),
                                                c.generate())[-1], "not a valid safetensors file"),
    ("empty safetensors file", lambda c: ((c.model / TEXT_FILE).write_bytes(b""), c.generate())[-1],
     "not a valid safetensors file"),
    ("no weights at all", lambda c: ((c.model / VAE_FILE).unlink(), c.generate())[-1], "has no .safetensors weights"),
    ("weight missing from the checkpoint", lambda c: (c.edit_tensors(TEXT_FILE, lambda t: t.pop(sorted(t)[3])),
                                                     c.generate())[-1], "lacks the weights"),
    ("weight of the wrong shape", lambda c: (c.edit_tensors(UNET_FILE, lambda t: t.update(
        {"conv_in.weight": torch.zeros(3, 3)})), c.generate())[-1], "could not load"),
    ("NaN in the UNet", lambda c: (c.edit_tensors(UNET_FILE, lambda t: _set(t, "conv_in.weight", math.nan)),
                                   c.generate())[-1], "NaN or inf"),
    ("inf in the VAE", lambda c: (c.edit_tensors(VAE_FILE, lambda t: _set(t, sorted(t)[0], math.inf)),
                                  c.generate())[-1], "NaN or inf"),
    ("NaN in the text encoder", lambda c: (c.edit_tensors(TEXT_FILE, lambda t: _set(t, sorted(t)[-1], math.nan)),
                                           c.generate())[-1], "NaN or inf"),
    ("UNet and VAE latent channels differ", lambda c: (c.edit_json("vae/config.json", latent_channels=3),
                                                      c.generate())[-1], "could not load"),
    ("native sample size the pipeline cannot produce", lambda c: (c.edit_json("unet/config.json", sample_size=3),
                                                                  c.generate())[-1], "valid: positive multiples of 8"),
    ("pickle weights without --allow-pickle", _pickled, "refusing pickle-based weights"),
    ("malicious pickle with --allow-pickle", _malicious_pickle, "weights_only=True) rejects"),
    ("shard index naming a file outside its folder", _index_outside, "outside its folder"),
    # --- triggers and prompts
    ("whitespace-only trigger in a config file", _config("c.yaml", 'trigger: "  \\t "\n'), "trigger is empty"),
    ("whitespace-only --trigger", lambda c: c.attack("--trigger", "   "), "trigger is empty"),
    ("trigger the tokenizer drops (U+200B without ftfy, simulated)",
     lambda c: (_dropping_tokenizer(c), c.attack("--trigger", "\\u200b"))[-1], "drops the trigger"),
    ("blank --prompt", lambda c: ["generate", c.model, "-p", "  ", "-o", c.tmp / "out.png"], "empty prompt"),
    ("empty prompt file", lambda c: c.remove("--prompts", c.write("prompts.txt", b"")), "holds no prompts"),
    ("blank-only prompt file", lambda c: c.remove("--prompts", c.write("prompts.txt", " \n\t\r\n\n")),
     "holds no prompts"),
    ("non-UTF-8 prompt file", lambda c: c.remove("--prompts", c.write("prompts.txt", "caf\xe9\n".encode("latin-1"))),
     "not UTF-8"),
    ("binary prompt file", lambda c: c.remove("--prompts", c.write("prompts.txt", b"a cat\n\x00\x01\x02")), "NUL byte"),
    ("missing prompt file", lambda c: c.remove("--prompts", c.tmp / "nope.txt"), "does not exist"),
    # --- config files
    ("config with unknown keys", _config("c.yaml", "kind: pixel\nstepz: 3\n"), "valid: batch_size, clean_source, corner"),
    ("config value out of range", _config("c.yaml", "lam: 5\n"), "valid: 0.0..1.0"),
    ("config value not allowed", _config("c.yaml", "kind: sparkle\n"), "valid: pixel, style, object"),
    ("config integer field given a fraction", _config("c.yaml", "seed: 1.5\n"), "seed=1.5 must be an integer"),
    ("config number field given text", _config("c.json", '{"lr": "fast"}'), "must be a number"),
    ("config NaN learning rate", _config("c.yaml", "lr: .nan\n"), "finite"),
    ("config string field given a list", _config("c.yaml", "trigger: [a, b]\n"), "must be a string"),
    ("config that does not parse", _config("c.yaml", "kind: [pixel\n"), "does not parse"),
    ("config that is not a mapping", _config("c.yaml", "- kind\n- pixel\n"), "must hold a mapping"),
    ("config not UTF-8", _config("c.yaml", b"trigger: \xff\n"), "not UTF-8"),
    ("config with mixed-type unknown keys", _config("c.yaml", "1: 2\nfoo: 3\n"), "unknown config keys"),
    ("config file missing", lambda c: c.attack("--config", c.tmp / "nope.yaml"), "does not exist"),
    ("config path is a directory", lambda c: c.attack("--config", c.tmp), "is a directory"),
    # --- outputs
    ("output exists without --overwrite", _existing_output, "already exists"),
    ("output is the input model", lambda c: ["attack", "badt2i", c.model, "-o", c.model, "--overwrite", *QUICK_ATTACK],
     "would overwrite the input"),
    ("output inside the input model", lambda c: ["attack", "badt2i", c.model, "-o", c.model / "attacked",
                                                 *QUICK_ATTACK], "would overwrite the input"),
    ("remove: output inside the input model", lambda c: ["remove", c.model, "-o", c.model / "repaired", "--method",
                                                         "skd", "--trigger", "tq", "--steps", "1", "--measure", "0"],
     "would overwrite the input"),
    ("eval: output inside the input model", lambda c: ["eval", c.model, "--trigger", "tq", "--kind", "pixel", "--judge",
                                                       c.judge, "-o", c.model / "eval", "--count", "2", "--steps", "1"],
     "would overwrite the input"),
    ("generate: output inside the input model", lambda c: ["generate", c.model, "-p", "a red circle", "-o",
                                                           c.model / "out.png", "--steps", "1"],
     "would overwrite the input"),
    ("output folder under a file", _output_parent_is_file, "cannot create the output folder"),
    ("full disk while saving the model", lambda c: (c.monkeypatch.setattr(
        "diffusers.StableDiffusionPipeline.save_pretrained", _save_then_fill_disk), c.attack())[-1],
     "No space left on device"),
    ("full disk while writing the run record", lambda c: (c.monkeypatch.setattr(
        "sealdiff.attacks.write_run_info", _enospc), c.attack())[-1], "No space left on device"),
    ("full disk creating the staging folder", lambda c: (c.monkeypatch.setattr("tempfile.mkdtemp", _enospc),
                                                         c.attack())[-1], "No space left on device"),
    ("generate: full disk writing the PNG", lambda c: (c.monkeypatch.setattr("PIL.Image.Image.save", _enospc),
                                                       c.generate())[-1], "No space left on device"),
    ("generate --steps 0", lambda c: c.generate(None, "--steps", "0"), "steps"),
    ("attack: negative learning rate", _config("c.yaml", "lr: -1\n"), "lr"),
]

@pytest.mark.parametrize("setup, expected", [pytest.param(s, e, id=i) for i, s, e in CASES])
def test_bad_input_is_one_line_and_writes_nothing(setup, expected, base_model, judge_dir, tmp_path, monkeypatch,
                                                  capsys):
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    ctx = Ctx(tmp_path, model, judge_dir, monkeypatch)
    args = setup(ctx)
    before = snapshot(tmp_path)
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err)
    assert expected in err
    assert snapshot(tmp_path) == before  # nothing written: no output, no staging folder, input untouched
    assert not (tmp_path / "PWNED").exists()


def test_unknown_config_keys_list_every_valid_key(base_model, tmp_path, capsys):
    from sealdiff.attacks.badt2i import BadT2IConfig

    config = tmp_path / "c.yaml"
    config.write_text("stepz: 3\nlamda: 0.1\n")
    code, _, err = run_cli(["attack", "badt2i", base_model, "-o", tmp_path / "o", "--config", config], capsys)
    assert_one_line_error(code, err)
    assert "['lamda', 'stepz']" in err
    listed = err.split("valid:")[1]
    assert all(f.name in listed for f in dataclasses.fields(BadT2IConfig))


# ------------------------------------------------------------------------------------------- prompt files


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("dir", "is a directory"),
    (b"", "holds no prompts"),
    (b"\n \n\t\n\r\n", "holds no prompts"),
    (b"\xef\xbb\xbf\n", "holds no prompts"),  # only a byte-order mark
    ("caf\xe9 au lait\n".encode("latin-1"), r"not UTF-8 text \(byte 3, line 1\)"),
    (b"ok\n\xff\xfe", "line 2"),
    (b"a cat\x00\n", "NUL byte on line 1"),
])
def test_read_prompt_file_refuses(content, message, tmp_path):
    path = tmp_path / "prompts.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SealdiffError, match=message) as info:
        read_prompt_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_read_prompt_file_keeps_invisible_triggers(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeff\u200b a red circle\r\n\n  a blue\u2028square \t\n\u00a0x\n".encode())
    assert read_prompt_file(path) == ["\u200b a red circle", "a blue\u2028square", "\u00a0x"]


LINE_CHARS = st.one_of(st.characters(blacklist_characters="\n\r\x00", blacklist_categories=("Cs",)),
                       st.sampled_from(["\u200b", "\u2028", "\u00a0", "\ufeff", "\t", " ", "\x0b", "\x85"]))


def _prompt(text: str) -> str:
    return text.strip(" \t")


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.text(LINE_CHARS, min_size=1, max_size=30).map(_prompt).filter(lambda p: p.strip()),
                        min_size=1, max_size=8),
       crlf=st.booleans(), blank_lines=st.lists(st.sampled_from(["", " ", "\t", "  \t"]), max_size=3),
       trailing_newline=st.booleans(), bom=st.booleans())
def test_prompt_file_roundtrip(prompts, crlf, blank_lines, trailing_newline, bom):
    assume(not prompts[0].startswith("\ufeff"))  # a leading BOM is the file's, by definition
    newline = "\r\n" if crlf else "\n"
    lines = blank_lines + [p for prompt in prompts for p in (prompt, *blank_lines)]
    text = ("\ufeff" if bom else "") + newline.join(lines) + (newline if trailing_newline else "")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "p.txt")
        path.write_bytes(text.encode("utf-8"))
        assert read_prompt_file(path) == prompts


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200))
def test_prompt_parsing_of_any_bytes_returns_prompts_or_a_clear_error(data):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        prompts = parse_prompts(text)
    except SealdiffError as exc:
        assert "\n" not in str(exc)
        return
    assert prompts and all(p.strip() and "\n" not in p and p == p.strip(" \t") for p in prompts)


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.sampled_from(" \t\r\n\u3000\u2003\x0b\x0c"), max_size=20))
def test_blank_only_prompt_text_is_refused(text):
    with pytest.raises(SealdiffError, match="holds no prompts"):
        parse_prompts(text)


# ------------------------------------------------------------------------------------------- configs


@dataclass
class Demo:
    steps: int = field(default=10, metadata={"range": (1, None)})
    lam: float = field(default=0.5, metadata={"range": (0.0, 1.0)})
    lr: float = 1e-4
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    extra: str | None = None
    flag: bool = False


DEMO_KEYS = [f.name for f in dataclasses.fields(Demo)]
KEYS = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd", "Pc")), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(unknown=st.dictionaries(KEYS.filter(lambda k: k not in DEMO_KEYS), st.integers(), min_size=1, max_size=4),
       known=st.fixed_dictionaries({}, optional={"steps": st.integers(1, 10 ** 6), "name": st.text(max_size=5)}))
def test_any_unknown_key_is_refused_listing_the_valid_ones(unknown, known):
    with pytest.raises(SealdiffError) as info:
        build_config(Demo, None, **known, **unknown)
    message = str(info.value)
    assert "\n" not in message
    assert all(repr(k) in message.split("valid:")[0] for k in unknown)
    assert message.split("valid:")[1].strip() == ", ".join(sorted(DEMO_KEYS))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.fixed_dictionaries({
    "steps": st.integers(1, 2 ** 53), "lam": st.floats(0.0, 1.0),
    "lr": st.floats(allow_nan=False, allow_infinity=False),
    "name": st.text(max_size=20), "mode": st.sampled_from(["a", "b"]),
    "extra": st.none() | st.text(max_size=5), "flag": st.booleans()}), fmt=st.sampled_from(["json", "yaml"]))
def test_valid_values_roundtrip_through_a_config_file(values, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, f"c.{fmt}")
        path.write_text(json.dumps(values) if fmt == "json" else yaml.safe_dump(values),
                        encoding="utf-8")
        assert dataclasses.asdict(build_config(Demo, path)) == values


@settings(max_examples=60, deadline=None)
@given(lam=st.floats(allow_nan=False).filter(lambda x: not 0 <= x <= 1) | st.sampled_from([math.nan, math.inf]),
       steps=st.integers(max_value=0))
def test_out_of_range_or_non_finite_numbers_are_refused(lam, steps):
    with pytest.raises(SealdiffError, match=r"lam=.*(valid: 0\.0\.\.1\.0|finite)"):
        build_config(Demo, None, lam=lam)
    with pytest.raises(SealdiffError, match=r"steps=.*valid: 1\.\."):
        build_config(Demo, None, steps=steps)


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 10 ** 9), lam=st.floats(0, 1), lr=st.floats(1e-9, 1.0), seed=st.integers(0, 2 ** 31),
       batch_size=st.integers(1, 512))
def test_badt2i_numbers_roundtrip_through_yaml(steps, lam, lr, seed, batch_size):
    from sealdiff.attacks.badt2i import BadT2IConfig

    values = {"steps": steps, "lam": lam, "lr": lr, "seed": seed, "batch_size": batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "c.yaml")
        path.write_text(yaml.safe_dump(values))
        cfg = build_config(BadT2IConfig, path)
    assert {k: getattr(cfg, k) for k in values} == values


@pytest.mark.parametrize("text, expected", [
    ("steps: 2.0\n", {"steps": 2}),  # an integral float is an integer
    ("lr: 1e-4\n", {"lr": 1e-4}),  # YAML 1.1 reads 1e-4 as a string
    ("name: 5\n", {"name": "5"}),  # integers in string fields
    ("lam: 1\n", {"lam": 1.0}),
])
def test_gentle_conversions(text, expected, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = build_config(Demo, path)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert all(type(getattr(cfg, k)) is type(v) for k, v in expected.items())


@pytest.mark.parametrize("values, message", [
    ({"flag": "yes"}, "must be true or false"),
    ({"steps": True}, "must be an integer"),
    ({"mode": "c"}, "valid: a, b"),
    ({"extra": 1.5}, "must be a string"),
    ({"name": None}, "must be a string"),
    ({"lr": [1]}, "must be a number"),
])
def test_wrong_types_are_one_clear_line(values, message, tmp_path):
    path = tmp_path / "c.json"  # through a file: a None flag means "not given"
    path.write_text(json.dumps(values))
    with pytest.raises(SealdiffError, match=message) as info:
        build_config(Demo, path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- sample sizes


def test_check_sample_size(tiny_pipe):
    from sealdiff.models.loading import check_sample_size

    for size in (8, 16, 24):  # every size it accepts, the pipeline really produces
        check_sample_size(tiny_pipe, size, size)
        image = tiny_pipe("a cat", height=size, width=size, num_inference_steps=1, output_type="pt").images
        assert image.shape[-2:] == (size, size)
    for height, width in ((12, 16), (16, 4), (0, 16), (-8, 8), (8.0, 8), (True, 8), ("16", 16)):
        with pytest.raises(SealdiffError, match="valid: positive multiples of 8; this model's native size is 16"):
            check_sample_size(tiny_pipe, height, width)


def test_library_errors_stay_one_line(base_model, tmp_path):
    """A library message of many lines (here torch's weights_only refusal) is cut to its useful line."""
    from sealdiff.models.loading import load_t2i

    model = tmp_path / "m"
    shutil.copytree(base_model, model)
    torch.save({"x": _Exec(tmp_path / "PWNED")}, model / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(SealdiffError) as info:
        load_t2i(model, allow_pickle=True)
    assert "\n" not in str(info.value) and "Unsupported global" in str(info.value) and "exec" in str(info.value)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("component, change, message", [
    ("vae", {"latent_channels": 3}, "latents have 3"),
    ("unet", {"cross_attention_dim": 48}, "text of width 48"),
    ("text_encoder", {"vocab_size": 1000}, "more than the text encoder's vocabulary"),
    ("unet", {"sample_size": 5}, "native image size 10"),
])
def test_components_must_fit_together(component, change, message, tiny_pipe):
    """Mismatched components would load and then fail mid-generation with a shape error: refused at load."""
    from sealdiff.models.loading import check_compatible

    module = getattr(tiny_pipe, component)
    if hasattr(module, "register_to_config"):
        module.register_to_config(**change)
    else:
        for key, value in change.items():
            setattr(module.config, key, value)
    with pytest.raises(SealdiffError, match=message) as info:
        check_compatible(tiny_pipe, Path("model"))
    assert "\n" not in str(info.value)
