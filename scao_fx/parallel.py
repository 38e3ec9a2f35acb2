r"""Beyond one GPU: distributed basis refreshes and FSDP2 (DTensor) parameters.

Knows no optimizer: owner assignment, the owner refresh and DTensor helpers, used by the
Kronecker links (both forms: :func:`~scao_fx.kronecker_precondition` and
:func:`~scao_fx.kronecker_eigenbasis`) and the non-finite guard (the guide is
``docs/distributed.md``):

* **Distributed refresh.** ``kronecker_precondition(process_group=group)`` (and ``scao``,
  ``scao_precondition``, ``SCAO(..., process_group=group)``; in the eigenbasis form
  ``kronecker_eigenbasis``, ``scao(form="eigenbasis")`` and ``soap``) spreads the eigendecompositions of a
  refresh over the ranks of ``group``: every stacked factor (one side of one matrix) gets one
  owner rank, chosen by :func:`assign_owners` (greedy longest-processing-time on a cost of
  :math:`d^3` per ``d x d`` factor); each rank decomposes only the factors it owns and then
  every owner broadcasts its results (basis, coefficients, tail gain, rank, fallback count) in
  one byte buffer per side. The refreshed state is bit-identical to the single-process refresh
  (each factor's decomposition is the same computation, wherever it runs) and identical on
  every rank. Between refreshes nothing is communicated.
* **FSDP2.** :func:`kronecker_precondition` accepts DTensor updates (the gradients of
  ``torch.distributed.fsdp.fully_shard`` parameters): it all-gathers each preconditioned
  matrix's gradient (:func:`gather_full`), preconditions the full matrix on every rank, and
  returns this rank's shard (:func:`shard_like`: a local slice, no communication). The other
  links (blend, Adam, weight decay) are element-wise and run on the shards.
  :func:`~scao_fx.kronecker_eigenbasis` does the same with the rotation and its inner Adam
  (whose moments of the gathered matrices are then whole, replicated tensors).
  :func:`~scao_fx.quantize_state` (``moments="int8"``) encodes each rank's rows of a sharded
  moment on their own (:func:`row_shard`, :func:`from_row_shard`).
"""

from __future__ import annotations

import functools
import heapq
import numbers
from typing import Any, Callable, Sequence

import optree
import torch
import torch.distributed as dist

__all__ = ["assign_owners", "gather_full", "shard_like", "check_process_group", "owner_refresh", "is_dtensor", "all_ranks",
           "row_shard", "from_row_shard"]

# The refreshed fields of a KroneckerSide (its statistics are never changed by a refresh), the
# int64 ones first so that every field starts at a byte offset aligned to its element size.
_REFRESHED = ("rank", "fallbacks", "basis", "coef", "tail")


def check_process_group(name: str, group: Any) -> Any:
    """Validate a process-group argument: ``None`` or a ``torch.distributed.ProcessGroup``."""
    if group is None:
        return None
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{name} must be None or a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD after init_process_group), got {type(group).__name__}"
        )
    return group


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Give each job an owner rank, balancing the total cost per rank (greedy LPT).

    Jobs are taken in decreasing cost (ties: in order) and each goes to the rank with the least
    cost so far (ties: the lowest rank). The result depends only on ``costs`` and
    ``world_size``, so every rank computes the same assignment without communicating. The
    largest rank load is at most 4/3 of the optimum (Graham's bound).

    Args:
        costs: non-negative cost of each job (for a refresh: :math:`d^3` per ``d x d`` factor).
        world_size: number of ranks, >= 1.

    Returns:
        The owner rank of each job, in the order of ``costs``.

    Example:
        >>> import scao_fx as sf
        >>> sf.assign_owners([8.0, 1.0, 1.0, 6.0, 2.0], 2)
        [0, 0, 1, 1, 1]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1:
        raise ValueError(f"world_size must be an integer in [1, inf), got {world_size!r}")
    for i, c in enumerate(costs):
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not c >= 0:
            raise ValueError(f"costs[{i}] must be a real number in [0, inf), got {c!r}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [(0.0, r) for r in range(int(world_size))]  # a heap of (load, rank)
    owners = [0] * len(costs)
    for i in order:
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + float(costs[i]), r))
    return owners


def _rows(side: Any, rows: torch.Tensor, batch: int) -> Any:
    """The stacked rows ``rows`` of every tensor of ``side`` whose leading dimension is ``batch``."""

    def pick(t):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
            return t.index_select(0, rows.to(t.device))
        return t

    return optree.tree_map(pick, side, none_is_leaf=True)


