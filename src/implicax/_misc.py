"""Small pytree and type helpers shared by the solvers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any


def tree_vdot(x: PyTree, y: PyTree) -> jax.Array:
    """Inner product ⟨x, y⟩ of two pytrees, accumulated in at least float32."""
    leaves = [
        jnp.vdot(a.astype(_accumulation_dtype(a.dtype)), b.astype(_accumulation_dtype(b.dtype)))
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    ]
    return sum(leaves[1:], leaves[0])


def tree_norm(x: PyTree) -> jax.Array:
    """Euclidean norm of a pytree."""
    return jnp.sqrt(tree_vdot(x, x))


def tree_axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
    """a·x + y, leafwise, in y's dtypes."""
    return jax.tree.map(lambda u, v: (a * u + v).astype(v.dtype), x, y)


def tree_sub(x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, x, y)


def tree_zeros_like(x: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, x)


def scaled_error(residual: PyTree, x: PyTree, rtol: float, atol: float) -> jax.Array:
    """max_i |r_i| / (atol + rtol·|x_i|): the solve has converged when this is ≤ 1.

    NaN anywhere makes the result NaN, so a NaN never passes for convergence. An exact zero
    counts as 0, also where atol = 0 and x_i = 0.
    """
    leaves = [
        jnp.max(jnp.where(r == 0, 0, _upcast(jnp.abs(r)) / (atol + rtol * _upcast(jnp.abs(v)))))
        for r, v in zip(jax.tree.leaves(residual), jax.tree.leaves(x))
        if r.size
    ]
    return _max_of(leaves)


def max_abs(x: PyTree) -> jax.Array:
    """max_i |x_i| over all leaves."""
    return _max_of([jnp.max(_upcast(jnp.abs(v))) for v in jax.tree.leaves(x) if v.size])


def _max_of(scalars: list[jax.Array]) -> jax.Array:
    if not scalars:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.result_type(*scalars)
    return jnp.max(jnp.stack([s.astype(dtype) for s in scalars]))


def _upcast(x: jax.Array) -> jax.Array:
    return x.astype(_accumulation_dtype(x.dtype))


def _accumulation_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def least_precise_dtype(tree: PyTree) -> Any:
    """The floating dtype with the largest machine epsilon among the leaves."""
    dtypes = [jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)]
    return max(dtypes, key=lambda d: float(jnp.finfo(d).eps), default=jnp.dtype(jnp.float32))


def default_tolerance(dtype: Any) -> float:
    """Default rtol = atol for a dtype: eps**(2/3).

    float64 → 3.7e-11, float32 → 2.4e-5, bfloat16 → 3.9e-2. Two thirds of the digits: tighter
    than sqrt(eps) so that derivatives (whose error is proportional to the forward residual)
    keep about as many digits as the solution, loose enough to be reachable in few steps.
    """
    return float(jnp.finfo(dtype).eps) ** (2 / 3)


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


def check_floating(
    tree: PyTree, name: str, hint: str = "Cast it, e.g. .astype(jnp.float32)."
) -> None:
    """Raise a TypeError naming the first leaf of `tree` that is not floating point."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} must hold floating-point arrays (the solution keeps its dtype); at "
                f"{jax.tree_util.keystr(path) or '(root)'} got {dtype}. {hint}"
            )


def deq_initial_state(x: PyTree, z0: PyTree | None) -> PyTree:
    """The DEQ adapters' z0: zeros shaped like x, or the given z0. Checked to be floating here,
    because the adapters call the cell on it before the solve, whose own layers would fail on
    integers with an unrelated message."""
    if z0 is None:
        check_floating(x, "DEQ: x", hint="z0 defaults to zeros like x: pass z0 explicitly.")
        return jax.tree.map(jnp.zeros_like, x)
    check_floating(z0, "DEQ: z0")
    return z0
