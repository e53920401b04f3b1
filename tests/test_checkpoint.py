"""fastsgd.save / fastsgd.load: round trips, refusals, damaged, forged, deep,
sparse and special files, headers save would not write, and atomicity under
SIGKILL."""
import collections
import contextlib
import hashlib
import json
import os
import pickle
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fastsgd
from fastsgd import CheckpointError, Parameter, checkpoint

# ------------------------------------------------------------------ helpers


def assert_same(actual, expected):
    """actual is expected to the bit: types, dtypes (byte order too), shapes,
    memory order, values (nan and -0.0 too), dict order and key types."""
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, (np.ndarray, np.generic)):
        assert actual.dtype.str == expected.dtype.str
        assert actual.shape == expected.shape
        if isinstance(expected, np.ndarray):
            assert actual.flags.f_contiguous == expected.flags.f_contiguous
        assert actual.tobytes(order="A") == np.asarray(expected).tobytes(order="A")
    elif isinstance(expected, float):
        assert struct.pack("<d", actual) == struct.pack("<d", expected)
    elif isinstance(expected, dict):
        assert [(type(k), k) for k in actual] == [(type(k), k) for k in expected]
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
    else:
        assert actual == expected


def round_trip(obj, tmp_path):
    path = tmp_path / "checkpoint"
    fastsgd.save(obj, path)
    return fastsgd.load(path)


def forge(path, header, payload=b"", version=1, magic=b"\x89fastsgd"):
    """A file laid out as the module docstring says, checksum included:
    what a forger can write without fastsgd."""
    if not isinstance(header, bytes):
        header = json.dumps(header, separators=(",", ":")).encode()  # as save writes it
    body = struct.pack("<8sIQQ", magic, version, len(header), len(payload)) + header + payload
    Path(path).write_bytes(body + hashlib.sha256(body).digest())


