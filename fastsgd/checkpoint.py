"""Checkpoints that cannot be lost or abused: ``save(obj, path)`` and ``load(path)``.

Lost: ``save`` writes a temporary file next to ``path``, fsyncs it, renames
it onto ``path`` with ``os.replace`` and fsyncs the directory, so ``path``
holds the old checkpoint or the new one, never a mix, even if the writer is
killed or the machine loses power.  A killed writer can leave its temporary
file behind, named ``.NAME.XXXXXXXX.tmp`` beside ``NAME``; ``load`` never
reads it and ``save`` never reuses it, so it may be deleted whenever no
``save`` is running.  The file is created as ``tempfile.mkstemp`` creates
it: readable and writable by its owner only.  A symlink at ``path`` is
replaced by the checkpoint, not followed.

Abused: nothing is pickled.  Loading reads a JSON header and raw array
bytes; it never imports or calls anything named by the file.  ``load``
returns the object or raises ``CheckpointError`` naming the path and what
is wrong, for any file that is not a checkpoint this module wrote --
truncated, damaged, forged, or another format such as a pickle -- and for
a directory, FIFO, device or socket, refused without opening it for a
blocking read.  A missing or unreadable path raises ``OSError``, as
``open`` does.  The cost is bounded by reading the file once: the SHA-256
is checked first, through a small buffer, before anything is parsed or
allocated (a file ending in zeros where the digest belongs, as a sparse or
preallocated one does, and a file larger than the machine's memory and swap
are refused without reading it); then every header field is checked before
the arrays are allocated, which take no more than the file's size.  Only
an intact checkpoint that does not fit in the memory left raises
``MemoryError``.

The checksum finds damage, not forgery, so the header and payload are held
to exactly what ``save`` writes: a file with a matching checksum loads only
if ``save`` would write it byte for byte for what it loads (keys in order,
JSON spelled as ``save`` spells it, no key twice, nesting no deeper than a
savable object's, bool bytes 0 or 1, numpy scalars native-endian).  The
file is read twice, to check it and then to load it: one changed in place
between the two (``save`` never does that) loads what it holds then.

What can be saved: ``None``, ``bool``, ``int``, ``float`` (nan and inf
included), ``str``; ``list``, ``tuple`` (not their subclasses, such as
namedtuples, which would come back as something else) and ``dict`` (keys
``str`` or ``int``) of these, at most 100 levels deep; numpy arrays and
numpy scalars of bool (bytes 0 and 1), integer, float or complex dtype,
any shape and byte order, and of ml_dtypes' bfloat16; and
``fastsgd.Parameter``.  That covers every state_dict of ``fastsgd.SGD``.
What comes back:

- dicts come back as plain ``dict`` (a ``ParamState`` too) in their order;
- arrays come back as new, writable, aligned ndarrays with the same dtype
  (byte order included) and shape.  A Fortran-ordered array stays Fortran-
  ordered; any other non-contiguous array is saved as a C-ordered copy.
  Other ndarray subclasses (e.g. ``np.memmap``) come back as ndarrays;
  masked arrays are refused, as saving them would drop the mask;
- numpy scalars come back as numpy scalars of the same type;
- a ``Parameter`` comes back as a ``Parameter`` with its values, without
  ``.grad`` (as ``pickle`` and ``torch.save`` drop it) and without
  attributes set on it;
- an object that appears twice comes back as two independent copies.

Anything else (object arrays, string arrays, sets, bytes, ...) raises
``TypeError`` before the file is touched.

File format, version 1 (all integers little-endian)::

    offset  size  field
    0       8     magic b"\\x89fastsgd"
    8       4     format version, uint32 (1)
    12      8     header length H, uint64
    20      8     payload length P, uint64
    28      H     header: JSON as json.dumps writes it with separators
                  (",", ":"): ASCII, no spaces, keys in the order below,
                  NaN, Infinity and -Infinity for those floats
    28+H    P     payload: the raw bytes of every array, back to back
    28+H+P  32    SHA-256 of all the bytes before it

The header is ``{"arrays": [spec, ...], "root": node}``.  A spec is
``{"dtype": dtype.str (or "bfloat16"), "shape": [int, ...], "order": "C" or "F",
"offset": int, "nbytes": int}`` ("F" only for an array that is not also
C-contiguous; an empty array's shape within numpy's bound all the same):
the array's bytes sit at ``offset`` in the payload, in its memory order;
each offset is the previous spec's offset + nbytes, the first is 0, and
the last ends at P.  A node is one of

- ``null``, ``true``, ``false``, a number or a string: itself;
- ``[node, ...]``: a list;
- ``{"tuple": [node, ...]}``: a tuple;
- ``{"dict": [[key, node], ...]}``: a dict, key a string or an integer;
- ``{"array": i}``, ``{"parameter": i}``, ``{"scalar": i}``: the i-th
  array as an ndarray, a Parameter or a numpy scalar (a 0-d array).
  Arrays are numbered in the order the nodes appear, depth first.
"""
import contextlib
import hashlib
import json
import math
import os
import re
import reprlib
import stat
import struct
import sys
import tempfile

