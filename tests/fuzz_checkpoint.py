"""A coverage-guided fuzzer of fastsgd.load (atheris/libFuzzer), its inputs forged past the checksum.

    python tests/fuzz_checkpoint.py [CORPUS_DIR ...] -max_total_time=60   # or -atheris_runs=N

and any other libFuzzer flag (-timeout, -rss_limit_mb, -jobs, ...).  The corpus starts from
checkpoints written by fastsgd.save (SGD state_dicts of every parameter dtype, a scheduler's,
nested Python values, arrays of every kind), written into the first corpus directory given or
a temporary one.  The mutator rewrites a checkpoint's JSON header as a tree, its payload, or
its raw bytes (then sometimes mends the preamble's lengths), and always appends the SHA-256 of
what it made, so that the decoder is reached.

Every input is written to a file and loaded.  The only outcomes allowed are CheckpointError
and an object that fastsgd.save writes back byte for byte (load accepts only what save
writes); any other exception, an input that runs past -timeout, or memory past -rss_limit_mb
is a crash, which libFuzzer reports with the input that caused it.
"""
import copy
import hashlib
import io
import json
import os
import random
import struct
import sys
import tempfile

import atheris
import ml_dtypes
import numpy as np

with atheris.instrument_imports(include=["fastsgd.checkpoint"]):
    import fastsgd
    from fastsgd import checkpoint

PREAMBLE = struct.Struct("<8sIQQ")
DIGEST_SIZE = 32
WORK = tempfile.mkdtemp(prefix="fuzz-checkpoint-")
INPUT = os.path.join(WORK, "input")


def _trained_state(dtype, **options):
    rng = np.random.default_rng(0)
    params = [fastsgd.Parameter(rng.standard_normal(shape).astype(dtype))
              for shape in [(3,), (2, 2)]]
    optimizer = fastsgd.SGD(params, lr=0.1, **options)
    for param in params:
        param.grad = np.ones(param.shape, dtype)
    optimizer.step()
    return {"model": {f"p{i}": p for i, p in enumerate(params)},
            "optimizer": optimizer.state_dict()}