def temporary_files(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------ round trips

VALUES = [
    None, True, False, 0, -7, 2**100, -(2**70), 0.1, -0.0, float("nan"), float("inf"),
    -float("inf"), 5e-324, "", "text", "ünïcødé ☃ \U0001f600", "nul\x00byte",
    [], (), {}, [1, [2, [3, (4, None)]]], ((),), ([], {}),
    {"a": 1, 2: "b", "2": 3, -1: [None]},
    {"state": {0: {"momentum_buffer": np.arange(3.0)}},
     "param_groups": [{"lr": 0.1, "nesterov": False, "foreach": None, "params": [0]}]},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_python_values_round_trip(value, tmp_path):
    assert_same(round_trip(value, tmp_path), value)


DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "longdouble", "complex64", "complex128",
          ">i2", ">u4", ">i8", ">f4", ">f8", ">c8", ">c16", "<f8"]
SHAPES = [(), (0,), (1,), (7,), (3, 0, 2), (2, 3, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_arrays_round_trip(dtype, shape, tmp_path):
    rng = np.random.default_rng(0)
    array = np.asarray(rng.standard_normal(shape) * 100).astype(dtype)
    loaded = round_trip(array, tmp_path)
    assert_same(loaded, array)
    assert loaded.flags.writeable and loaded.flags.aligned and loaded.flags.owndata


def test_memory_order_is_kept_for_fortran_arrays_only(tmp_path):
    base = np.arange(60, dtype=np.float64).reshape(3, 4, 5)
    fortran = np.asfortranarray(base)
    views = [base[::2, 1:, ::-1], base.transpose(1, 0, 2), base[:, 1], fortran[1:]]
    loaded = round_trip([fortran, *views], tmp_path)
    assert_same(loaded[0], fortran)
    assert loaded[0].flags.f_contiguous and not loaded[0].flags.c_contiguous
    for got, view in zip(loaded[1:], views):
        assert got.flags.c_contiguous
        assert np.array_equal(got, view) and got.dtype == view.dtype


def test_numpy_scalars_round_trip_as_numpy_scalars(tmp_path):
    scalars = [np.float32(1.5), np.float64(-0.0), np.int8(-3), np.uint64(2**64 - 1),
               np.bool_(True), np.complex64(1 - 2j), np.float16(np.nan)]
    assert_same(round_trip(scalars, tmp_path), scalars)


def test_dict_subclasses_come_back_as_dicts(tmp_path):
    value = collections.OrderedDict([("b", 1), ("a", collections.defaultdict(list))])
    assert_same(round_trip(value, tmp_path), {"b": 1, "a": {}})


def test_memmap_comes_back_as_an_ndarray(tmp_path):
    memmap = np.memmap(tmp_path / "data", dtype=np.int16, mode="w+", shape=(4, 3))
    memmap[:] = np.arange(12).reshape(4, 3)
    assert_same(round_trip(memmap, tmp_path), np.arange(12, dtype=np.int16).reshape(4, 3))


def test_parameter_round_trip_drops_grad_and_attributes(tmp_path):
    parameter = Parameter(np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    parameter.grad = np.ones((2, 3), np.float32)
    parameter.tag = "weight"
    loaded = round_trip({"w": parameter}, tmp_path)["w"]
    assert_same(loaded, parameter)
    assert loaded.grad is None
    assert not hasattr(loaded, "tag")


def test_path_may_be_str_or_pathlike(tmp_path):
    fastsgd.save([1], str(tmp_path / "a"))
    fastsgd.save([2], tmp_path / "b")
    assert fastsgd.load(tmp_path / "a") == [1]
    assert fastsgd.load(str(tmp_path / "b")) == [2]


def _named_groups(seed):
    rng = np.random.default_rng(seed)
    w = Parameter(rng.standard_normal((4, 3)).astype(np.float32))
    b = Parameter(rng.standard_normal(3).astype(np.float32))
    v = Parameter(np.asfortranarray(rng.standard_normal((5, 2))))
    return {"w": w, "b": b, "v": v}, [
        {"params": [("w", w), ("b", b)], "lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"params": [("v", v)], "lr": 0.05, "momentum": 0.5, "dampening": 0.1,
         "weight_decay": 0.01},
    ]


def _train(optimizer, model, steps):
    for step in steps:
        for index, p in enumerate(model.values()):
            p.grad = np.empty_like(p, subok=False)  # in p's memory order, as step wants
            p.grad[...] = np.sin(np.arange(p.size) * (step + 1) + index).reshape(p.shape)
        optimizer.step()


def test_sgd_resumed_from_a_checkpoint_trains_bit_identically(tmp_path):
    model, groups = _named_groups(0)
    uninterrupted = fastsgd.SGD(groups, lr=0.01)
    _train(uninterrupted, model, range(10))

    model, groups = _named_groups(0)
    optimizer = fastsgd.SGD(groups, lr=0.01)
    _train(optimizer, model, range(5))
    saved = {"model": model, "optimizer": optimizer.state_dict(), "epoch": 5}
    fastsgd.save(saved, tmp_path / "checkpoint")
    del model, groups, optimizer

    loaded = fastsgd.load(tmp_path / "checkpoint")
    assert loaded["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]
    assert loaded["optimizer"]["param_groups"][0]["param_names"] == ["w", "b"]
    model = loaded["model"]
    resumed = fastsgd.SGD([{"params": [("w", model["w"]), ("b", model["b"])]},
                           {"params": [("v", model["v"])]}], lr=0.01)
    resumed.load_state_dict(loaded["optimizer"])
    _train(resumed, model, range(loaded["epoch"], 10))

    expected_model = {name: p for g in uninterrupted.param_groups
                      for name, p in zip(g["param_names"], g["params"])}
    for name, p in model.items():
        assert_same(p, expected_model[name])
        assert_same(resumed.state[p]["momentum_buffer"],
                    uninterrupted.state[expected_model[name]]["momentum_buffer"])


# ------------------------------------------------------------------ refusals at save

class _Anything:
    pass


UNSAVABLE = [
    np.array([1, None], dtype=object), np.array(["text"]), np.array([b"bytes"]),
    np.zeros(2, dtype=[("x", "f4"), ("y", "i4")]), np.array(["2020-01-01"], "M8[D]"),
    np.zeros(2, "m8[s]"), np.ma.masked_array([1.0, 2.0], mask=[True, False]),
    np.str_("text"), np.datetime64("2020"), Parameter(np.zeros(2)).view(np.int64),
    {1, 2}, b"bytes", 1 + 2j, _Anything(), len, collections.namedtuple("Pair", "a b")(1, 2),
    {(1, 2): "tuple key"}, {True: "bool key"}, {1.5: "float key"}, {None: 1},
    [1, {"deep": [np.array([1, None], dtype=object)]}],
]


@pytest.mark.parametrize("value", UNSAVABLE, ids=lambda v: type(v).__name__)
def test_unsavable_values_raise_type_error_and_touch_nothing(value, tmp_path):
    path = tmp_path / "checkpoint"
    fastsgd.save("old", path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="cannot save"):
        fastsgd.save({"state": value}, path)
    assert path.read_bytes() == before
    assert temporary_files(tmp_path) == []


def test_cycles_and_deep_nesting_raise_value_error(tmp_path):
    cycle = []
    cycle.append(cycle)
    deep = []
    for _ in range(101):
        deep = [deep]
    for value in (cycle, deep):
        with pytest.raises(ValueError, match="nested deeper than 100"):
            fastsgd.save(value, tmp_path / "checkpoint")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ damaged and foreign files

SMALL = {"state": {0: {"momentum_buffer": np.arange(4, dtype=np.float32)}},
         "param_groups": [{"lr": 0.5, "params": [0]}], "scalar": np.int16(3)}


@pytest.fixture
def small_checkpoint(tmp_path):
    path = tmp_path / "small"
    fastsgd.save(SMALL, path)
    return path, path.read_bytes()


def test_every_truncation_is_an_error_naming_the_path(small_checkpoint):
    path, data = small_checkpoint
    for length in range(len(data)):
        path.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match=f"^{path}: .*truncated"):
            fastsgd.load(path)


def test_every_flipped_byte_is_an_error(small_checkpoint):
    path, data = small_checkpoint
    for position in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[position] ^= mask
            path.write_bytes(damaged)
            with pytest.raises(CheckpointError, match=f"^{path}: "):
                fastsgd.load(path)


def test_damage_in_the_payload_or_digest_is_a_checksum_mismatch(small_checkpoint):
    path, data = small_checkpoint
    for position in (len(data) - 40, len(data) - 1):  # a payload byte, a digest byte
        damaged = bytearray(data)
        damaged[position] ^= 1
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            fastsgd.load(path)


def test_appended_bytes_are_an_error(small_checkpoint):
    path, data = small_checkpoint
    path.write_bytes(data + b"\0")
    with pytest.raises(CheckpointError, match="trailing bytes"):
        fastsgd.load(path)


def test_foreign_formats_are_not_checkpoints(tmp_path):
    path = tmp_path / "foreign"
    np.save(tmp_path / "array.npy", np.arange(3))
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as archive:
        archive.writestr("data", "x")
    for data in ((tmp_path / "array.npy").read_bytes(), (tmp_path / "archive.zip").read_bytes(),
                 b"plain text that is long enough to hold a whole preamble and digest",
                 b"\x89fastsgX" + bytes(60), b"\x89PNG"):
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match="not a fastsgd checkpoint"):
            fastsgd.load(path)


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["FASTSGD_EXPLOIT_MARKER"]),))


