"""Fuzzing the small parsers of outside input: target profile TOML, fleet inventory TOML, power-meter CSV logs,
``--shape`` / ``--option`` strings, device URLs and calibration files. Success or one one-line EdgeshipError."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeship.errors import EdgeshipError
from edgeship.profiling.meters.csvlog import read_power_log, window_energy
from edgeship.profiling.remote import DeviceURL, load_inventory
from edgeship.spec import parse_shape_overrides
from edgeship.targets import schema

FUZZ = settings(max_examples=int(os.environ.get("EDGESHIP_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def clean(fn: Callable[..., Any], *args: Any) -> str:
    try:
        fn(*args)
    except EdgeshipError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        return "error"
    return "ok"


def toml_value(v: Any) -> str:
    """A TOML literal for a JSON-like value (inline tables and arrays)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


toml_values = st.recursive(
    st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
garbage = st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))


# --- target profiles -------------------------------------------------------------------------------------------

PI5 = tomllib.loads((schema.PROFILE_DIR / "raspberry-pi-5.toml").read_text())


@FUZZ
@given(data=st.data(), value=toml_values | st.just("__delete__"))
def test_profile_with_any_field_replaced(doc_paths: Callable[[Any], list[tuple[Any, ...]]], data: st.DataObject,
                                         value: Any) -> None:
    doc = json.loads(json.dumps(PI5))
    path = data.draw(st.sampled_from(doc_paths(doc)[1:]))  # not the root: the profile stays a table
    node = doc
    for k in path[:-1]:
        node = node[k]
    if value == "__delete__":
        del node[path[-1]]
    else:
        node[path[-1]] = value
    clean(schema.parse_profile, doc, "fuzz.toml")


@FUZZ
@given(raw=garbage)
def test_profile_file_of_random_bytes(tmp_path: Path, raw: bytes) -> None:
    p = tmp_path / "p.toml"
    p.write_bytes(raw)
    assert clean(schema.load_profile_file, p) == "error"


# --- fleet inventories -----------------------------------------------------------------------------------------

# main's entry keys, the ssh:// transport's options (SshOptions), and keys no scheme knows
inventory_keys = st.sampled_from(["url", "name", "target", "workdir", "runtime", "identity", "known_hosts",
                                  "ssh_config", "accept_new_host_key", "connect_timeout", "port", ""])
runtimes = st.sampled_from(["python-venv", "adb-native", "raspberry-pi-5"])
urls = st.sampled_from(["ssh://pi@host", "ssh://host:22", "ssh://pi:pw@host", "sssh://h", "ssh://", "host",
                        "ssh://h:99999", "ssh://h:-1", "ssh://[::1]:22", "ssh://h?workdir=/tmp", "ssh://h:x"])


@FUZZ
@given(devices=st.lists(st.dictionaries(inventory_keys, urls | runtimes | toml_values, max_size=4), max_size=3),
       top=st.sampled_from(["[[device]]", "device", "devices"]), raw=st.booleans())
def test_inventory(tmp_path: Path, devices: list[dict[str, Any]], top: str, raw: bool) -> None:
    if top == "[[device]]":
        text = "".join("[[device]]\n" + "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in d.items())
                       for d in devices)
    else:
        text = f"{top} = {toml_value(devices)}\n"
    p = tmp_path / "inv.toml"
    p.write_text(text)
    clean(load_inventory, p)


@FUZZ
@given(raw=garbage)
def test_inventory_of_random_bytes(tmp_path: Path, raw: bytes) -> None:
    p = tmp_path / "inv.toml"
    p.write_bytes(raw)
    assert clean(load_inventory, p) == "error"


@FUZZ
@given(url=urls | st.text(max_size=40) | st.builds(lambda a, b: f"ssh://{a}@{b}", st.text(max_size=8),
                                                  st.text(max_size=12)))
def test_device_url(url: str) -> None:
    clean(DeviceURL.parse, url)


# --- power-meter CSV logs --------------------------------------------------------------------------------------

cells = st.sampled_from(["1714200000.5", "2026-04-27T10:00:00", "2026-13-01", "3.2", "-1", "nan", "inf", "1e400",
                         "", " ", "x", "0", "5.1", "0.52"])
headers = st.sampled_from(["timestamp,watts", "time,volts,amps", "t,power", "watts", "timestamp,voltage,current",
                           "a,b,c", "", "Time (s),Power (W)"])


@FUZZ
@given(header=headers, rows=st.lists(st.lists(cells, max_size=4).map(",".join), max_size=6))
def test_power_csv(tmp_path: Path, header: str, rows: list[str]) -> None:
    p = tmp_path / "log.csv"
    p.write_text("\n".join([header, *rows]) + "\n")
    if clean(read_power_log, p) == "ok":
        log = read_power_log(p)
        if log:
            clean(window_energy, log, log[0][0], log[-1][0] + 1.0, str(p))


@FUZZ
@given(raw=garbage)
def test_power_csv_of_random_bytes(tmp_path: Path, raw: bytes) -> None:
    p = tmp_path / "log.csv"
    p.write_bytes(raw)
    clean(read_power_log, p)


# --- --shape / --option strings -------------------------------------------------------------------------------

@FUZZ
@given(items=st.lists(st.text(max_size=30) | st.builds(lambda n, d: f"{n}={d}", st.sampled_from(["input_ids", "x", ""]),
                                                       st.text(alphabet="0123456789xX-+ _.e", max_size=30)),
                      max_size=3))
def test_shape_strings(items: list[str]) -> None:
    if clean(parse_shape_overrides, items) == "ok":
        for shape in parse_shape_overrides(items).values():
            assert all(isinstance(d, int) and 0 < d < 2**31 for d in shape)


@FUZZ
@given(items=st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["graph_optimization", "delegate", "intra_op", "nope", ""]), st.text(max_size=20)), max_size=3))
def test_option_strings(items: list[str]) -> None:
    from edgeship.cli import _kv
    from edgeship.profiling import backends

    def parse(items: list[str]) -> None:
        opts = _kv(items, "--option")
        for fmt in ("onnx", "tflite", "pte"):
            backends.split_options(fmt, opts)

    clean(parse, items)


# --- calibration files -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_text_model(tiny_bert_dir: Path) -> Any:
    from edgeship.models import load_model

    return load_model(tiny_bert_dir, seq_len=16)


@pytest.mark.needs_export
@FUZZ
@given(raw=garbage | st.lists(st.text(max_size=30) | st.builds(lambda v: json.dumps({"text": v}), toml_values)
                              | st.builds(json.dumps, toml_values), max_size=5).map(lambda ls: "\n".join(ls).encode(
                                  "utf-8", "surrogatepass")),
       suffix=st.sampled_from([".txt", ".jsonl", ".npy", ".npz", ".bin"]))
def test_calibration_files(tiny_text_model: Any, tmp_path: Path, raw: bytes, suffix: str) -> None:
    from edgeship.models import load_calibration

    p = tmp_path / f"calib{suffix}"
    p.write_bytes(raw)
    clean(load_calibration, p, tiny_text_model, 16)
