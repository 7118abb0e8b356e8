"""Loop carries inside `shard_map`: varying manual mesh axes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._tree import PyTree


def varying_axes(x: Any) -> frozenset:
    """The manual mesh axes over which x varies inside `shard_map` (empty elsewhere)."""
    aval = jax.typeof(x) if not isinstance(x, jax.ShapeDtypeStruct) else x
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def make_varying(x: jax.Array, axes: frozenset) -> jax.Array:
    """Mark x as varying over `axes`, so that a loop carry keeps one type in `shard_map`."""
    missing = tuple(sorted(axes - varying_axes(x)))
    if not missing:
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, missing, to="varying")
    return lax.pvary(x, missing)  # type: ignore[attr-defined]  # JAX versions before `pcast`


def tree_varying_axes(*trees: PyTree) -> frozenset:
    """Union of the varying mesh axes of all leaves (shapes or arrays)."""
    return frozenset().union(*(varying_axes(leaf) for leaf in jax.tree.leaves(trees)))


def while_loop(cond, body, init, axes: frozenset):
    """`lax.while_loop` whose initial carry is first marked varying over `axes`.

    Inside `shard_map`, loop state built from constants (zeros, counters) is not varying while
    the body's outputs are; the carry must keep one type, so everything varies from the start.
    Each device then iterates on its own problem until it converges, so `fn` must not call
    collectives over those axes (a device that stopped would leave the others waiting).
    """
    init = jax.tree.map(lambda leaf: make_varying(jnp.asarray(leaf), axes), init)
    return lax.while_loop(cond, body, init)