def test_a_pickle_is_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "exploited"
    monkeypatch.setenv("FASTSGD_EXPLOIT_MARKER", str(marker))
    pickle.loads(pickle.dumps(_Exploit()))  # the exploit works when unpickled...
    assert marker.exists()
    marker.unlink()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "pickled").write_bytes(pickle.dumps({"x": _Exploit()}, protocol))
        with pytest.raises(CheckpointError, match="not a fastsgd checkpoint"):
            fastsgd.load(tmp_path / "pickled")
    assert not marker.exists()  # ...but load never unpickles it


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastsgd.load(tmp_path / "missing")


# ------------------------------------------------------------------ forged files

def _spec(dtype="<f4", shape=(2,), order="C", offset=0, nbytes=None):
    if nbytes is None:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return {"dtype": dtype, "shape": list(shape), "order": order, "offset": offset,
            "nbytes": nbytes}


def test_forged_files_load_when_valid(tmp_path):
    """The forger follows the documented format: the refusals below are real."""
    native_int16 = np.dtype(np.int16).str  # numpy scalars are native-endian
    payload = np.array([1.5, 2.5], "<f4").tobytes() + np.array(7, native_int16).tobytes()
    header = {"arrays": [_spec(), _spec(native_int16, (), offset=8)],
              "root": {"dict": [["p", {"parameter": 0}], [3, {"tuple": [{"scalar": 1}]}]]}}
    forge(tmp_path / "forged", header, payload)
    expected = {"p": Parameter(np.array([1.5, 2.5], np.float32)), 3: (np.int16(7),)}
    assert_same(fastsgd.load(tmp_path / "forged"), expected)
    # and it is byte for byte what save writes for it
    fastsgd.save(expected, tmp_path / "saved")
    assert (tmp_path / "saved").read_bytes() == (tmp_path / "forged").read_bytes()


