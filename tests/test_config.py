"""Every params error path: unknown keys, wrong types, out-of-range values, bad overrides, bad files."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ctxrepro.config import (BaseParams, ParamsError, apply_overrides, load_params, param, parse_dataclass,
                             resolve_device, to_plain)
from ctxrepro.stage import parse_shard


@dataclass(frozen=True)
class Inner:
    size: int = param(8, min=1, max=64)


@dataclass(frozen=True)
class Demo:
    steps: int = param(10, min=1)
    lr: float = param(0.1, min=0.0, max=1.0)
    color: str = param("drop", choices=("drop", "projection", "none"))
    amp: bool = param(False)
    splits: tuple[str, ...] = param(["train", "val"], choices=("train", "val"))
    note: str | None = param(None)
    world: Inner = param(Inner())


def test_defaults_and_coercion():
    d = parse_dataclass(Demo, {"lr": 1, "splits": ["val"], "world": {"size": 3}}, "demo")
    assert d.lr == 1.0 and isinstance(d.lr, float)
    assert d.splits == ("val",)
    assert d.world == Inner(size=3)
    assert d.steps == 10 and d.note is None
    assert to_plain(d)["world"] == {"size": 3}
    with pytest.raises(Exception):
        d.steps = 3  # frozen


@pytest.mark.parametrize("data, words", [
    ({"stepz": 3}, ["demo", "stepz", "unknown"]),
    ({"world": {"sise": 3}}, ["demo.world", "sise", "unknown"]),
    ({"steps": "ten"}, ["demo.steps", "'ten'", "int"]),
    ({"steps": 2.5}, ["demo.steps", "2.5", "int"]),
    ({"steps": True}, ["demo.steps", "True", "int"]),
    ({"amp": 1}, ["demo.amp", "1", "bool"]),
    ({"lr": "fast"}, ["demo.lr", "'fast'", "float"]),
    ({"steps": 0}, ["demo.steps", "0", "minimum 1"]),
    ({"lr": 1.5}, ["demo.lr", "1.5", "maximum 1.0"]),
    ({"color": "grey"}, ["demo.color", "'grey'", "'drop'", "'projection'", "'none'"]),
    ({"splits": ["train", "test"]}, ["demo.splits", "'test'", "'val'"]),
    ({"splits": "train"}, ["demo.splits", "'train'", "list"]),
    ({"world": {"size": 100}}, ["demo.world.size", "100", "maximum 64"]),
    ({"world": 5}, ["demo.world", "mapping"]),
    ({"note": 5}, ["demo.note", "5"]),
])
def test_bad_values_name_key_value_and_rule(data, words):
    with pytest.raises(ParamsError) as e:
        parse_dataclass(Demo, data, "demo")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_section_must_be_mapping():
    with pytest.raises(ParamsError, match="section 'demo'.*mapping"):
        parse_dataclass(Demo, [1, 2], "demo")


def test_overrides_parse_yaml_values():
    out = apply_overrides({"demo": {"steps": 1}}, ["demo.steps=5", "demo.world.size=4", "demo.note=hi",
                                                   "demo.splits=[val]"])
    assert out == {"demo": {"steps": 5, "world": {"size": 4}, "note": "hi", "splits": ["val"]}}


@pytest.mark.parametrize("item, words", [
    ("demo.steps", ["section.key=value"]),
    ("steps=3", ["section.key=value"]),
    ("demo..x=3", ["section.key=value"]),
    ("demo.steps=[1", ["not valid YAML"]),
    ("demo.steps.x=1", ["'steps' is not a section"]),
])
def test_bad_overrides(item, words):
    with pytest.raises(ParamsError) as e:
        apply_overrides({"demo": {"steps": 1}}, [item])
    for w in words:
        assert w in str(e.value)


def _write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_load_params_reads_base_and_section(tmp_path):
    p = _write(tmp_path, "base: {seed: 7, device: cpu}\ndemo: {steps: 4}\n")
    base, demo = load_params(p, "demo", Demo, ["demo.lr=0.5", "base.seed=9"])
    assert base == BaseParams(seed=9, device="cpu", workers=2, threads=0, runtime="local")
    assert demo.steps == 4 and demo.lr == 0.5


@pytest.mark.parametrize("text, sets, words", [
    (None, [], ["not found"]),
    ("base: [\n", [], ["not valid YAML"]),
    ("- 1\n- 2\n", [], ["mapping of sections"]),
    ("base: {}\n", [], ["no section 'demo'"]),
    ("base: {devise: cpu}\ndemo: {}\n", [], ["base", "devise"]),
    ("base: {device: tpu}\ndemo: {}\n", [], ["base.device", "'tpu'", "'cuda'"]),
    ("base: {seed: -1}\ndemo: {}\n", [], ["base.seed", "-1", "minimum 0"]),
    ("base: {}\ndemo: {}\n", ["other.x=1"], ["other.x=1", "reads only sections"]),
])
def test_load_params_errors(tmp_path, text, sets, words):
    p = tmp_path / "params.yaml" if text is None else _write(tmp_path, text)
    with pytest.raises(ParamsError) as e:
        load_params(p, "demo", Demo, sets)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("3/4", (3, 4))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["4/4", "-1/2", "1", "a/b", "0/0"])
def test_parse_shard_errors(text):
    with pytest.raises(ParamsError, match="--shard"):
        parse_shard(text)


def test_device_resolution():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ParamsError, match="no CUDA device"):
            resolve_device("cuda")


# YAML 1.2 float spellings (what DVC writes for `dvc exp run -S`) and their values, computed by hand.
FLOATS = [("1e-3", 0.001), ("1E-3", 0.001), ("1.0e-3", 0.001), (".5", 0.5), ("-2e+0", -2.0), ("1e-05", 0.00001),
          ("3.", 3.0), ("+.25e1", 2.5)]


@pytest.mark.parametrize("text, value", FLOATS)
def test_yaml12_floats_through_set_and_params_file(tmp_path, text, value):
    @dataclass(frozen=True)
    class Signed:
        lr: float = param(0.1)

    via_set = load_params(_write(tmp_path, "demo: {}\n"), "demo", Signed, [f"demo.lr={text}"])[1].lr
    via_file = load_params(_write(tmp_path, f"demo:\n  lr: {text}\n"), "demo", Signed)[1].lr
    assert via_set == via_file == value and isinstance(via_file, float)


@pytest.mark.parametrize("text", ["1e", "e3", "1e-3x", "1.2.3", "0x1p-3"])
def test_non_numbers_stay_strings_and_are_refused_as_floats(tmp_path, text):
    with pytest.raises(ParamsError, match=r"demo.lr: .* is a str, expected float"):
        load_params(_write(tmp_path, f"demo:\n  lr: {text}\n"), "demo", Demo)


def test_integers_stay_integers(tmp_path):
    _, demo = load_params(_write(tmp_path, "demo: {steps: 12}\n"), "demo", Demo, ["demo.world.size=3"])
    assert demo.steps == 12 and demo.world.size == 3  # an int field refuses floats, so 12 must not become 12.0


@pytest.mark.parametrize("text", [".nan", ".NaN", ".inf", "-.inf", "+.Inf"])
def test_non_finite_floats_refused_unless_the_field_allows(tmp_path, text):
    @dataclass(frozen=True)
    class Loose:
        lr: float = param(0.1, min=0.0)
        limit: float = param(1.0, nonfinite=True)

    with pytest.raises(ParamsError, match=r"demo.lr: .* is not a finite number"):
        load_params(_write(tmp_path, "demo: {}\n"), "demo", Loose, [f"demo.lr={text}"])
    limit = load_params(_write(tmp_path, "demo: {}\n"), "demo", Loose, [f"demo.limit={text}"])[1].limit
    assert limit != limit if "nan" in text.lower() else limit == float(text.replace(".", "").lower() + "inity")


@pytest.mark.parametrize("text, section", [("base: {}\ndemo:\n", "demo"), ("base:\ndemo: {}\n", "base"),
                                           ("demo:\n  world:\n", "demo.world")])
def test_null_section_is_an_error_naming_it(tmp_path, text, section):
    with pytest.raises(ParamsError, match=f"section '{section}' is empty"):
        load_params(_write(tmp_path, text), "demo", Demo)
