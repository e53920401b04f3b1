"""fastsgd.distributed: data-parallel training over MPI (mpi4py), bit-identical to one process.

Every rank computes grads on its own slice of the batch; ``step()`` averages
them across ranks and every rank takes the same step.  The average is

    ``(((g_0 + g_1) + g_2) + ... + g_{N-1}) / N``

in the grad's dtype (``fastsgd.reference.rank_ordered_mean``), so parameters
and optimizer state after any number of steps equal, bit for bit, one process
running the wrapped optimizer on those averaged grads: for every number of
ranks, every bucket size and every MPI library.

How (the "ordered" reduction): each dtype's grads live in one flat buffer.
Each rank owns a region of it (an even split, or for ZeRO the parameters it
owns), and the buffer is averaged in buckets of ``bucket_cap_mb``: a bucket is
one piece of every region.  Per bucket, an Alltoallv brings a rank the piece
of its region from every other rank, the rank sums the N pieces in rank order
and divides (numpy ufuncs with ``out=``: one IEEE rounding per element per
operation), and an Allgatherv returns every averaged piece to every rank
(ZeRO skips it: a rank only needs the grads it steps).  The collectives are
MPI-4 persistent requests made once, the next bucket's exchange runs while a
bucket is summed, and a steady-state step allocates nothing.  A grad that is
its parameter's bucket view is copied zero times; any other grad once.

Launch with ``mpiexec -n N python -m mpi4py train.py``: under ``-m mpi4py`` an
exception that escapes on one rank aborts the whole job instead of leaving
the others waiting.  Inputs that differ between ranks raise on every rank:
parameters and options at construction, grads present and hyperparameters at
every step (one small Allgather of a digest), a grad that is wrong on one
rank, a step that raised on one rank only.

This module is the only one in fastsgd that imports mpi4py.
"""
import numbers
import struct
import weakref
from typing import Optional

import numpy as np
from mpi4py import MPI

from . import _native, checkpoint, clip_grad
from .optimizer import Optimizer
from .sgd import SGD

__all__ = [
    "DistributedOptimizer",
    "ZeroRedundancyOptimizer",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "clip_grad_norm_",
    "load",
    "save",
]

_MPI_TYPES = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}
# A bucket's counts and displacements are C ints in MPI's non-"_c" calls.
_MAX_ELEMENTS = 2**31 - 1
_REDUCTIONS = ("ordered", "mpi")
_EXCEPTIONS = {cls.__name__: cls for cls in (ValueError, TypeError, RuntimeError, KeyError,
                                              IndexError, OSError, checkpoint.CheckpointError)}


# ------------------------------------------------------------ agreement

def _communicator(comm):
    """``comm``, or MPI.COMM_WORLD for None."""
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an mpi4py MPI.Intracomm (or None for "
                        f"MPI.COMM_WORLD), not {type(comm).__name__}")
    return comm


def _agree_on_root(comm, root, name="root", problem=None):
    """``root`` as an int, once every rank has checked it and got the same
    (else every rank raises ValueError), and no rank has a ``problem``."""
    if problem is None and (not isinstance(root, numbers.Integral) or isinstance(root, bool)
                            or not 0 <= int(root) < comm.size):
        problem = ValueError(f"{name} must be a rank from 0 to {comm.size - 1}, not {root!r}")
    _check_same(comm, {"settings": {name: root}, "groups": [], "params": []}, problem)
    return int(root)


def _agree(comm, error):
    """Raise on every rank if ``error`` (an exception or None) is set on any.

    A rank that failed raises its own exception; the others raise one of the
    same type naming the first rank that failed, so no rank goes on alone
    into a collective the failed one will never enter.
    """
    errors = comm.allgather(None if error is None else (type(error).__name__, _message(error)))
    if error is not None:
        raise error
    for rank, reported in enumerate(errors):
        if reported is not None:
            name, message = reported
            raise _EXCEPTIONS.get(name, RuntimeError)(f"rank {rank}: {message}")


def _message(error):
    """An exception's message (a KeyError's str() is the repr of its key)."""
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])
    return str(error)


def _collectively(comm, action):
    """``action()`` on every rank; if it raises on any, every rank raises."""
    try:
        result, error = action(), None
    except Exception as raised:  # noqa: BLE001 -- every rank must hear of any error
        result, error = None, raised
    _agree(comm, error)
    return result


def _check_same(comm, description, local_error=None):
    """Raise ValueError on every rank unless every rank's ``description``
    equals rank 0's (see ``_describe``), naming the first difference."""
    _agree(comm, local_error)
    descriptions = comm.allgather(description)
    for rank, other in enumerate(descriptions[1:], 1):
        difference = _difference(descriptions[0], other, rank)
        if difference is not None:
            raise ValueError(difference)


def _difference(ours, theirs, rank):
    """The first way rank ``rank``'s description differs from rank 0's, or None."""
    def differ(what, a, b, verb="is"):
        return f"{what} {verb} {a} on rank 0 but {b} on rank {rank}"

    for key in ours["settings"]:
        a, b = ours["settings"][key], theirs["settings"][key]
        if a != b:
            return differ(key, repr(a[1]), repr(b[1]))
    if len(ours["groups"]) != len(theirs["groups"]):
        return differ("the number of parameter groups", len(ours["groups"]),
                      len(theirs["groups"]))
    for index, (a, b) in enumerate(zip(ours["groups"], theirs["groups"])):
        if a["size"] != b["size"]:
            return differ(f"param_groups[{index}]", f"{a['size']} parameters", b["size"], "has")
    for index, (a, b) in enumerate(zip(ours["params"], theirs["params"])):
        if a != b:
            return differ(f"params[{index}]", a, b)
    for index, (a, b) in enumerate(zip(ours["groups"], theirs["groups"])):
        for key in sorted(set(a["options"]) | set(b["options"])):
            missing = (None, "missing")
            ka, kb = a["options"].get(key, missing), b["options"].get(key, missing)
            if ka[0] != kb[0]:
                return differ(f"param_groups[{index}]['{key}']", ka[1], kb[1])
    return None


def _describe(param_groups, settings):
    """What every rank must hold alike: ``settings`` (name -> value), each
    group's size and options, each parameter's dtype, shape and memory order."""
    return {
        "settings": {key: (_comparable(value), value) for key, value in settings.items()},
        "groups": [{"size": len(group["params"]),
                    "options": {key: (_comparable(value), repr(value))
                                for key, value in group.items() if key != "params"}}
                   for group in param_groups],
        "params": [_array_text(p) for group in param_groups for p in group["params"]],
    }