def _header(spec=None, root=None):
    return {"arrays": [spec or _spec()], "root": root or {"array": 0}}


FORGED_HEADERS = {
    "dtype object": _header(_spec("|O", nbytes=16)),
    "dtype unicode": _header(_spec("<U1")),
    "dtype void": _header(_spec("|V4")),
    "dtype datetime": _header(_spec("<M8", nbytes=16)),
    "dtype record": _header(_spec("<f4,<i4", nbytes=16)),
    "dtype subarray": _header(_spec("(2,)<f4", nbytes=16)),
    "dtype without byte order": _header(_spec("f4", nbytes=8)),
    "dtype not canonical": _header(_spec("<i1", nbytes=2)),
    "dtype bad size": _header(_spec("<i3", nbytes=6)),
    "dtype not a string": _header(_spec(12, nbytes=8)),
    "huge shape": _header(_spec(shape=(2**40, 2**40), nbytes=8)),
    "huge shape matching nbytes": _header(_spec(shape=(2**40, 2**40))),
    "huge empty shape": {"arrays": [_spec(shape=(0, 2**62, 2**62)), _spec()],
                         "root": [{"array": 0}, {"array": 1}]},
    "shape bigger than nbytes": _header(_spec(shape=(2**40,), nbytes=8)),
    "shape smaller than nbytes": _header(_spec(shape=(1,), nbytes=8)),
    "negative dimension": _header(_spec(shape=(-2,), nbytes=8)),
    "bool dimension": _header(_spec(shape=(True, 2), nbytes=8)),
    "float dimension": _header(_spec(shape=(2.0,), nbytes=8)),
    "65 dimensions": _header(_spec(shape=(1,) * 64 + (2,), nbytes=8)),
    "shape not a list": _header(dict(_spec(), shape=2)),
    "nbytes too small": _header(_spec(nbytes=4)),
    "nbytes too big": _header(_spec(nbytes=12)),
    "offset out of range": _header(_spec(offset=2**63)),
    "negative offset": _header(_spec(offset=-8)),
    "bad order": _header(_spec(order="A")),
    "missing spec key": _header({"dtype": "<f4", "shape": [2]}),
    "extra spec key": _header(dict(_spec(), extra=1)),
    "no root": {"arrays": [_spec()]},
    "extra top key": dict(_header(), extra=1),
    "arrays not a list": {"arrays": {"0": _spec()}, "root": {"array": 0}},
    "array index skipped": _header(root=[{"array": 1}]),
    "array index repeated": _header(root=[{"array": 0}, {"array": 0}]),
    "array unused": _header(root=[1]),
    "array index not an int": _header(root={"array": "0"}),
    "array index bool": {"arrays": [_spec()], "root": [{"array": False}, {"array": True}]},
    "unknown tag": _header(root=[{"array": 0}, {"object": "os.system"}]),
    "two tags": _header(root={"array": 0, "tuple": []}),
    "tuple of not a list": _header(root=[{"array": 0}, {"tuple": 3}]),
    "bad dict item": _header(root=[{"array": 0}, {"dict": [["a"]]}]),
    "bad dict key": _header(root=[{"array": 0}, {"dict": [[[1], 2]]}]),
    "bad dict key bool": _header(root=[{"array": 0}, {"dict": [[True, 2]]}]),
    "parameter of ints": _header(_spec("<i4"), root={"parameter": 0}),
    "big-endian parameter": _header(_spec(">f4"), root={"parameter": 0}),
    "scalar with a shape": _header(root={"scalar": 0}),
    "nested too deep": _header(root=[{"array": 0}, json.loads("[" * 102 + "]" * 102)]),
}