import numpy as np

from .parameter import Parameter, is_bfloat16

__all__ = ["CheckpointError", "load", "save"]  # encode, read_arrays, decode: for fastsgd.distributed

MAGIC = b"\x89fastsgd"
VERSION = 1
_PREAMBLE = struct.Struct("<8sIQQ")  # magic, version, header length, payload length
_DIGEST_SIZE = hashlib.sha256().digest_size
_MAX_DEPTH = 100
# The JSON depth of the deepest header save writes: the header object, then
# per object level a dict node's three ({"dict":[[key, node]]}), then the
# innermost node's two ({"dict":[]} or {"tuple":[]}).
_MAX_JSON_DEPTH = 1 + 3 * _MAX_DEPTH + 2
_MAX_DIMS = 64  # numpy's own limit on ndim
_SPEC_KEYS = ("dtype", "shape", "order", "offset", "nbytes")  # in the order save writes
# Only byte order + kind (bool, signed, unsigned, float, complex) + size: a
# string np.dtype() could read as objects, records or subarrays never passes.
_DTYPE_PATTERN = re.compile(r"[<>|][biufc][0-9]{1,2}\Z")
_ARRAY_TAGS = ("array", "parameter", "scalar")
_PARAMETER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))
# bfloat16's dtype.str is "<V2", which says nothing: it is spelled by name,
# and loading it needs ml_dtypes, imported then.
_BFLOAT16 = "bfloat16"
_HASH_CHUNK = 2**20  # bytes hashed at a time while checking a file's digest


def _is_parameter_dtype(dtype):
    return dtype in _PARAMETER_DTYPES or is_bfloat16(dtype)


def _dtype_text(dtype):
    return _BFLOAT16 if is_bfloat16(dtype) else dtype.str


class CheckpointError(ValueError):
    """A file that ``load`` cannot read as a checkpoint: not one, damaged or forged."""


# ------------------------------------------------------------------ save

def save(obj, path):
    """Write ``obj`` to ``path`` (str or os.PathLike) as a checkpoint, atomically.

    ``path`` keeps its old content until the new one is complete and on
    disk.  Raises ``TypeError`` (or ``ValueError`` for nesting deeper than
    100 levels, e.g. a cycle, and for a bool array holding bytes other than
    0 and 1) for what cannot be saved, before touching any file; see the
    module docstring for what can.
    """
    path = os.fsdecode(path)
    header, arrays = encode(obj)
    _write_atomically(path, lambda file: _write_checkpoint(file, header, arrays))


def encode(obj):
    """``obj`` as ``save`` writes it: ``(header, arrays)``, the JSON header
    (bytes) and the arrays it describes, in order, each C- or F-contiguous.

    With ``read_arrays`` and ``decode`` this lets fastsgd.distributed move a
    state between ranks as a header and raw array bytes, never pickled.
    """
    encoder = _Encoder()
    root = encoder.encode(obj, 0)
    return _header_bytes(encoder.specs, root), encoder.arrays


def _header_bytes(specs, root):
    return json.dumps({"arrays": specs, "root": root}, separators=(",", ":")).encode()