def seeds():
    """Objects as users save them, each small enough to mutate quickly."""
    objects = [_trained_state(dtype, momentum=0.9, nesterov=True, weight_decay=0.01)
               for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)]
    objects.append(_trained_state(np.float32))  # no momentum: an empty state
    objects.append(_trained_state(np.float64, momentum=0.5, dampening=0.1, maximize=True))
    weight = fastsgd.Parameter(np.asfortranarray(np.arange(6.0).reshape(2, 3)))
    optimizer = fastsgd.SGD([{"params": [("w", weight)], "lr": 0.1}], lr=0.1, momentum=0.9)
    scheduler = fastsgd.lr_scheduler.StepLR(optimizer, step_size=2)
    objects.append({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    objects.append({"epoch": 3, "values": (None, True, -7, 2**70, 0.1, -0.0, float("nan"),
                                           float("inf"), "", "ünï ☃"),
                    "nested": [[{1: [()]}, {"a": {"b": []}}]],
                    "flags": np.array([True, False]), "fortran": np.asfortranarray(
                        np.arange(6, dtype=np.int16).reshape(2, 3)),
                    "big_endian": np.arange(3, dtype=">i4"), "empty": np.empty((0, 2**20), bool),
                    "scalars": [np.float32(1.5), np.complex64(1j), np.uint8(7), np.bool_(True)],
                    "bfloat16": np.arange(3).astype(ml_dtypes.bfloat16)})
    return objects


def write_seeds(directory):
    for index, obj in enumerate(seeds()):
        fastsgd.save(obj, os.path.join(directory, f"seed-{index}"))


def saved_bytes(obj):
    """The bytes fastsgd.save writes for obj, without the file system."""
    file = io.BytesIO()
    checkpoint._write_checkpoint(file, *checkpoint.encode(obj))
    return file.getvalue()


def test_one_input(data):
    with open(INPUT, "wb") as file:
        file.write(data)
    try:
        obj = fastsgd.load(INPUT)
    except fastsgd.CheckpointError:
        return
    if saved_bytes(obj) != data:
        raise AssertionError("load accepted a file that save does not write for what it loaded")


# ------------------------------------------------------------------ the mutator

HOSTILE = [None, True, False, 0, 1, -1, 2, 2**31, 2**62, 2**63, 2**64, -(2**63), 0.5, -0.0,
           float("nan"), float("inf"), "", "C", "F", "A", "<f4", ">f8", "|b1", "|O", "<U1",
           "bfloat16", "<V2", [], [0], [2**40], [0, 2**62], {}, {"array": 0}, {"parameter": 0},
           {"scalar": 0}, {"tuple": []}, {"dict": []}, {"dict": [["a", 1], ["a", 2]]},
           {"array": 0, "tuple": []}]


def _places(node, path=()):
    """Every place in a JSON tree, as the keys that lead to it."""
    yield path
    items = node.items() if isinstance(node, dict) else (
        enumerate(node) if isinstance(node, list) else ())
    for key, child in items:
        yield from _places(child, (*path, key))


def _mutate_tree(header, rng):
    places = list(_places(header))[1:]
    if not places:
        return rng.choice(HOSTILE)
    *parents, last = rng.choice(places)
    parent = header
    for key in parents:
        parent = parent[key]
    value = parent[last]
    action = rng.randrange(7)
    if action == 0:
        parent[last] = copy.deepcopy(rng.choice(HOSTILE))
    elif action == 1 and type(value) is int:
        parent[last] = value + rng.choice([-1, 1, value, -value, 2**rng.randrange(70)])
    elif action == 2 and isinstance(parent, list):
        del parent[last]
    elif action == 3 and isinstance(parent, list):
        parent.insert(last, copy.deepcopy(value))
    elif action == 4:
        parent[last] = rng.choice([[value], {"tuple": [value]}, {"dict": [["k", value]]}])
    elif action == 5:
        deep = value
        for _ in range(rng.choice([1, 33, 99, 100, 101, 300])):
            deep = rng.choice([[deep], {"tuple": [deep]}, {"dict": [["k", deep]]}])
        parent[last] = deep
    else:
        other = rng.choice(places)
        if len(other) > len(parents) + 1 or other[:len(parents)] != tuple(parents):
            node = header
            for key in other:
                node = node[key]
            parent[last] = copy.deepcopy(node)
    return header


def _payload_for(header, payload, rng):
    """A payload as long as the header's arrays say, when they say so plausibly."""
    try:
        wanted = sum(spec["nbytes"] for spec in header["arrays"])
    except (TypeError, KeyError):
        return payload
    if type(wanted) is not int or not 0 <= wanted <= 1 << 16:
        return payload
    extra = bytes(rng.randrange(256) for _ in range(max(0, wanted - len(payload))))
    return (payload + extra)[:wanted]


def _assemble(header_bytes, payload):
    return PREAMBLE.pack(checkpoint.MAGIC, checkpoint.VERSION, len(header_bytes),
                         len(payload)) + header_bytes + payload


def _split(body):
    """(header, payload) of a body whose preamble's lengths fit it, or None."""
    if len(body) < PREAMBLE.size:
        return None
    _, _, header_length, payload_length = PREAMBLE.unpack_from(body)
    if PREAMBLE.size + header_length + payload_length != len(body):
        return None
    return body[PREAMBLE.size:PREAMBLE.size + header_length], body[PREAMBLE.size + header_length:]


def _mend_lengths(body):
    """The body with its payload length mended to fit, keeping its header length."""
    if len(body) < PREAMBLE.size:
        return body
    magic, version, header_length, _ = PREAMBLE.unpack_from(body)
    payload_length = len(body) - PREAMBLE.size - header_length
    if payload_length < 0:
        return body
    return PREAMBLE.pack(magic, version, header_length, payload_length) + body[PREAMBLE.size:]


def _mutate_header(parts, rng):
    """A body whose header is the input's, parsed, rewritten as a tree and spelled (mostly)
    as save spells it, with a payload as long as its arrays say; None if it does not parse."""
    try:
        header = json.loads(parts[0])
        for _ in range(rng.choice([1, 1, 2, 3])):
            header = _mutate_tree(header, rng)
    except (ValueError, RecursionError):  # not JSON, or a tree grown too deep to walk
        return None
    spelling = rng.choice([{"separators": (",", ":")}] * 8 + [
        {}, {"indent": 1}, {"sort_keys": True, "separators": (",", ":")},
        {"ensure_ascii": False, "separators": (",", ":")}])
    try:
        header_bytes = json.dumps(header, **spelling).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return None
    return _assemble(header_bytes, _payload_for(header, parts[1], rng))


def _mutate_payload(parts, rng):
    payload = bytearray(parts[1])
    for _ in range(rng.randrange(1, 4)):
        payload[rng.randrange(len(payload))] = rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF])
    return _assemble(parts[0], bytes(payload))


def mutate(data, max_size, seed):
    rng = random.Random(seed)
    body = data[:-DIGEST_SIZE] if len(data) > DIGEST_SIZE else data
    parts = _split(body)
    strategy = rng.random()
    mutated = None
    if parts is not None and strategy < 0.5:
        mutated = _mutate_header(parts, rng)
    elif parts is not None and strategy < 0.65 and parts[1]:
        mutated = _mutate_payload(parts, rng)
    if mutated is None or len(mutated) + DIGEST_SIZE > max_size:
        mutated = atheris.Mutate(body, max_size - DIGEST_SIZE)
        if rng.random() < 0.7:
            mutated = _mend_lengths(mutated)
    return mutated + hashlib.sha256(mutated).digest()


def main(argv):
    corpora = [arg for arg in argv[1:] if not arg.startswith("-")]
    if not corpora:
        corpus = os.path.join(WORK, "corpus")
        os.mkdir(corpus)
        argv = [*argv, corpus]
        corpora = [corpus]
    if not any(os.listdir(directory) for directory in corpora):
        write_seeds(corpora[0])
    atheris.Setup(argv, test_one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