@pytest.mark.parametrize("header", FORGED_HEADERS.values(), ids=FORGED_HEADERS.keys())
def test_forged_headers_are_refused(header, tmp_path):
    path = tmp_path / "forged"
    forge(path, header, np.arange(2, dtype="<f4").tobytes())
    with pytest.raises(CheckpointError, match=f"^{path}: (bad|damaged) header"):
        fastsgd.load(path)


FORGED_HEADER_BYTES = {
    "not json": b"{'arrays': []}",
    "not utf-8": b'{"arrays": [], "root": "\xff"}',
    "not an object": b"[]",
    "duplicate key": b'{"arrays": [], "root": 1, "root": 2}',
    "deep json": b'{"arrays": [], "root": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "integer too long": b'{"arrays": [], "root": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("header", FORGED_HEADER_BYTES.values(), ids=FORGED_HEADER_BYTES.keys())
def test_forged_header_bytes_are_refused(header, tmp_path):
    path = tmp_path / "forged"
    forge(path, header)
    with pytest.raises(CheckpointError, match=f"^{path}: (bad|damaged) header"):
        fastsgd.load(path)


HOSTILE_VALUES = [None, True, 0, -1, 2**63, 2**70, 1.5, float("nan"), "", "<f4", "|O", [],
                  [-1], [2**40], [[]], {}, {"array": 0}, {"tuple": []}, {"dict": []},
                  {"parameter": 0}, {"scalar": 1}]


def _json_paths(node, path=()):
    """Every place in a JSON tree, as the keys that lead to it."""
    yield path
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        items = ()
    for key, child in items:
        yield from _json_paths(child, (*path, key))


def test_randomly_forged_headers_load_or_raise_checkpoint_error_only(tmp_path):
    path = tmp_path / "forged"
    fastsgd.save({"s": SMALL, "p": Parameter(np.ones((2, 3), np.float32)), "t": (1, [])}, path)
    data = path.read_bytes()
    header_length, payload_length = struct.unpack("<QQ", data[12:28])
    header = json.loads(data[28:28 + header_length])
    payload = data[28 + header_length:28 + header_length + payload_length]
    places = list(_json_paths(header))[1:]
    rng = random.Random(0)
    outcomes = collections.Counter()
    for _ in range(500):
        forged = json.loads(json.dumps(header))
        *parents, last = rng.choice(places)
        node = forged
        for key in parents:
            node = node[key]
        node[last] = rng.choice(HOSTILE_VALUES)
        forge(path, forged, payload)
        try:
            loaded = fastsgd.load(path)
        except CheckpointError:
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        fastsgd.save(loaded, tmp_path / "saved")  # load accepts only what save writes
        assert (tmp_path / "saved").read_bytes() == path.read_bytes()
    assert outcomes["refused"] > 250 and outcomes["loaded"] > 10, outcomes


@pytest.mark.parametrize("header_length, payload_length, message", [
    (2**64 - 1, 0, "truncated"), (0, 2**63, "truncated"), (0, 0, "trailing bytes")])
def test_forged_lengths_are_refused_before_reading(tmp_path, header_length, payload_length,
                                                   message):
    path = tmp_path / "forged"
    body = struct.pack("<8sIQQ", b"\x89fastsgd", 1, header_length, payload_length) + b"{}"
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(CheckpointError, match=message):
        fastsgd.load(path)


def test_other_format_versions_are_refused(tmp_path):
    forge(tmp_path / "forged", {"arrays": [], "root": 1}, version=2)
    with pytest.raises(CheckpointError, match="format version 2"):
        fastsgd.load(tmp_path / "forged")


# ------------------------------------------------------------------ deep headers

def test_a_bad_node_over_a_deep_subtree_is_a_checkpoint_error(tmp_path):
    """A bad node 99 lists deep holding an 800-deep list: the error path once
    repr()'d the whole subtree and raised RecursionError."""
    path = tmp_path / "forged"
    forge(path, b'{"arrays":[],"root":' + b"[" * 99 + b'{"a":' + b"[" * 800 + b"]" * 800
          + b',"b":1}' + b"]" * 99 + b"}")
    with pytest.raises(CheckpointError, match=f"^{path}: bad header: JSON nested 901 deep"):
        fastsgd.load(path)


def test_errors_show_a_bounded_part_of_a_bad_node(tmp_path):
    path = tmp_path / "forged"
    deep = json.loads("[" * 250 + "]" * 250)
    forge(path, {"arrays": [], "root": {"a": deep, "b": "x" * 10**5}})
    with pytest.raises(CheckpointError, match="is not a node") as error:
        fastsgd.load(path)
    assert len(str(error.value)) < len(str(path)) + 100


def _nested(kind, depth, leaf):
    for _ in range(depth):
        leaf = {"list": lambda x: [x], "tuple": lambda x: (x,), "dict": lambda x: {7: x}}[kind](leaf)
    return leaf


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
@pytest.mark.parametrize("leaf", [{}, [], (), np.arange(2.0), '"[{\\' * 50],
                         ids=["dict", "list", "tuple", "array", "brackets in a string"])
def test_the_deepest_objects_save_writes_load_and_one_level_more_is_refused(kind, leaf,
                                                                            tmp_path):
    deepest = _nested(kind, 100, leaf)
    assert_same(round_trip(deepest, tmp_path), deepest)
    with pytest.raises(ValueError, match="nested deeper than 100"):
        fastsgd.save(_nested(kind, 101, leaf), tmp_path / "deeper")
    path = tmp_path / "forged"  # what save would write for that object, were it allowed
    header, arrays = checkpoint.encode(deepest)
    header = json.loads(header)
    header["root"] = {"list": lambda x: [x], "tuple": lambda x: {"tuple": [x]},
                      "dict": lambda x: {"dict": [[7, x]]}}[kind](header["root"])
    forge(path, header, b"".join(a.tobytes() for a in arrays))
    with pytest.raises(CheckpointError, match="bad header: (JSON )?nested"):
        fastsgd.load(path)


def test_the_json_depth_bound_is_that_of_the_deepest_header_save_writes():
    header, _ = checkpoint.encode(_nested("dict", 100, {}))
    assert checkpoint._json_depth(header) == checkpoint._MAX_JSON_DEPTH
    for kind in ("list", "tuple", "dict"):
        for leaf in ({}, [], (), np.arange(2.0)):
            header, _ = checkpoint.encode(_nested(kind, 100, leaf))
            assert checkpoint._json_depth(header) <= checkpoint._MAX_JSON_DEPTH
    assert checkpoint._json_depth(b'["[{", "\\"[", {"a": []}]') == 3
    assert checkpoint._json_depth(b'{"a":"[[[[","b\\\\":[]}') == 2
    assert checkpoint._json_depth(b'[[["]]]') == 3  # a string never closed


# ------------------------------------------------------------------ sparse files

def _sparse_checkpoint(path, payload_length, trailer=None):
    """A checkpoint of one uint8 array of payload_length bytes of which only the
    preamble and header are written: the payload is a hole, made by truncate, and
    so is the trailer unless `trailer` is written there."""
    header = json.dumps({"arrays": [_spec("|u1", (payload_length,))], "root": {"array": 0}},
                        separators=(",", ":")).encode()
    size = 28 + len(header) + payload_length + 32
    with open(path, "wb") as file:
        file.write(struct.pack("<8sIQQ", b"\x89fastsgd", 1, len(header), payload_length) + header)
    os.truncate(path, size)
    if trailer is not None:
        with open(path, "r+b") as file:
            file.seek(size - 32)
            file.write(trailer)
    if os.stat(path).st_blocks * 512 > 2**20:
        pytest.skip("this file system does not make sparse files")
    return size


def test_a_sparse_file_bigger_than_memory_is_refused_before_it_is_read(tmp_path):
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if memory >= 2**39:
        pytest.skip("this machine has memory for a 1 TiB checkpoint")
    path = tmp_path / "sparse"
    _sparse_checkpoint(path, 2**40, trailer=b"\xff" * 32)
    with pytest.raises(CheckpointError, match="more than this machine's memory"):
        fastsgd.load(path)


@pytest.mark.parametrize("trailer, message", [(None, "ends in zeros"),
                                              (b"\xff" * 32, "checksum mismatch")])
def test_a_damaged_sparse_file_costs_reading_it_and_no_memory(tmp_path, trailer, message):
    path = tmp_path / "sparse"
    _sparse_checkpoint(path, 64 * 2**20, trailer)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=message):
            fastsgd.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # one hashing buffer, not the 64 MiB array


# ------------------------------------------------------------------ special files

# Loads each path in argv, printing one line per path: how it went.
LOAD_EACH = """
import sys, fastsgd
for path in sys.argv[1:]:
    try:
        fastsgd.load(path)
        print("loaded")
    except Exception as error:
        print(type(error).__name__, str(error).replace(chr(10), " "))
"""


def test_special_files_are_refused_promptly(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    (tmp_path / "directory").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "socket"))
    paths = [fifo, tmp_path / "link", tmp_path / "directory", tmp_path / "socket"]
    if os.path.exists("/dev/zero"):
        paths.append(Path("/dev/zero"))
    try:
        # in a child, as a FIFO once blocked open() for ever
        result = subprocess.run([sys.executable, "-c", LOAD_EACH, *map(str, paths)],
                                capture_output=True, text=True, timeout=60)
    finally:
        sock.close()
    lines = result.stdout.splitlines()
    kinds = ["a FIFO", "a FIFO", "a directory", "a socket", "a character device"]
    assert len(lines) == len(paths), result
    for line, path, kind in zip(lines, paths, kinds):
        assert line == (f"CheckpointError {path}: not a fastsgd checkpoint: {kind}, "
                        "not a regular file"), line