class _Encoder:
    """Turns an object into a JSON node, collecting its arrays in order."""

    def __init__(self):
        self.arrays = []
        self.specs = []

    def encode(self, obj, depth):
        if depth > _MAX_DEPTH:
            raise ValueError(f"cannot save objects nested deeper than {_MAX_DEPTH} "
                             "levels (is there a cycle?)")
        # Parameter and numpy scalars first: they are also ndarrays / floats.
        if isinstance(obj, Parameter):
            if not _is_parameter_dtype(obj.dtype):
                raise TypeError(f"cannot save a Parameter of dtype {obj.dtype}")
            return {"parameter": self._add_array(obj)}
        if isinstance(obj, np.ndarray):
            if isinstance(obj, np.ma.MaskedArray):
                raise TypeError("cannot save a masked array: its mask would be lost")
            return {"array": self._add_array(obj)}
        if isinstance(obj, np.generic):
            return {"scalar": self._add_array(np.asarray(obj))}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if type(obj) in (list, tuple):
            nodes = [self.encode(item, depth + 1) for item in obj]
            return nodes if type(obj) is list else {"tuple": nodes}
        if isinstance(obj, dict):
            return {"dict": [[_check_key(key), self.encode(value, depth + 1)]
                             for key, value in obj.items()]}
        raise TypeError(f"cannot save an object of type {type(obj).__name__}")

    def _add_array(self, array):
        if _parse_dtype(_dtype_text(array.dtype)) is None:
            raise TypeError(f"cannot save numpy data of dtype {array.dtype}: only bool, "
                            "integer, float and complex arrays are saved (no pickle)")
        if array.dtype == np.bool_ and _holds_other_than_0_and_1(array):
            # numpy makes such arrays (views of bytes) but compares them bytewise
            raise ValueError("cannot save a bool array holding bytes other than 0 and 1")
        fortran = array.flags.f_contiguous and not array.flags.c_contiguous
        if not (fortran or array.flags.c_contiguous):
            array = np.ascontiguousarray(array)
        offset = self.specs[-1]["offset"] + self.specs[-1]["nbytes"] if self.specs else 0
        self.specs.append(dict(zip(_SPEC_KEYS, (
            _dtype_text(array.dtype), list(array.shape), "F" if fortran else "C", offset,
            array.nbytes))))
        self.arrays.append(array.view(np.ndarray))
        return len(self.arrays) - 1


def _check_key(key):
    # bool is an int, but JSON would bring it back as a bool key: refuse it.
    if type(key) not in (str, int):
        raise TypeError(f"cannot save a dict key of type {type(key).__name__}; "
                        "keys must be str or int")
    return key


def _write_checkpoint(file, header, arrays):
    digest = hashlib.sha256()

    def put(data):
        digest.update(data)
        file.write(data)

    put(_PREAMBLE.pack(MAGIC, VERSION, len(header), sum(a.nbytes for a in arrays)))
    put(header)
    for array in arrays:
        put(_memory_bytes(array))
    file.write(digest.digest())


def _write_atomically(path, write):
    """Call ``write(file)`` on a temporary file, then move it onto ``path``.

    The fsync before the rename makes the data durable before the name
    points at it; the fsync of the directory makes the rename durable.
    """
    directory, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with open(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _memory_bytes(array):
    """A C- or F-contiguous array's memory as a 1-d uint8 view, in memory order."""
    if not array.flags.c_contiguous:
        array = array.T  # F-contiguous, so its transpose is C-contiguous
    return array.reshape(-1).view(np.uint8)


# ------------------------------------------------------------------ load

def load(path):
    """Read the object saved at ``path`` (str or os.PathLike).

    Returns the object, or raises ``CheckpointError`` (a ValueError) naming
    ``path`` for anything at ``path`` that is not an intact checkpoint: a
    damaged, truncated, forged or foreign file, and a directory, FIFO,
    device or socket, refused without blocking.  A missing or unreadable
    path raises ``OSError`` (``FileNotFoundError``, ``PermissionError``), as
    ``open`` does.  The checksum is checked before anything is decoded or
    allocated, so a file costs no more than reading it once, and a file
    bigger than the machine's memory is refused before it is read.  Only an
    intact checkpoint that does not fit in the memory left raises
    ``MemoryError``.
    """
    path = os.fsdecode(path)
    try:
        with _open_regular_file(path) as file:
            return _read_checkpoint(file)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # POSIX only, as are FIFOs
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)  # a terminal device must not become ours
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _open_regular_file(path):
    """``path`` opened for binary reading, once it is a regular file.

    The stat of the path refuses what ``open`` would block on (a FIFO with no
    writer) or fail on (a socket); O_NONBLOCK and the stat of the opened
    descriptor cover a path replaced by such a file in between.
    """
    _check_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_NOCTTY)
    try:
        _check_regular(os.fstat(fd).st_mode)
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_regular(mode):
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "a special file")
        raise CheckpointError(f"not a fastsgd checkpoint: {kind}, not a regular file")