def owner_refresh(side: Any, refresh: Callable[[Any], Any], owners: Sequence[int], group: Any) -> Any:
    """``refresh(side)`` computed row by row on each row's owner rank, the results broadcast.

    ``side`` is a :class:`~scao_fx.precond.kron.KroneckerSide` of ``len(owners)`` stacked
    factors; ``refresh`` maps a side to its refreshed side row by row (so refreshing a subset of
    rows gives those rows of the full refresh). One broadcast per rank that owns rows, of one
    byte buffer holding the owner's refreshed fields.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world == 1:
        return refresh(side)
    batch = len(owners)
    device = side.basis.device
    mine = [j for j, o in enumerate(owners) if o == rank]
    done = refresh(_rows(side, torch.tensor(mine), batch)) if mine else None
    fields = {f: getattr(side, f).clone() for f in _REFRESHED}
    for src in range(world):
        rows = [j for j, o in enumerate(owners) if o == src]
        if not rows:
            continue
        shapes = [((len(rows), *fields[f].shape[1:]), fields[f].dtype) for f in _REFRESHED]
        if src == rank:
            buf = torch.cat([getattr(done, f).contiguous().reshape(-1).view(torch.uint8) for f in _REFRESHED])
        else:
            nbytes = sum(int(torch.Size(s).numel()) * d.itemsize for s, d in shapes)
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dist.broadcast(buf, group=group, group_src=src)
        idx = torch.tensor(rows, device=device)
        offset = 0
        for f, (shape, dtype) in zip(_REFRESHED, shapes):
            n = int(torch.Size(shape).numel()) * dtype.itemsize
            part = buf[offset : offset + n].view(dtype).reshape(shape)
            fields[f].index_copy_(0, idx.to(fields[f].device), part.to(fields[f].device))
            offset += n
    return side._replace(**fields)


@functools.cache
def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(x: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(x, cls)


def all_ranks(flag: torch.Tensor, dtensors: Sequence[Any]) -> torch.Tensor:
    """``flag`` AND-ed over every rank of the device meshes of ``dtensors`` (an all-reduce MIN).

    Each rank only sees its shards, so a per-shard check (finite gradients) must be combined
    before every rank takes the same decision. Every rank must pass DTensors on the same meshes.
    """
    out = flag.to(torch.int32)
    meshes = {id(x.device_mesh): x.device_mesh for x in dtensors}
    for mesh in meshes.values():
        for group in mesh.get_all_groups():
            dist.all_reduce(out, op=dist.ReduceOp.MIN, group=group)
    return out.to(torch.bool)


def gather_full(x: Any) -> Any:
    """The full (global) value of a DTensor as a plain tensor (an all-gather); other values as they are.

    Args:
        x: a tensor, a ``torch.distributed.tensor.DTensor`` (e.g. the gradient of an FSDP2
            parameter) or ``None``.

    Returns:
        ``x.full_tensor()`` for a DTensor, else ``x``.

    Example:
        >>> import torch, scao_fx as sf
        >>> sf.gather_full(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return x.full_tensor() if is_dtensor(x) else x


def shard_like(full: torch.Tensor, like: Any) -> Any:
    """This rank's shard of ``full`` laid out as the DTensor ``like`` (a local slice, no
    communication); ``full`` itself when ``like`` is not a DTensor.

    Args:
        full: a plain tensor holding the global value (identical on every rank).
        like: the DTensor whose mesh and placements the result takes, or any other value.

    Returns:
        A DTensor with ``like``'s mesh and placements, or ``full``.

    Example:
        >>> import torch, scao_fx as sf
        >>> sf.shard_like(torch.ones(2), torch.zeros(2)).tolist()
        [1.0, 1.0]
    """
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements)


def row_shard(x: Any) -> tuple[torch.Tensor, int] | None:
    """This rank's rows of a DTensor split along dim 0 only, and the index of its first row.

    A DTensor whose placements are each ``Shard(0)`` or ``Replicate()`` (FSDP2's default layout,
    HSDP's too) holds on every rank a contiguous run of the global tensor's rows: returns
    ``(x.to_local(), first_row)``, the row offset computed as ``torch.chunk`` splits (mesh
    dimensions in order). Returns ``None`` for any other layout (a shard along another dimension,
    a strided shard, a rank outside the mesh) and for tensors with no dimension.
    """
    from torch.distributed.tensor import Replicate, Shard

    if not is_dtensor(x) or x.dim() == 0:
        return None
    mesh = x.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    first, rows = 0, x.shape[0]
    for d, placement in enumerate(x.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard or placement.dim != 0:
            return None
        chunk = -(-rows // mesh.size(d))
        start = min(coordinate[d] * chunk, rows)
        first, rows = first + start, min(chunk, rows - start)
    local = x.to_local()
    if tuple(local.shape) != (rows, *x.shape[1:]):
        return None
    return local, first


def from_row_shard(local: torch.Tensor, like: Any, rows: int) -> Any:
    """The DTensor laid out as ``like`` (a :func:`row_shard` layout) whose rows on this rank are
    ``local``: global shape ``(rows, *local.shape[1:])``, contiguous. No communication."""
    from torch.distributed.tensor import DTensor

    shape = (rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=shape, stride=stride)