def _comparable(value):
    """A key equal for equal option values: numbers by their float64 bits
    (so nan equals nan), arrays by their bytes, anything else by repr."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (numbers.Real, np.number)):
        return ("number", struct.pack("<d", float(value)))
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    return ("repr", repr(value))


def _array_text(array):
    """e.g. ``float32 (256, 1152)``, with its memory order unless C."""
    text = f"{array.dtype} {array.shape}"
    if array.flags.c_contiguous:
        return text
    return text + (" in Fortran order" if array.flags.f_contiguous else " (not contiguous)")


# ------------------------------------------------------------ raw trees

def _bcast_tree(comm, root, produce):
    """The object ``produce()`` returns on ``root``, on every rank.

    It travels as checkpoint.encode's JSON header and raw array bytes (no
    pickle).  If anything fails on any rank, every rank raises.
    """
    sizes = np.zeros(3, np.int64)  # failed, header bytes, payload bytes
    if comm.rank == root:
        try:
            obj = produce()
            header, arrays = checkpoint.encode(obj)
            sizes[:] = 0, len(header), sum(a.nbytes for a in arrays)
        except Exception as error:  # noqa: BLE001 -- every rank must hear of any error
            header = f"{type(error).__name__}\0{_message(error)}".encode()
            sizes[:] = 1, len(header), 0
            failure = error
    comm.Bcast([sizes, MPI.INT64_T], root)
    failed, header_size, payload_size = (int(n) for n in sizes)
    text = np.frombuffer(header, np.uint8) if comm.rank == root else \
        np.empty(header_size, np.uint8)
    comm.Bcast([text, MPI.BYTE], root)
    if failed:
        if comm.rank == root:
            raise failure
        name, message = bytes(text).decode().split("\0", 1)
        raise _EXCEPTIONS.get(name, RuntimeError)(f"rank {root}: {message}")
    if comm.rank != root:
        node, arrays = _collectively(comm, lambda: checkpoint.read_arrays(
            bytes(text), payload_size, _empty))
    else:
        _collectively(comm, lambda: None)
    for array in arrays:
        comm.Bcast([checkpoint._memory_bytes(array), MPI.BYTE], root)
    return _collectively(comm, lambda: obj if comm.rank == root else checkpoint.decode(
        node, arrays))


def _gather_trees(comm, obj, to):
    """Every rank's ``obj`` on rank ``to`` (a list in rank order; None
    elsewhere), moved as JSON headers and raw array bytes (no pickle)."""
    header, arrays = _collectively(comm, lambda: checkpoint.encode(obj))
    mine = np.array([len(header), sum(a.nbytes for a in arrays)], np.int64)
    text = np.frombuffer(header, np.uint8)
    if comm.rank != to:
        comm.Gather([mine, MPI.INT64_T], None, root=to)
        comm.Gatherv([text, MPI.BYTE], None, root=to)
        _collectively(comm, lambda: None)  # rank `to` read every header
        for array in arrays:
            comm.Send([checkpoint._memory_bytes(array), MPI.BYTE], dest=to)
        _collectively(comm, lambda: None)
        return None
    sizes = np.empty((comm.size, 2), np.int64)
    comm.Gather([mine, MPI.INT64_T], [sizes, MPI.INT64_T], root=to)
    counts = [int(n) for n in sizes[:, 0]]
    starts = np.cumsum([0] + counts[:-1]).tolist()
    texts = np.empty(sum(counts), np.uint8)
    comm.Gatherv([text, MPI.BYTE], [texts, (counts, starts), MPI.BYTE], root=to)
    others = [r for r in range(comm.size) if r != to]
    parsed = _collectively(comm, lambda: {r: checkpoint.read_arrays(
        bytes(texts[starts[r]:starts[r] + counts[r]]), int(sizes[r, 1]), _empty) for r in others})
    for rank in others:
        for array in parsed[rank][1]:
            comm.Recv([checkpoint._memory_bytes(array), MPI.BYTE], source=rank)
    return _collectively(comm, lambda: [obj if r == to else checkpoint.decode(*parsed[r])
                                        for r in range(comm.size)])


def _empty(dtype, shape, order):
    return np.empty(shape, dtype, order=order)


# ------------------------------------------------------------ public helpers

def broadcast_parameters(params, root=0, comm=None):
    """Give every rank ``root``'s values of ``params``, in place.

    Call it on every rank before training (or after loading a checkpoint on
    one rank) so that every replica starts from the same values.

    Parameters
    ----------
    params : iterable or dict
        numpy arrays (e.g. :class:`fastsgd.Parameter`), ``(name, array)``
        pairs, or a dict whose values are arrays.  Every rank must pass the
        same number of arrays with the same dtypes, shapes and memory orders.
    root : int, optional
        The rank whose values every rank takes (default 0).
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that take part (default ``MPI.COMM_WORLD``).

    Raises
    ------
    ValueError
        On every rank, if the arrays differ between ranks, e.g.
        ``params[5] is float32 (256, 1152) on rank 0 but float32 (1152, 256)
        on rank 3``; nothing is written then.
    TypeError
        On every rank, if an item on any rank is not a numpy array.

    Examples
    --------
    On every rank of ``mpiexec -n 2 python -m mpi4py train.py``::

        w = fastsgd.Parameter(np.full(3, float(MPI.COMM_WORLD.rank)))
        fastsgd.distributed.broadcast_parameters([w])
        assert (w == 0).all()
    """
    comm = _communicator(comm)
    if isinstance(params, dict):
        params = params.values()
    arrays = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
    error: Optional[Exception] = None
    for index, array in enumerate(arrays):
        if not isinstance(array, np.ndarray):
            error = TypeError(f"params[{index}] is a {type(array).__name__}, not a numpy array")
            break
        if not array.flags.writeable:
            error = ValueError(f"params[{index}] is read-only")
            break
    _check_same(comm, None if error else {"settings": {"root": root}, "groups": [],
                                          "params": [_array_text(a) for a in arrays]}, error)
    root = _agree_on_root(comm, root)
    for array in arrays:
        if array.flags.c_contiguous or array.flags.f_contiguous:
            comm.Bcast([checkpoint._memory_bytes(array), MPI.BYTE], root)
        else:
            contiguous = np.ascontiguousarray(array)
            comm.Bcast([checkpoint._memory_bytes(contiguous), MPI.BYTE], root)
            array[...] = contiguous


def broadcast_optimizer_state(optimizer, root=0, comm=None):
    """Give every rank ``root``'s optimizer state and hyperparameters.

    ``root``'s ``optimizer.state_dict()`` travels as raw arrays behind a JSON
    header (never pickled) and every other rank loads it with
    ``optimizer.load_state_dict``.

    Parameters
    ----------
    optimizer : fastsgd.Optimizer
        A fastsgd optimizer or a :class:`DistributedOptimizer`, over the same
        parameters on every rank.  A :class:`ZeroRedundancyOptimizer` holds
        different state on each rank: use its ``consolidate_state_dict`` and
        ``load_state_dict`` instead.
    root : int, optional
        The rank whose state every rank takes (default 0).
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that take part (default ``MPI.COMM_WORLD``).

    Raises
    ------
    TypeError
        For a ZeroRedundancyOptimizer or anything not a fastsgd.Optimizer.
    ValueError
        On every rank, if the state does not fit a rank's optimizer (as
        ``load_state_dict`` raises it there).
    """
    comm = _communicator(comm)
    problem = None
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        problem = TypeError("a ZeroRedundancyOptimizer holds different state on each rank: use "
                            "consolidate_state_dict() and load_state_dict() to move its state")
    elif not isinstance(optimizer, Optimizer):
        problem = TypeError(f"{type(optimizer).__name__} is not a fastsgd.Optimizer")
    root = _agree_on_root(comm, root, problem=problem)
    state_dict = _bcast_tree(comm, root, optimizer.state_dict)
    _collectively(comm, lambda: optimizer.load_state_dict(state_dict) if comm.rank != root else None)


def save(obj, path, root=0, comm=None):
    """Write ``obj`` to ``path`` with :func:`fastsgd.save` on ``root``; every rank returns once it is written.

    Call it on every rank.  The write is atomic (a reader sees the old file
    or the new one, never a mix); the other ranks wait for it, and if it
    fails every rank raises.

    Parameters
    ----------
    obj : object
        What to save (see :func:`fastsgd.save`); only ``root``'s is used, so
        other ranks may pass None.  For a :class:`ZeroRedundancyOptimizer`,
        ``optimizer.consolidate_state_dict(to=root)`` first, then pass
        ``optimizer.state_dict()`` on ``root``.
    path : str or os.PathLike
        Where ``root`` writes it.
    root : int, optional
        The rank that writes (default 0).
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that take part (default ``MPI.COMM_WORLD``).

    Raises
    ------
    TypeError, ValueError, OSError
        On every rank, as :func:`fastsgd.save` raised on ``root``.
    """
    comm = _communicator(comm)
    root = _agree_on_root(comm, root)
    _collectively(comm, lambda: checkpoint.save(obj, path) if comm.rank == root else None)


def load(path, root=None, comm=None):
    """Read a checkpoint written by :func:`save` on every rank.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint.
    root : int, optional
        None (default): every rank reads ``path`` (a file system every rank
        sees).  A rank: only that rank reads it and sends it to the others as
        raw arrays (a disk only that rank sees).
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that take part (default ``MPI.COMM_WORLD``).

    Returns
    -------
    object
        What was saved, as :func:`fastsgd.load` returns it.

    Raises
    ------
    fastsgd.CheckpointError, OSError
        On every rank, if a rank cannot read the file.
    """
    comm = _communicator(comm)
    if root is None:
        _check_same(comm, {"settings": {"root": None}, "groups": [], "params": []})
        return _collectively(comm, lambda: checkpoint.load(path))
    root = _agree_on_root(comm, root)
    return _bcast_tree(comm, root, lambda: checkpoint.load(path))


def clip_grad_norm_(optimizer, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """Average the grads (if ``step`` or ``synchronize`` has not yet), then clip them as one process would.

    Returns the total norm that :func:`fastsgd.clip_grad_norm_` computes in
    one process over the optimizer's parameters (in ``param_groups`` order,
    each once) holding the averaged grads, and scales the grads the rank
    steps by the same coefficient.  Call it on every rank between the
    backward pass and ``step()``.

    Parameters
    ----------
    optimizer : DistributedOptimizer or ZeroRedundancyOptimizer
        For a DistributedOptimizer every rank holds every averaged grad and
        this is :func:`fastsgd.clip_grad_norm_` on them.  A
        ZeroRedundancyOptimizer averages each grad on the rank that owns it
        only: each rank computes the norms of its grads, the norms are
        gathered and every rank computes the same total.
    max_norm : float
        Largest total norm allowed.
    norm_type : float, optional
        The p of the p-norm (default 2.0); ``inf`` for the max norm.
    error_if_nonfinite : bool, optional
        Raise RuntimeError (on every rank) if the total is nan or inf.
    foreach : None
        Accepted for torch compatibility.

    Returns
    -------
    numpy.float32 or numpy.float64
        The total norm of the averaged grads before clipping.
    """
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer._clip_grad_norm(max_norm, float(norm_type), error_if_nonfinite)
    if not isinstance(optimizer, DistributedOptimizer):
        raise TypeError(f"clip_grad_norm_ needs a DistributedOptimizer or a "
                        f"ZeroRedundancyOptimizer, not {type(optimizer).__name__}")
    optimizer.synchronize()
    return clip_grad.clip_grad_norm_(optimizer._plan.unique, max_norm, norm_type,
                                     error_if_nonfinite)


# ------------------------------------------------------------ the buckets

def _view(flat, offset, param):
    """The piece of ``flat`` at ``offset`` shaped and ordered like ``param``."""
    piece = flat[offset:offset + param.size]
    if param.flags.c_contiguous or not param.flags.f_contiguous:
        return piece.reshape(param.shape)
    return piece.reshape(param.shape[::-1]).T


def _mpi_type(dtype, reduction):
    """The MPI datatype a bucket of ``dtype`` travels as.  MPI has no 16-bit
    floats: float16 and bfloat16 grads travel as their bits and are summed
    here (the ordered reduction), never by MPI."""
    if dtype.itemsize == 2:
        if reduction == "mpi":
            raise ValueError(f"reduction='mpi' cannot average {dtype} grads (MPI has no "
                             f"16-bit float sum); use reduction='ordered'")
        return MPI.UINT16_T
    return _MPI_TYPES[dtype]


class _FlatGrads:
    """One dtype's grads in one flat buffer, averaged across ranks bucket by bucket.

    ``regions[r]`` (start, size) is the part of the buffer rank r averages.
    Bucket b is piece b of every region (``piece`` elements at most), so
    every rank receives the same amount in every bucket.  ``schedule`` holds,
    per bucket, the persistent requests and the numpy operations that
    average it; ``average()`` runs them with the exchange of bucket b + 2
    started as soon as bucket b's scratch space is free.
    """

    def __init__(self, comm, dtype, params, owners, cap_bytes, reduction):
        self.params = params
        n = comm.size
        sizes = [p.size for p in params]
        offsets = np.cumsum([0] + sizes[:-1]).tolist()
        total = sum(sizes)
        if total > _MAX_ELEMENTS:
            raise ValueError(f"the {dtype} parameters have {total} elements; "
                             f"fastsgd.distributed averages at most {_MAX_ELEMENTS} per dtype")
        self.flat = np.zeros(total, dtype)
        self.views = {id(p): _view(self.flat, offset, p) for p, offset in zip(params, offsets)}
        self.requests, self.schedule, self.first, self.gathers = [], [], [], []
        self.datatypes = []
        self.param_gather = None
        if owners is None:
            region_sizes = [total // n + (r < total % n) for r in range(n)]
        else:
            region_sizes = [sum(s for p, s in zip(params, sizes) if owners[id(p)] == r)
                            for r in range(n)]
        self.regions = list(zip(np.cumsum([0] + region_sizes[:-1]).tolist(), region_sizes))
        self.buckets = 0
        if n == 1:  # the average of one grad is that grad: nothing to do
            return
        mpi_type = _mpi_type(np.dtype(dtype), reduction)
        cap = max(1, cap_bytes // np.dtype(dtype).itemsize)
        # 0-d: a numpy scalar operand allocates.  16-bit grads divide in
        # float32 and round once to their dtype, as torch's do.
        self.divisor = np.array(n, np.float32 if np.dtype(dtype).itemsize == 2 else dtype)
        if reduction == "mpi":
            self._plan_allreduce(comm, mpi_type, cap)
        else:
            self._plan_ordered(comm, mpi_type, cap, gather=owners is None)
        if owners is not None:
            self._plan_param_gather(comm, mpi_type, owners)

    def _plan_allreduce(self, comm, mpi_type, cap):
        for start in range(0, self.flat.size, cap):
            bucket = self.flat[start:start + cap]
            request = comm.Allreduce_init(MPI.IN_PLACE, [bucket, mpi_type], MPI.SUM)
            self.requests.append(request)
            self.first.append(request)
            self.schedule.append((request, [(np.true_divide, bucket, self.divisor, bucket)],
                                  None, None))
        self.buckets = len(self.schedule)

    def _plan_ordered(self, comm, mpi_type, cap, gather):
        n, me = comm.size, comm.rank
        largest = max(size for _, size in self.regions)
        buckets = max(1, -(-self.flat.size // cap))
        piece = max(1, -(-largest // buckets))
        buckets = max(1, -(-largest // piece))
        rows = [r if r < me else r - 1 for r in range(n)]  # scratch row of each other rank
        scratch = [np.empty((n - 1, piece), self.flat.dtype) for _ in range(min(2, buckets))]
        exchanges = []
        for b in range(buckets):
            counts = [min(piece, max(0, size - b * piece)) for _, size in self.regions]
            displacements = [start + min(b * piece, size) for start, size in self.regions]
            mine = counts[me]
            space = scratch[b % 2]
            send = [c if r != me else 0 for r, c in enumerate(counts)]
            receive = [mine if r != me else 0 for r in range(n)]
            exchange = comm.Alltoallv_init(
                [self.flat, (send, displacements), mpi_type],
                [space, (receive, [rows[r] * piece if r != me else 0 for r in range(n)]),
                 mpi_type])
            gather_request = None
            if gather:
                gather_request = comm.Allgatherv_init(
                    MPI.IN_PLACE, [self.flat, (counts, displacements), mpi_type])
                self.gathers.append(gather_request)
            target = self.flat[displacements[me]:displacements[me] + mine]
            sources = [target if r == me else space[rows[r], :mine] for r in range(n)]
            self.requests += [exchange] + ([gather_request] if gather_request else [])
            exchanges.append(exchange)
            self.schedule.append([exchange, self._sum_in_rank_order(sources, target, me),
                                  gather_request, None])
        for b in range(buckets - 2):
            self.schedule[b][3] = exchanges[b + 2]
        self.schedule = [tuple(entry) for entry in self.schedule]
        self.first = exchanges[:2]
        self.buckets = buckets

    def _sum_in_rank_order(self, sources, target, me):
        """The ufunc calls computing ``(((s_0 + s_1) + s_2) + ...) / n`` into
        ``target`` (which holds s_me), each rounded in the dtype."""
        if target.size == 0:
            return []
        # Accumulate in target only if s_me is added first (me 0 or 1); else in
        # rank 0's scratch row, so that s_me is still there when its turn comes.
        accumulator = target if me <= 1 else sources[0]
        ops = [(np.add, sources[0], sources[1], accumulator)]
        ops += [(np.add, accumulator, source, accumulator) for source in sources[2:]]
        return ops + [(np.true_divide, accumulator, self.divisor, target)]

    def _plan_param_gather(self, comm, mpi_type, owners):
        """One persistent Alltoallw that sends each rank the parameters this
        rank owns and receives theirs, straight from and into the arrays
        (derived datatypes at their absolute addresses: no staging copy)."""
        n, me = comm.size, comm.rank
        types: list = []
        for rank in range(n):
            owned = [p for p in self.params if owners[id(p)] == rank and p.size]
            if not owned:
                types.append(None)
                continue
            datatype = mpi_type.Create_hindexed(
                [p.size for p in owned], [MPI.Get_address(p) for p in owned]).Commit()
            self.datatypes.append(datatype)
            types.append(datatype)
        mine = types[me]
        send_counts = [int(mine is not None and r != me) for r in range(n)]
        receive_counts = [int(t is not None and r != me) for r, t in enumerate(types)]
        zeros = [0] * n
        self.param_gather = comm.Alltoallw_init(
            [MPI.BOTTOM, send_counts, zeros, [mine or mpi_type] * n],
            [MPI.BOTTOM, receive_counts, zeros, [t or mpi_type for t in types]])
        self.requests.append(self.param_gather)

    def average(self):
        """Average the buffer across ranks (the whole buffer, or for ZeRO each
        rank's own region)."""
        for request in self.first:
            request.Start()
        for exchange, ops, gather, next_exchange in self.schedule:
            exchange.Wait()
            for ufunc, a, b, out in ops:
                ufunc(a, b, out)
            if gather is not None:
                gather.Start()
            if next_exchange is not None:
                next_exchange.Start()
        for gather in self.gathers:
            gather.Wait()

    def free(self):
        for request in self.requests:
            if request != MPI.REQUEST_NULL:
                request.Free()
        for datatype in self.datatypes:
            datatype.Free()
        self.requests, self.datatypes = [], []


class _Plan:
    """Everything a step reuses, made collectively when the optimizer is made
    (and again when its parameters change): the grads' buckets and views,
    the per-step digest, and their persistent requests."""

    def __init__(self, comm, param_groups, owners, cap_bytes, reduction, check_keys):
        self.groups = [tuple(group["params"]) for group in param_groups]
        positions = [p for group in self.groups for p in group]
        self.unique = list({id(p): p for p in positions}.values())
        self.flats = []
        views = {}
        # The same order on every rank: float16 and bfloat16 have one size, and
        # a set's order follows hashes that differ between processes.
        for dtype in sorted({p.dtype for p in self.unique}, key=lambda d: (d.itemsize, d.name)):
            params = [p for p in self.unique if p.dtype == dtype]
            if owners is not None:
                params.sort(key=lambda p: owners[id(p)])  # stable: global order per owner
            flat = _FlatGrads(comm, dtype, params, owners, cap_bytes, reduction)
            self.flats.append(flat)
            views.update(flat.views)
        self.views = [tuple(views[id(p)] for p in group) for group in self.groups]
        self.present = [[False] * len(group) for group in self.groups]
        self.all_views = False  # was every grad its view at the last synchronize()?
        # The digest, one byte each: [param_groups changed, then per position
        # 0 (no grad), 1 (a grad) or 2 (a grad that cannot be averaged)];
        # then, aligned, the float64 value of each checked option of each group.
        self.check_keys = check_keys
        options_at = -(-(1 + len(positions)) // 8) * 8
        self.digest = np.zeros(options_at + 8 * len(param_groups) * len(check_keys), np.uint8)
        self.mine = self.digest.data
        self.statuses = self.digest[1:1 + len(positions)]
        self.options = self.digest[options_at:].data.cast("d")
        self.option_slots = [[(key, g * len(check_keys) + k) for k, key in enumerate(check_keys)]
                             for g in range(len(param_groups))]
        self.gathered = np.zeros((comm.size, self.digest.size), np.uint8)
        self.rows = [row.data for row in self.gathered]
        self.exchange = comm.Allgather_init([self.digest, MPI.BYTE], [self.gathered, MPI.BYTE])
        # After each local step: did it raise on any rank?
        self.failed = np.zeros(1, np.int32)
        self.failed_flag = self.failed.data
        self.failed_exchange = comm.Allreduce_init(MPI.IN_PLACE, [self.failed, MPI.INT32_T],
                                                   MPI.MAX)

    def free(self):
        for flat in self.flats:
            flat.free()
        for request in (self.exchange, self.failed_exchange):
            if request != MPI.REQUEST_NULL:
                request.Free()


def _free(plan_box, comm_box):
    """Free a plan's MPI objects and the communicator, unless MPI is finalized.

    A weakref.finalize callback: it runs when the optimizer is collected, on
    ``close()``, or at exit, before mpi4py finalizes MPI.
    """
    if MPI.Is_finalized():
        return
    if plan_box[0] is not None:
        plan_box[0].free()
        plan_box[0] = None
    if comm_box[0] is not None:
        comm_box[0].Free()
        comm_box[0] = None


class _DataParallel(Optimizer):
    """What DistributedOptimizer and ZeroRedundancyOptimizer share: grads in
    flat buckets, checked across ranks and averaged in rank order."""

    # What a step does when param_groups changed alike on every rank without
    # add_param_group: plan again (True) or raise.
    _replans_when_params_change = True

    def _setup(self, comm, bucket_cap_mb, reduction, gradient_as_bucket_view, owners):
        """Check the groups on every rank and plan; collective."""
        self.bucket_cap_mb = bucket_cap_mb
        self.reduction = reduction
        self.gradient_as_bucket_view = bool(gradient_as_bucket_view)
        self.rank, self.world_size = comm.rank, comm.size
        self._owners = owners
        self._synchronized = False
        self._bad_grads = False
        self._grads_copied = 0
        self._boxes: tuple[list, list] = [comm.Dup()], [None]
        self._finalizer = weakref.finalize(self, _free, self._boxes[1], self._boxes[0])
        self._replan(bind_none=True)

    @property
    def _comm(self):
        return self._boxes[0][0]

    @property
    def _plan(self):
        plan = self._boxes[1][0]
        if plan is None:
            raise RuntimeError(f"this {type(self).__name__} was closed")
        return plan

    def _replan(self, bind_none=False):
        """Check that every rank holds alike, then (re)make the plan; collective.

        With gradient_as_bucket_view, each grad becomes its view (holding its
        values), and so does a None grad if ``bind_none`` (at construction).
        """
        comm = self._comm
        settings = {"bucket_cap_mb": self.bucket_cap_mb, "reduction": self.reduction,
                    "gradient_as_bucket_view": self.gradient_as_bucket_view,
                    "the optimizer": type(self._local_optimizer()).__qualname__}
        _check_same(comm, _describe(self.param_groups, settings), self._local_problem())
        check_keys = [key for key, value in self.defaults.items()
                      if isinstance(value, (numbers.Real, np.number))]
        old, self._boxes[1][0] = self._boxes[1][0], None
        if old is not None:
            old.free()
        plan = _Plan(comm, self.param_groups, self._owners, int(self.bucket_cap_mb * 2**20),
                     self.reduction, check_keys)
        self._boxes[1][0] = plan
        if self.gradient_as_bucket_view:
            for group, views in zip(plan.groups, plan.views):
                for p, view in zip(group, views):
                    if p.grad is not None and _grad_problem(p, p.grad) is None:
                        np.copyto(view, p.grad)
                        p.grad = view
                    elif p.grad is None and bind_none:
                        p.grad = view

    def _local_problem(self):
        """What this rank finds wrong in its own groups (an exception), or None."""

    def _local_optimizer(self):
        """The optimizer that steps this rank's parameters."""
        raise NotImplementedError

    # ------------------------------------------------------------ the step

    @property
    def grads_copied(self):
        """int: How many grads the last ``synchronize()`` copied into the buckets
        (0 when every grad was its bucket view)."""
        return self._grads_copied

    def synchronize(self):
        """Average the grads across ranks now; the next ``step()`` does not average again.

        Call it on every rank after the backward pass when something must
        see the averaged grads before the step (clipping, logging).  Each
        parameter's ``.grad`` is then its view into the bucket, holding the
        average (a ZeroRedundancyOptimizer averages only the grads a rank
        owns; the other views hold this rank's own grads).

        Raises
        ------
        ValueError, TypeError
            On every rank, if the grads present or a group's hyperparameters
            differ between ranks, or a grad cannot be averaged on one rank;
            parameters and state are then untouched.
        RuntimeError
            If the optimizer was closed.
        """
        if self._synchronized:
            return
        plan = self._plan
        copied = self._stage(plan)
        plan.exchange.Start()
        plan.exchange.Wait()
        mine = plan.mine
        for row in plan.rows:
            if row != mine:
                break
        else:
            if not (mine[0] or self._bad_grads):
                for flat in plan.flats:
                    flat.average()
                if copied:
                    for group, views in zip(plan.groups, plan.views):
                        for p, view in zip(group, views):
                            if p.grad is not None:
                                p.grad = view
                self._synchronized = True
                return
        self._explain(plan)  # raises on every rank, unless every rank's groups changed
        self._replan()
        self.synchronize()

    def _stage(self, plan):
        """Copy each grad into its bucket view unless it is that view, and
        fill the digest; return how many grads were copied."""
        groups = self.param_groups
        if not (plan.all_views and self._grads_are_views(plan, groups)):
            copied = self._stage_slowly(plan, groups)
        else:  # as at the last step: nothing to copy, the same grads present
            copied = 0
        options = plan.options
        for group, slots in zip(groups, plan.option_slots):
            for key, slot in slots:
                try:
                    options[slot] = group[key]
                except (KeyError, TypeError, ValueError):
                    options[slot] = float("nan")
        self._grads_copied = copied
        return copied

    @staticmethod
    def _grads_are_views(plan, groups):
        """Whether every parameter's grad is its bucket view: the steady state
        of a backward pass writing into the views.  (A parameter put in
        another's place has a grad that is not the view, and goes to
        _stage_slowly.)"""
        if len(groups) != len(plan.views):
            return False
        for group, views in zip(groups, plan.views):
            params = group["params"]
            if len(params) != len(views):
                return False
            for p, view in zip(params, views):
                if p.grad is not view:
                    return False
        return True

    def _stage_slowly(self, plan, groups):
        """_stage parameter by parameter: check that the groups hold what the
        plan was made for, copy grads, note which are present or bad."""
        copied = 0
        changed = len(groups) != len(plan.groups)
        pattern_changed = bad = missing = False
        if not changed:
            for group, expected, views, present in zip(groups, plan.groups, plan.views,
                                                       plan.present):
                params = group["params"]
                if len(params) != len(expected):
                    changed = True
                    break
                for p, q, view, had_grad in zip(params, expected, views, present):
                    if p is not q:
                        changed = True
                        break
                    grad = p.grad
                    if grad is view or grad is None:
                        if had_grad is (grad is None):
                            pattern_changed = True
                        missing = missing or grad is None
                        continue
                    if not had_grad:
                        pattern_changed = True
                    if _grad_problem(p, grad) is None:
                        np.copyto(view, grad)
                        copied += 1
                    else:
                        bad = True
                if changed:
                    break
        plan.mine[0] = changed
        if not changed and (pattern_changed or bad or self._bad_grads):
            self._refresh_statuses(plan)
        self._bad_grads = bad
        # After this step's averaging every present grad is its view.
        plan.all_views = not (changed or bad or missing)
        return copied

    @staticmethod
    def _refresh_statuses(plan):
        position = 0
        for group, views, present in zip(plan.groups, plan.views, plan.present):
            for i, (p, view) in enumerate(zip(group, views)):
                grad = p.grad
                present[i] = grad is not None
                plan.statuses[position] = 0 if grad is None else (
                    1 if grad is view or _grad_problem(p, grad) is None else 2)
                position += 1

    def _explain(self, plan):
        """The ranks' digests differ, or carry news: raise the reason on every
        rank, or return if every rank's param_groups changed alike and this
        optimizer plans again then."""
        self._synchronized = False
        rows = plan.gathered
        changed = rows[:, 0]
        if changed.any():
            if not changed.all():
                raise ValueError(f"param_groups changed on rank {int(np.argmax(changed))} but "
                                 f"not on rank {int(np.argmin(changed))}")
            if self._replans_when_params_change:
                return
            raise ValueError("param_groups changed since the optimizer was made; add "
                             "parameters with add_param_group() on every rank")
        reports = self._comm.allgather(self._report(plan))
        statuses = rows[:, 1:1 + plan.statuses.size]
        for position in range(statuses.shape[1]):
            column = statuses[:, position]
            if (column == 2).any():
                rank = int(np.argmax(column == 2))
                name, message = reports[rank]["bad"][position]
                raise _EXCEPTIONS[name](f"rank {rank}: params[{position}]: {message}")
            if (column != column[0]).any():
                raise ValueError(f"params[{position}] has a grad on rank "
                                 f"{int(np.argmax(column != 0))} but none on rank "
                                 f"{int(np.argmax(column == 0))}")
        for index in range(len(plan.option_slots)):
            for key in plan.check_keys:
                values = [report["options"][index][key] for report in reports]
                for rank, (comparable, text) in enumerate(values):
                    if comparable != values[0][0]:
                        raise ValueError(f"param_groups[{index}]['{key}'] is {values[0][1]} "
                                         f"on rank 0 but {text} on rank {rank}")
        raise RuntimeError("the ranks' digests differ, but no difference was found")

    def _report(self, plan):
        """This rank's side of an explanation: its bad grads and checked options."""
        positions = [p for group in plan.groups for p in group]
        bad = {}
        for position, p in enumerate(positions):
            problem = None if p.grad is None else _grad_problem(p, p.grad)
            if problem is not None:
                bad[position] = (type(problem).__name__, str(problem))
        options = [{key: (_comparable(group.get(key)), repr(group.get(key)))
                    for key in plan.check_keys} for group in self.param_groups]
        return {"bad": bad, "options": options}

    def step(self, closure=None):
        """Average the grads (unless ``synchronize()`` already did), then step.

        Call it on every rank.  A DistributedOptimizer steps every parameter
        with the wrapped optimizer; a ZeroRedundancyOptimizer steps the
        parameters this rank owns and sends them to every rank.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and sets the grads; called first, on every
            rank, and its value returned.

        Returns
        -------
        object
            The closure's value, or None.

        Raises
        ------
        Exception
            On every rank, if the local optimizer's step raised on any rank
            (that rank raises its own exception); a ZeroRedundancyOptimizer
            then sends no parameter.
        """
        loss = None
        if closure is not None:
            loss = closure()
        self.synchronize()
        self._synchronized = False
        self._step_locally()
        return loss

    def _step_locally(self):
        """Step with the averaged grads (subclasses)."""
        raise NotImplementedError

    def _step_everywhere(self, step):
        """``step()``; if it raised on any rank, raise on every rank, so that
        no rank steps on from parameters the others do not have."""
        plan = self._plan
        error = None
        try:
            step()
        except Exception as raised:  # noqa: BLE001 -- every rank must hear of any error
            error = raised
        plan.failed_flag[0] = error is not None
        plan.failed_exchange.Start()
        plan.failed_exchange.Wait()
        if plan.failed_flag[0]:
            _agree(self._comm, error)

    def zero_grad(self, set_to_none=True):
        """Reset the grads: to None (default), or to zeros in place.

        With ``gradient_as_bucket_view=True`` every parameter's ``.grad`` is
        set to its bucket view filled with zeros, whatever ``set_to_none``
        says, so that the backward pass can write the grads where they are
        averaged.

        Parameters
        ----------
        set_to_none : bool, optional
            Set the grads to None instead of zeroing them (default True).
        """
        self._synchronized = False
        if not self.gradient_as_bucket_view:
            return super().zero_grad(set_to_none)
        plan = self._plan
        for flat in plan.flats:
            flat.flat.fill(0)
        for group, views in zip(plan.groups, plan.views):
            for p, view in zip(group, views):
                p.grad = view
        return None

    def close(self):
        """Free the MPI requests and the duplicated communicator; ``step()`` raises after.

        Done when the optimizer is garbage-collected, and at exit; not
        collective.
        """
        self._finalizer()

    def __getstate__(self):
        raise TypeError(f"cannot pickle a {type(self).__name__}: it holds MPI requests; "
                        "save its state_dict() instead")


def _grad_problem(param, grad):
    """Why ``grad`` cannot be averaged for ``param`` (an exception), or None."""
    if not isinstance(grad, np.ndarray):
        return TypeError(f"grad must be a numpy array, not {type(grad).__name__}")
    if grad.dtype != param.dtype:
        return TypeError(f"grad has dtype {grad.dtype}, but the parameter has dtype "
                         f"{param.dtype}")
    if grad.shape != param.shape:
        return ValueError(f"grad has shape {grad.shape}, but the parameter has shape "
                          f"{param.shape}")
    return None


def _argument_problem(bucket_cap_mb, reduction):
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, numbers.Real) \
            or not float(bucket_cap_mb) > 0:
        return ValueError(f"bucket_cap_mb must be a positive number, not {bucket_cap_mb!r}")
    if reduction not in _REDUCTIONS:
        return ValueError(f"reduction must be one of {', '.join(map(repr, _REDUCTIONS))}, "
                          f"not {reduction!r}")
    return None


# ------------------------------------------------------------ replicated

class DistributedOptimizer(_DataParallel):
    """Data-parallel training with any fastsgd optimizer: averages every grad across ranks, then steps.

    Every rank holds every parameter and the wrapped optimizer's whole state
    and takes the same step.  It is a :class:`fastsgd.Optimizer` sharing
    ``param_groups``, ``state`` and ``defaults`` with the wrapped one, so
    schedulers, hooks, ``state_dict``/``load_state_dict`` and checkpoints work
    on it as on the wrapped optimizer.  Made collectively: call the
    constructor on every rank, with the same parameters and options.

    Parameters
    ----------
    optimizer : fastsgd.Optimizer
        The optimizer to wrap, e.g. a :class:`fastsgd.SGD`.
    bucket_cap_mb : float, optional
        The size of the buckets the grads are averaged in (default 25): the
        next bucket is exchanged while one is summed.
    reduction : {"ordered", "mpi"}, optional
        ``"ordered"`` (default): the rank-ordered average, bit-identical to
        one process at any number of ranks.  ``"mpi"``: MPI's Allreduce, then
        a division; the order of its sum depends on the MPI library, the
        number of ranks and the message size, so its results differ from one
        process's (beyond 2 ranks) and from one run configuration to another.
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that train together (default ``MPI.COMM_WORLD``); the
        optimizer communicates on a duplicate of it.
    gradient_as_bucket_view : bool, optional
        If True, every parameter's ``.grad`` is set to its view into the
        bucket now and by every ``zero_grad()``: a backward pass that writes
        into ``p.grad`` in place (``np.matmul(a, b, out=p.grad)``) has its
        grads averaged without a copy.  Otherwise (default) each grad is
        copied into its bucket once, and ``p.grad`` is then set to the bucket
        view holding the average (the array that was set is not changed).

    Attributes
    ----------
    optimizer : fastsgd.Optimizer
        The wrapped optimizer.
    rank, world_size : int
        This rank and the number of ranks.

    Raises
    ------
    ValueError
        On every rank, if the ranks' parameters or options differ, e.g.
        ``params[5] is float32 (256, 1152) on rank 0 but float32 (1152, 256)
        on rank 3``, or an argument is out of range.
    TypeError
        On every rank, if ``optimizer`` is not a fastsgd optimizer on a rank.

    Notes
    -----
    A grad that is None on every rank is skipped, as in one process; None on
    some ranks only raises ValueError on every rank.  ``step(closure)`` calls
    the closure before averaging.  To clip the averaged grads, call
    :func:`clip_grad_norm_` (or ``synchronize()`` then
    :func:`fastsgd.clip_grad_norm_`) before ``step()``.

    Examples
    --------
    On every rank of ``mpiexec -n 2 python -m mpi4py train.py``::

        w = fastsgd.Parameter(np.zeros(4, np.float32))
        opt = fastsgd.distributed.DistributedOptimizer(fastsgd.SGD([w], lr=0.1))
        w.grad = np.full(4, float(opt.rank), np.float32)
        opt.step()  # every rank steps with the mean grad, 0.5
    """

    def __init__(self, optimizer, bucket_cap_mb=25, reduction="ordered", *, comm=None,
                 gradient_as_bucket_view=False):
        comm = _communicator(comm)
        problem = _argument_problem(bucket_cap_mb, reduction)
        if problem is None and (not isinstance(optimizer, Optimizer)
                                or isinstance(optimizer, _DataParallel)):
            problem = TypeError(f"DistributedOptimizer wraps a fastsgd optimizer, not a "
                                f"{type(optimizer).__name__}")
        _agree(comm, problem)
        self.optimizer = optimizer
        self._init_hook_dicts()
        self._patch_step_function()
        self._setup(comm, bucket_cap_mb, reduction, gradient_as_bucket_view, None)

    param_groups = property(
        lambda self: self.optimizer.param_groups,
        lambda self, value: setattr(self.optimizer, "param_groups", value),
        doc="list of dict: the wrapped optimizer's ``param_groups`` (the same list).")
    state = property(
        lambda self: self.optimizer.state,
        lambda self, value: setattr(self.optimizer, "state", value),
        doc="OptimizerState: the wrapped optimizer's ``state`` (the same object).")
    defaults = property(
        lambda self: self.optimizer.defaults,
        lambda self, value: setattr(self.optimizer, "defaults", value),
        doc="dict: the wrapped optimizer's ``defaults`` (the same dict).")

    def __setstate__(self, state):
        # Optimizer.load_state_dict ends by handing the loaded groups and state
        # to __setstate__: they belong to the wrapped optimizer.
        self.optimizer.__setstate__(state)

    def _local_optimizer(self):
        return self.optimizer

    def _step_locally(self):
        self._step_everywhere(self.optimizer.step)

    def add_param_group(self, param_group):
        """Add a parameter group to the wrapped optimizer; collective.

        Call it on every rank with the same group: the ranks' groups are
        compared again and the buckets planned again.

        Parameters
        ----------
        param_group : dict
            The group, as for :meth:`fastsgd.Optimizer.add_param_group`.
        """
        _collectively(self._comm, lambda: self.optimizer.add_param_group(param_group))
        self._replan()


# ------------------------------------------------------------ sharded

class ZeroRedundancyOptimizer(_DataParallel):
    """ZeRO stage 1: each rank keeps optimizer state only for the parameters it owns.

    torch's ``torch.distributed.optim.ZeroRedundancyOptimizer``, over MPI and
    numpy.  The parameters are partitioned among the ranks greedily by size
    (group by group, largest first, each to the rank holding the fewest bytes
    so far).  A step averages each grad on the rank that owns it, in rank
    order (bit-identical to one process), steps the owned parameters with a
    local ``optimizer_class`` (the native kernel for :class:`fastsgd.SGD`)
    and sends the updated parameters to every rank.  Made collectively.

    Parameters
    ----------
    params : iterable
        :class:`fastsgd.Parameter` s, ``(name, Parameter)`` pairs, or dicts
        defining parameter groups, as for any fastsgd optimizer.  Each
        parameter once, contiguous, sharing memory with no other.
    optimizer_class : type, optional
        The local optimizer's class (default :class:`fastsgd.SGD`).
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that train together (default ``MPI.COMM_WORLD``).
    bucket_cap_mb : float, optional
        The size of the buckets the grads are averaged in (default 25).
    gradient_as_bucket_view : bool, optional
        As for :class:`DistributedOptimizer`.
    **defaults
        The local optimizer's options (``lr``, ``momentum``, ...).

    Attributes
    ----------
    optim : fastsgd.Optimizer
        The local optimizer, over the parameters this rank owns.
    rank, world_size : int
        This rank and the number of ranks.

    Notes
    -----
    The grads are reduced to their owners only (a reduce-scatter, not an
    allreduce): after ``synchronize()`` a rank's ``.grad`` of a parameter it
    does not own holds its own grad, not the average, so
    :func:`fastsgd.clip_grad_norm_` over all parameters would be wrong; use
    :func:`clip_grad_norm_`, which gathers the owners' norms.  The updated
    parameters travel between the arrays themselves (MPI derived datatypes).
    ``state`` is the local optimizer's: this rank's shard.  For a checkpoint
    call ``consolidate_state_dict(to=r)`` on every rank; ``state_dict()`` on
    rank r then gives one process's layout, which loads into
    :class:`fastsgd.SGD`, a :class:`DistributedOptimizer`, or a
    ZeroRedundancyOptimizer at any number of ranks.  There is no
    ``reduction="mpi"`` here.
    """

    _replans_when_params_change = False

    def __init__(self, params, optimizer_class=SGD, *, comm=None, bucket_cap_mb=25,
                 gradient_as_bucket_view=False, **defaults):
        comm = _communicator(comm)
        problem = _argument_problem(bucket_cap_mb, "ordered")
        if problem is None and not (isinstance(optimizer_class, type)
                                    and issubclass(optimizer_class, Optimizer)
                                    and not issubclass(optimizer_class, _DataParallel)):
            problem = TypeError(f"optimizer_class must be a fastsgd optimizer class, not "
                                f"{optimizer_class!r}")
        _agree(comm, problem)
        self.rank, self.world_size = comm.rank, comm.size
        self._owner: dict = {}
        self._rank_bytes = [0] * comm.size
        self._consolidated = None
        self._made = False
        # Optimizer.__init__ adds the groups through add_param_group, which
        # partitions each group as it comes.
        _collectively(comm, lambda: Optimizer.__init__(self, params, dict(defaults)))
        self.optim = _collectively(comm, lambda: optimizer_class(
            [self._local_group(group) for group in self.param_groups], **defaults))
        self.defaults = self.optim.defaults
        self.state = self.optim.state
        self._sync_param_groups(self.optim.param_groups, self.param_groups)
        self._setup(comm, bucket_cap_mb, "ordered", gradient_as_bucket_view, self._owner)
        self._made = True

    def _local_problem(self):
        params = [p for group in self.param_groups for p in group["params"]]
        first: dict = {}
        for index, p in enumerate(params):
            if id(p) in first:
                return ValueError(f"params[{index}] is params[{first[id(p)]}] again: a "
                                  "ZeroRedundancyOptimizer steps each parameter once")
            first[id(p)] = index
            if not (p.flags.c_contiguous or p.flags.f_contiguous):
                return ValueError(f"params[{index}] is not contiguous")
        spans = sorted((p.ctypes.data, p.nbytes, index) for index, p in enumerate(params)
                       if p.nbytes)
        for (start, size, i), (other, _, j) in zip(spans, spans[1:]):
            if start + size > other:
                return ValueError(f"params[{min(i, j)}] and params[{max(i, j)}] share memory")
        return None

    def _local_optimizer(self):
        return self.optim

    def add_param_group(self, param_group):
        """Add a parameter group, partitioned among the ranks; collective once made.

        The new group's parameters go to the ranks greedily by size; those of
        earlier groups stay where they are, so no state moves.

        Parameters
        ----------
        param_group : dict
            The group, as for :meth:`fastsgd.Optimizer.add_param_group`.
        """
        if self._made:
            _collectively(self._comm, lambda: super(ZeroRedundancyOptimizer, self)
                          .add_param_group(param_group))
        else:
            super().add_param_group(param_group)
        for p in sorted(param_group["params"], key=lambda p: p.nbytes, reverse=True):
            rank = self._rank_bytes.index(min(self._rank_bytes))
            self._owner[id(p)] = rank
            self._rank_bytes[rank] += p.nbytes
        if self._made:
            self.optim.add_param_group(self._local_group(param_group))
            self._replan()

    def _local_group(self, group):
        """``group`` with only the parameters (and names) this rank owns."""
        local = {key: value for key, value in group.items()
                 if key not in ("params", "param_names")}
        owned = [i for i, p in enumerate(group["params"]) if self._owner[id(p)] == self.rank]
        local["params"] = [group["params"][i] for i in owned]
        if "param_names" in group:
            local["param_names"] = [group["param_names"][i] for i in owned]
        return local

    @staticmethod
    def _sync_param_groups(source, destination):
        """Copy every option but the parameters from one list of groups to another."""
        for src, dst in zip(source, destination):
            for key, value in src.items():
                if key != "params" and key != "param_names":
                    dst[key] = value

    def _step_locally(self):
        """Step the owned parameters, then send them to every rank."""
        self._sync_param_groups(self.param_groups, self.optim.param_groups)
        self._step_everywhere(self.optim.step)
        self._sync_param_groups(self.optim.param_groups, self.param_groups)
        for flat in self._plan.flats:
            if flat.param_gather is not None:
                flat.param_gather.Start()
                flat.param_gather.Wait()

    def _clip_grad_norm(self, max_norm, norm_type, error_if_nonfinite):
        """clip_grad_norm_ for grads averaged on their owners only."""
        self.synchronize()
        present = [(i, p) for i, p in enumerate(self._plan.unique) if p.grad is not None]
        if not present:
            return np.float32(0.0)
        clip_grad._check_infinity_norm_sizes(norm_type, (p.size for _, p in present))
        owned = [(i, p) for i, p in present if self._owner[id(p)] == self.rank]
        norms = _native.grad_norms([p.grad for _, p in owned], [i for i, _ in owned], norm_type)
        counts = [sum(self._owner[id(p)] == r for _, p in present)
                  for r in range(self.world_size)]
        starts = np.cumsum([0] + counts[:-1]).tolist()
        gathered = np.empty(len(present))
        self._comm.Allgatherv([norms, MPI.DOUBLE], [gathered, (counts, starts), MPI.DOUBLE])
        by_owner = [iter(gathered[start:start + count]) for start, count in zip(starts, counts)]
        in_order = [next(by_owner[self._owner[id(p)]]) for _, p in present]
        dtypes = [p.dtype for _, p in present]
        total, coef = clip_grad._total_norm_and_coef(clip_grad._common_dtype(dtypes), dtypes,
                                                     in_order, max_norm, norm_type,
                                                     error_if_nonfinite)
        _native.scale_grads([p.grad for _, p in owned], [i for i, _ in owned], float(coef))
        return total

    # ------------------------------------------------------------ state dicts

    def consolidate_state_dict(self, to=0):
        """Gather every rank's shard of the optimizer state on rank ``to``; collective.

        The shards travel as raw arrays behind a JSON header (no pickle).
        Afterwards ``state_dict()`` on rank ``to`` returns the whole state as
        of this call.

        Parameters
        ----------
        to : int, optional
            The rank that receives the state (default 0).
        """
        to = _agree_on_root(self._comm, to, "to")
        local = self.optim.state_dict()["state"]
        owned = [p for group in self.optim.param_groups for p in group["params"]]
        index = {id(p): i for i, p in enumerate(p for group in self.param_groups
                                                 for p in group["params"])}
        shard = {index[id(owned[i])]: value for i, value in local.items()}
        shards = _gather_trees(self._comm, shard, to)
        self._consolidated = None
        if shards is not None:
            shards[to] = _copy_state(shard)  # a snapshot: the step writes into the live one
            self._consolidated = {key: value for part in shards for key, value in part.items()}

    def state_dict(self):
        """The whole optimizer state in one process's layout, on the rank it was consolidated on.

        Returns
        -------
        dict
            ``{"state": ..., "param_groups": ...}`` as
            :meth:`fastsgd.Optimizer.state_dict` gives it for all the
            parameters, as of the last ``consolidate_state_dict(to=rank)``.

        Raises
        ------
        RuntimeError
            If the state was not consolidated on this rank.
        """
        if self._consolidated is None:
            raise RuntimeError(
                "Optimizer state has not been consolidated on this rank. "
                f"Please call `consolidate_state_dict(to={self.rank})` on "
                "all ranks beforehand if you meant to save the global state.")
        params = [p for group in self.param_groups for p in group["params"]]
        shard, self.state = self.state, {params[i]: value for i, value in
                                         sorted(self._consolidated.items())}
        try:
            return super().state_dict()
        finally:
            self.state = shard

    def load_state_dict(self, state_dict):
        """Load a whole state in one process's layout; call it on every rank.

        Each rank keeps the entries of the parameters it owns.  The state may
        come from :meth:`state_dict` at any number of ranks, or from a
        :class:`fastsgd.SGD` or a :class:`DistributedOptimizer`.

        Parameters
        ----------
        state_dict : dict
            As :meth:`fastsgd.Optimizer.load_state_dict` takes it.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        mine = {i for i, p in enumerate(params) if self._owner[id(p)] == self.rank}
        shard = dict(state_dict)
        shard["state"] = {key: value for key, value in state_dict["state"].items()
                          if key in mine or not (isinstance(key, int) and 0 <= key < len(params))}
        super().load_state_dict(shard)
        self._sync_param_groups(self.param_groups, self.optim.param_groups)
        self.optim.__setstate__({"state": self.state, "param_groups": self.optim.param_groups})


def _copy_state(value):
    """A copy of a state's dicts and arrays."""
    if isinstance(value, dict):
        return {key: _copy_state(item) for key, item in value.items()}
    return np.array(value) if isinstance(value, np.ndarray) else value