def _read_checkpoint(file):
    file_size = os.fstat(file.fileno()).st_size
    header_length, payload_length = _read_preamble(file, file_size)
    _check_digest(file, file_size)
    file.seek(_PREAMBLE.size)
    root, arrays = read_arrays(_read_exactly(file, header_length), payload_length,
                               lambda *spec: _read_array(file, *spec))
    return decode(root, arrays)


def read_arrays(header, payload_length, read_array):
    """``(root, arrays)`` from a header made by ``encode``: each array is
    ``read_array(dtype, shape, order)`` (which returns it filled), called in
    order once every spec of the header is checked and the header found
    spelled as ``encode`` spells it; ``root`` is for ``decode``."""
    parsed = _parse_header(header)
    specs = _check_specs(parsed["arrays"], payload_length)
    if _header_bytes(parsed["arrays"], parsed["root"]) != header:
        raise CheckpointError("bad header: not spelled as save writes it (spacing, escapes "
                              "or numbers written another way)")
    arrays = [read_array(*spec) for spec in specs]
    for index, array in enumerate(arrays):
        if array.dtype == np.bool_ and _holds_other_than_0_and_1(array):
            raise CheckpointError(f"bad payload: bool array {index} holds bytes other "
                                  "than 0 and 1")
    return parsed["root"], arrays


def decode(root, arrays):
    """The object that ``root`` (from ``read_arrays``) describes, built on ``arrays``."""
    return _Decoder(arrays).decode_root(root)


def _read_exactly(file, size):
    data = file.read(size)
    # The sizes were checked against the file's: this file shrank meanwhile.
    if len(data) != size:
        raise CheckpointError("truncated while being read")
    return data


def _read_array(file, dtype, shape, order):
    array = np.empty(shape, dtype, order=order)
    view = _memory_bytes(array)
    if file.readinto(view) != view.size:
        raise CheckpointError("truncated while being read")
    return array


def _read_preamble(file, file_size):
    """(header length, payload length), once the file's size matches them
    and is one this machine could load."""
    preamble = file.read(min(file_size, _PREAMBLE.size))
    magic = preamble[:len(MAGIC)]
    if magic != MAGIC[:len(magic)]:
        raise CheckpointError(f"not a fastsgd checkpoint: it starts with {magic!r}, "
                              f"not {MAGIC!r}")
    minimum = _PREAMBLE.size + _DIGEST_SIZE
    if file_size < minimum:
        raise CheckpointError(f"truncated: {file_size} bytes, a checkpoint has at "
                              f"least {minimum}")
    _, version, header_length, payload_length = _PREAMBLE.unpack(preamble)
    if version != VERSION:
        raise CheckpointError(f"format version {version}, but this fastsgd reads "
                              f"version {VERSION} only")
    expected = minimum + header_length + payload_length
    if file_size != expected:
        what = "truncated" if file_size < expected else "trailing bytes"
        raise CheckpointError(f"{what}: {file_size} bytes, but its lengths say {expected}")
    _check_fits_in_memory(file_size)
    return header_length, payload_length