# ------------------------------------------------------------------ only what save writes

SAVED = {"x": np.arange(2, dtype=np.float32), "y": [1.5, "é"]}
SAVED_HEADER = checkpoint.encode(SAVED)[0]
SAVED_PAYLOAD = np.arange(2, dtype=np.float32).tobytes()

NOT_AS_SAVE_WRITES = {
    "duplicate dict key": ({"arrays": [_spec()], "root": {"dict": [
        ["x", {"array": 0}], ["x", 1]]}}, "a key twice"),
    "top keys in another order": ({"root": {"array": 0}, "arrays": [_spec()]},
                                  "not an object with 'arrays' and 'root'"),
    "spec keys in another order": ({"arrays": [dict(reversed(_spec().items()))],
                                    "root": {"array": 0}}, "in order"),
    "spaces": (json.dumps(json.loads(SAVED_HEADER)).encode(), "not spelled as save"),
    "a newline at the end": (SAVED_HEADER + b"\n", "not spelled as save"),
    "a number spelled otherwise": (SAVED_HEADER.replace(b"1.5", b"1.50"), "not spelled as save"),
    "a character save escapes": (SAVED_HEADER.replace(b"\\u00e9", "é".encode()),
                                 "not spelled as save"),
    "order F for a 1-d array": (_header(_spec(order="F")), "order 'F'"),
    "order F for an empty array": (_header(_spec(shape=(2, 0, 2), order="F")), "order 'F'"),
    "big-endian scalar": (_header(_spec(">f4", ()), {"scalar": 0}), "scalar of dtype >f4"),
}


