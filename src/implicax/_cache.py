"""Compiled solves for calls outside `jit`, reused while nothing they depend on changed.

An eager call (or one under an eager `grad`, `hessian` or `vmap`) would otherwise compile the
solve's loops again every time. The cache is keyed by what identifies the computation: the
function object (held weakly), the printed jaxpr of its trace (operations, shapes, dtypes
and Python constants; the arrays fn closes over are arguments, not part of it), the solvers'
configuration, the failure policy and the call site named in reports. fn is traced on every
call, so changed globals and closed-over values are always seen.

Nothing is cached when that key might not identify the computation: a solver that is not one
of implicax's own or that holds a function of the user's (a callable solver, a callable linear
solver, a preconditioner: a compiled solve would keep what they read when first traced), and
a jaxpr with host callbacks (their Python functions print without identity) or array literals
(printed as ``[...]``); nor inside `pmap` or `shard_map`. Inside `jit` the cached inner jit
is inlined, so caching costs nothing there.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ._options import holds_functions

_SIZE = 64
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_LOCK = threading.Lock()


def compiled(solve: Callable, fn: Callable, jaxpr: Any, solvers: tuple, config: tuple) -> Callable:
    """`solve`, jitted and cached under (fn, jaxpr, config) when that identifies it."""
    if not jax.sharding.get_abstract_mesh().empty:
        # Inside pmap or shard_map (always traced: nothing to gain) a cached jit traced
        # under another mesh would meet this one's axis types.
        return solve
    if not _identifies(jaxpr) or not all(_builtin(solver) for solver in solvers):
        return solve
    try:
        reference = weakref.ref(fn)
        key = (reference, str(jaxpr), config)
        hash(key)
    except TypeError:  # fn cannot be held weakly, or an option is unhashable
        return solve
    with _LOCK:
        if key in _COMPILED:
            _COMPILED.move_to_end(key)
            return _COMPILED[key]
        jitted = _COMPILED[key] = jax.jit(solve)
        while len(_COMPILED) > _SIZE:
            _COMPILED.popitem(last=False)
    weakref.finalize(fn, _forget, key)  # fn gone: so are its entries
    return jitted


def _forget(key: Any) -> None:
    with _LOCK:
        _COMPILED.pop(key, None)


def _builtin(solver: Any) -> bool:
    return type(solver).__module__.startswith("implicax.") and not holds_functions(solver)


def _identifies(jaxpr: Any) -> bool:
    """Whether the printed jaxpr (with its sub-jaxprs) determines the computation."""
    for eqn in jaxpr.eqns:
        if "callback" in eqn.primitive.name:
            return False
        if any(hasattr(v, "val") and np.ndim(v.val) for v in eqn.invars):  # an array literal
            return False
        for param in eqn.params.values():
            for value in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns") and not _identifies(inner):
                    return False
    return True