def _check_fits_in_memory(file_size):
    """Refuse, before reading it, a file that RAM and swap could not hold
    (the most Linux lets one allocation reserve by default): loading it
    would fail after the read, and a sparse file can claim any size."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # unknown here: no bound
        return
    if file_size > ram and file_size > ram + _swap_size():
        raise CheckpointError(f"{file_size} bytes, more than this machine's memory and swap "
                              "could hold once loaded")


def _swap_size():
    """Swap in bytes, from /proc/meminfo (0 where there is none)."""
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            match = re.search(rb"^SwapTotal:\s*(\d+) kB", meminfo.read(), re.MULTILINE)
    except OSError:
        return 0
    return int(match[1]) * 1024 if match else 0


def _check_digest(file, file_size):
    """Hash the file through one small buffer and compare its trailer, before
    anything of it is kept: a damaged file, a sparse one included, costs
    reading it once and no memory."""
    file.seek(file_size - _DIGEST_SIZE)
    trailer = _read_exactly(file, _DIGEST_SIZE)
    # Never a real digest, but what a file preallocated, extended by truncate
    # or zeroed at its end holds: refused without reading the rest.
    if trailer == bytes(_DIGEST_SIZE):
        raise CheckpointError("checksum mismatch: the file ends in zeros, not a SHA-256")
    file.seek(0)
    digest = hashlib.sha256()
    remaining = file_size - _DIGEST_SIZE
    buffer = memoryview(bytearray(min(remaining, _HASH_CHUNK)))
    while remaining:
        got = file.readinto(buffer[:min(remaining, len(buffer))])
        if not got:
            raise CheckpointError("truncated while being read")
        digest.update(buffer[:got])
        remaining -= got
    if digest.digest() != trailer:
        raise CheckpointError("checksum mismatch: the file is damaged")


def _parse_header(data):
    """The header as a dict, once it is JSON no deeper than a saved object's."""
    depth = _json_depth(data)
    if depth > _MAX_JSON_DEPTH:
        raise CheckpointError(f"bad header: JSON nested {depth} deep; a checkpoint's "
                              f"header is at most {_MAX_JSON_DEPTH}")
    try:
        header = json.loads(data.decode(), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"damaged header: {error}") from None
    if not isinstance(header, dict) or list(header) != ["arrays", "root"]:
        raise CheckpointError("damaged header: not an object with 'arrays' and 'root'")
    return header


def _json_depth(data):
    """How deeply the JSON text ``data`` nests, found without parsing it:
    escapes, then strings, then all but brackets are dropped (each step
    linear), and the brackets left are counted."""
    unescaped = re.sub(rb"\\.", b"", data, flags=re.DOTALL)
    # a quote left over opens a string never closed: not JSON, which json.loads says
    brackets = np.frombuffer(re.sub(rb'"[^"]*"|[^\[\]{}"]+', b"", unescaped).replace(b'"', b""),
                             np.uint8)
    if not brackets.size:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _unique_keys(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key appears twice in an object")
    return result


def _check_specs(specs, payload_length):
    """Each array's (dtype, shape, order), once every field of every spec is valid."""
    if not isinstance(specs, list):
        raise CheckpointError("bad header: 'arrays' is not a list")
    checked, offset = [], 0
    for index, spec in enumerate(specs):
        try:
            checked.append(_check_spec(spec, offset))
        except CheckpointError as error:
            raise CheckpointError(f"bad header: array {index}: {error}") from None
        offset += spec["nbytes"]
    if offset != payload_length:
        raise CheckpointError(f"bad header: the arrays take {offset} bytes, but the "
                              f"payload is {payload_length}")
    return checked


def _check_spec(spec, offset):
    if not isinstance(spec, dict) or list(spec) != list(_SPEC_KEYS):
        raise CheckpointError(f"not an object with the keys {list(_SPEC_KEYS)}, in order")
    dtype = _parse_dtype(spec["dtype"])
    if dtype is None:
        raise CheckpointError(f"bad dtype {_clip(spec['dtype'])}")
    shape = spec["shape"]
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
            and all(_is_size(n) for n in shape)):
        raise CheckpointError(f"bad shape {_clip(shape)}")
    if spec["order"] not in ("C", "F"):
        raise CheckpointError(f"bad order {_clip(spec['order'])}")
    # save writes "F" only for an array that is not also C-contiguous: one
    # with elements and two dimensions longer than 1.
    if spec["order"] == "F" and (0 in shape or sum(n > 1 for n in shape) < 2):
        raise CheckpointError(f"order 'F' for shape {shape}, which save writes as 'C'")
    if spec["offset"] != offset or not _is_size(spec["offset"]):
        raise CheckpointError(f"offset {_clip(spec['offset'])}, but it must be {offset}")
    # Exact Python ints: a huge shape cannot overflow into a small nbytes, and
    # the nbytes of all arrays must add up to the payload, which fits the file.
    nbytes = math.prod(shape) * dtype.itemsize
    if spec["nbytes"] != nbytes or not _is_size(spec["nbytes"]):
        raise CheckpointError(f"nbytes {_clip(spec['nbytes'])}, but shape and dtype make "
                              f"{nbytes}")
    # numpy's own limit, which only an empty array can reach here
    if math.prod(n for n in shape if n) * dtype.itemsize > sys.maxsize:
        raise CheckpointError(f"shape {shape!r} is too big for numpy")
    return dtype, tuple(shape), spec["order"]