@pytest.mark.parametrize("header, message", NOT_AS_SAVE_WRITES.values(),
                         ids=NOT_AS_SAVE_WRITES.keys())
def test_headers_save_does_not_write_are_refused(header, message, tmp_path):
    path = tmp_path / "forged"
    specs = (json.loads(header) if isinstance(header, bytes) else header)["arrays"]
    forge(path, header, bytes(range(sum(spec["nbytes"] for spec in specs))))
    with pytest.raises(CheckpointError, match=f"^{path}: (bad|damaged) header: .*{message}"):
        fastsgd.load(path)


def test_the_header_save_writes_loads(tmp_path):
    path = tmp_path / "forged"
    forge(path, SAVED_HEADER, SAVED_PAYLOAD)
    assert_same(fastsgd.load(path), SAVED)


@pytest.mark.parametrize("byte", [2, 0x80, 0xFF])
def test_bool_arrays_hold_0_and_1_only(byte, tmp_path):
    path = tmp_path / "forged"
    forge(path, _header(_spec("|b1", (3,))), bytes([0, 1, byte]))
    with pytest.raises(CheckpointError, match="bad payload: bool array 0 holds bytes other"):
        fastsgd.load(path)
    # and save refuses such an array (numpy makes one from raw bytes) rather than write it
    with pytest.raises(ValueError, match="bool array holding bytes other than 0 and 1"):
        fastsgd.save([np.frombuffer(bytes([1, byte]), np.bool_)], tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_an_empty_array_of_a_huge_shape_round_trips_as_numpy_makes_it(tmp_path):
    """Harmless: it holds no memory whatever its shape, and numpy's own bound on
    shapes holds (beyond it, "huge empty shape" above is refused)."""
    empty = np.empty((0, 2**62), np.bool_)
    assert_same(round_trip(empty, tmp_path), empty)


# ------------------------------------------------------------------ atomic writes

def test_save_fsyncs_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        is_directory = os.path.isdir(f"/proc/self/fd/{fd}")
        events.append(("fsync", "directory" if is_directory else os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", Path(source), Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fastsgd.save(SMALL, path)
    temporary = events[1][1]
    assert temporary.parent == tmp_path  # a rename within one file system
    assert temporary.name.startswith(".checkpoint.") and temporary.name.endswith(".tmp")
    assert events == [("fsync", path.stat().st_size), ("replace", temporary, path),
                      ("fsync", "directory")]


def test_a_failed_save_keeps_the_old_checkpoint_and_removes_its_temporary_file(
        tmp_path, monkeypatch):
    path = tmp_path / "checkpoint"
    fastsgd.save("old", path)

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        fastsgd.save("new", path)
    assert fastsgd.load(path) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


# Loads A and B, says so, then on a line from stdin saves them in turn
# for ever; a pool of these starts ahead, so the kills do not wait for imports.
WRITER = """
import sys, fastsgd
a, b = fastsgd.load(sys.argv[1]), fastsgd.load(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
while True:
    fastsgd.save(a, sys.argv[3])
    fastsgd.save(b, sys.argv[3])
"""
KILLS = 100


def _state(name, seed, megabytes=3):
    rng = np.random.default_rng(seed)
    n = megabytes * 2**20 // 8
    return {"name": name, "step": seed,
            "state": {0: {"momentum_buffer": rng.standard_normal(n // 2)},
                      1: {"momentum_buffer": rng.standard_normal(n // 4).astype(np.float32)}},
            "model": {"w": Parameter(rng.standard_normal((n // 8, 2)))},
            "param_groups": [{"lr": seed / 10, "params": [0, 1]}]}


def _ready_writers(count, args, ahead=3):
    """Yield `count` writer processes, each ready; `ahead` of them start at a
    time, so that a kill need not wait for a writer's imports."""
    started, to_start = collections.deque(), count
    try:
        for _ in range(count):
            while to_start and len(started) < ahead:
                started.append(subprocess.Popen([sys.executable, "-c", WRITER, *args],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE))
                to_start -= 1
            assert started[0].stdout.readline() == b"ready\n"
            yield started[0]
            started.popleft()
    finally:
        for writer in started:
            _kill(writer)


def _kill(writer):
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    writer.stdin.close()
    writer.stdout.close()


def test_a_writer_killed_at_random_moments_leaves_the_old_or_the_new_checkpoint(tmp_path):
    states = {"A": _state("A", 1), "B": _state("B", 2)}
    for name, state in states.items():
        fastsgd.save(state, tmp_path / name)
    directory = tmp_path / "target"
    directory.mkdir()
    path = directory / "checkpoint"
    fastsgd.save(states["A"], path)
    delays = random.Random(0)
    seen = collections.Counter()

    writers = _ready_writers(KILLS, [str(tmp_path / "A"), str(tmp_path / "B"), str(path)])
    with contextlib.closing(writers):
        for writer in writers:
            writer.stdin.write(b"go\n")
            writer.stdin.flush()
            time.sleep(delays.uniform(0.02, 0.2))
            _kill(writer)
            assert writer.returncode == -signal.SIGKILL  # it was still writing
            loaded = fastsgd.load(path)
            assert_same(loaded, states[loaded["name"]])
            seen[loaded["name"]] += 1

    # Both contents came up, and most kills hit a writer mid-write: they left
    # their temporary files, which must not disturb loads or saves.
    assert seen["A"] >= 5 and seen["B"] >= 5, seen
    leftovers = temporary_files(directory)
    assert len(leftovers) >= KILLS // 4, leftovers
    fastsgd.save(states["B"], path)
    assert_same(fastsgd.load(path), states["B"])
    assert temporary_files(directory) == leftovers
