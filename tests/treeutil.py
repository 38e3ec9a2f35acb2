"""Tree helpers shared by the tests (not a test module).

Everything here works on the trees the library uses: nested dicts / lists / tuples /
NamedTuples of tensors, with ``None`` leaves allowed.
"""

from __future__ import annotations

from typing import Any

import optree
import torch


def leaves(tree: Any) -> list:
    """All leaves of ``tree`` in order, ``None`` placeholders included."""
    return optree.tree_leaves(tree, none_is_leaf=True)


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of ``tree`` in order."""
    return [x for x in leaves(tree) if isinstance(x, torch.Tensor)]


def structure(tree: Any):
    """The tree's structure (``None`` counted as a leaf)."""
    return optree.tree_structure(tree, none_is_leaf=True)


def clone(tree: Any) -> Any:
    """Deep copy of every tensor leaf (other leaves shared)."""
    return optree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree, none_is_leaf=True
    )


def versions(tree: Any) -> list[int]:
    """The autograd version counter of every tensor leaf (it moves on any in-place write)."""
    return [t._version for t in tensor_leaves(tree)]


def assert_tree_close(actual: Any, expected: Any, *, rtol: float = 0.0, atol: float = 0.0, msg: str = "") -> None:
    """Same structure, same dtypes/shapes, values within tolerance (exact by default)."""
    assert structure(actual) == structure(expected), f"{msg}: structure {structure(actual)} != {structure(expected)}"
    for i, (a, e) in enumerate(zip(leaves(actual), leaves(expected))):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"{msg}: leaf {i} is {type(a).__name__}, expected a tensor"
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{msg}: leaf {i}: {m}")
        else:
            assert a == e, f"{msg}: leaf {i}: {a!r} != {e!r}"


def storage_ptrs(tree: Any) -> set[int]:
    """Addresses of the storages behind every non-empty tensor leaf."""
    return {t.untyped_storage().data_ptr() for t in tensor_leaves(tree) if t.numel() > 0}


def assert_no_shared_storage(a: Any, b: Any, msg: str = "") -> None:
    """No tensor of ``a`` shares memory with a tensor of ``b``."""
    shared = storage_ptrs(a) & storage_ptrs(b)
    assert not shared, f"{msg}: {len(shared)} storage(s) shared"


def signature(tree: Any) -> tuple:
    """Structure plus (shape, dtype, device) of every leaf: what must stay stable across steps."""
    sig = []
    for x in leaves(tree):
        if isinstance(x, torch.Tensor):
            sig.append((tuple(x.shape), x.dtype, x.device))
        else:
            sig.append(type(x).__name__)
    return structure(tree), tuple(sig)


def chain_state(state: Any) -> Any:
    """The optimizer chain's state inside an ``apply_if_finite`` wrapper (or ``state`` itself)."""
    import scao_fx as sf

    return state.inner_state if isinstance(state, sf.ApplyIfFiniteState) else state


def eigenbasis_state(state: Any) -> Any:
    """The ``kronecker_eigenbasis`` state of an eigenbasis-form ``sf.scao`` state: inside the
    ``apply_if_finite`` wrapper (if any), first in the chain."""
    return chain_state(state)[0]


def update_memory_rise(tx: Any, params: Any, grads: list) -> float:
    """Run ``tx`` over ``grads`` from ``tx.init(params)`` (in place); the last update runs under
    the profiler's memory events: the highest rise of live memory during it, in bytes per
    parameter (what the step allocates and frees besides the state it keeps)."""
    from step_peak_memory import peak_rise  # docs/examples
    from torch.profiler import ProfilerActivity, profile

    state = tx.init(params)
    for g in grads[:-1]:
        _, state = tx.update(g, state, params=params)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tx.update(grads[-1], state, params=params)
    return peak_rise(prof) / sum(p.numel() for p in leaves(params))