def _is_size(value):
    return type(value) is int and value >= 0


def _holds_other_than_0_and_1(bool_array):
    return bool_array.size and bool_array.view(np.uint8).max() > 1


def _parse_dtype(text):
    """The numeric or bool dtype spelled ``text`` as ``dtype.str`` spells it
    (bfloat16: by name), or None."""
    if text == _BFLOAT16:
        try:
            import ml_dtypes
        except ImportError:
            raise CheckpointError("the checkpoint holds bfloat16 arrays, which need "
                                  "ml_dtypes: pip install ml_dtypes") from None
        return np.dtype(ml_dtypes.bfloat16)
    if not (isinstance(text, str) and _DTYPE_PATTERN.match(text)):
        return None
    try:
        dtype = np.dtype(text)
    except TypeError:  # e.g. "<i3"
        return None
    return dtype if dtype.str == text else None


class _Decoder:
    """Turns a JSON node back into an object, taking the arrays in order."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.used = 0

    def decode_root(self, root):
        obj = self.decode(root, 0)
        if self.used != len(self.arrays):
            raise CheckpointError(f"bad header: {len(self.arrays)} arrays, but the "
                                  f"nodes use {self.used}")
        return obj

    def decode(self, node, depth):
        if depth > _MAX_DEPTH:
            raise CheckpointError(f"bad header: nested deeper than {_MAX_DEPTH} levels")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(item, depth + 1) for item in node]
        if not (isinstance(node, dict) and len(node) == 1):
            raise CheckpointError(f"bad header: {_clip(node)} is not a node")
        (tag, value), = node.items()
        if tag == "tuple" and isinstance(value, list):
            return tuple(self.decode(item, depth + 1) for item in value)
        if tag == "dict" and isinstance(value, list):
            items = [self._decode_item(item, depth + 1) for item in value]
            result = dict(items)
            if len(result) != len(items):
                raise CheckpointError("bad header: a dict with a key twice")
            return result
        if tag in _ARRAY_TAGS:
            return self._take_array(tag, value)
        raise CheckpointError(f"bad header: {_clip(node)} is not a node")

    def _decode_item(self, item, depth):
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) in (str, int)):
            raise CheckpointError(f"bad header: {_clip(item)} is not a [key, node] pair")
        return item[0], self.decode(item[1], depth)

    def _take_array(self, tag, index):
        if index != self.used or type(index) is not int or index >= len(self.arrays):
            raise CheckpointError(f"bad header: {tag} {_clip(index)} where array "
                                  f"{self.used} of {len(self.arrays)} comes next")
        array = self.arrays[index]
        self.used += 1
        if tag == "parameter":
            if not _is_parameter_dtype(array.dtype):
                raise CheckpointError(f"bad header: a Parameter of dtype {array.dtype}")
            return Parameter(array)
        if tag == "scalar":
            if array.ndim:
                raise CheckpointError(f"bad header: a scalar of shape {array.shape}")
            # numpy scalars are native-endian: save never writes another order
            if not array.dtype.isnative:
                raise CheckpointError(f"bad header: a scalar of dtype {array.dtype.str}")
            return array[()]
        return array


# Error messages show a header's values through this: a bounded repr, never
# the whole (possibly deep) subtree.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 2
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 40


def _clip(node):
    text = _SHORT_REPR.repr(node)
    return text if len(text) <= 60 else text[:57] + "..."
