"""Pytree arithmetic, and reductions that decide convergence.

Every reduction here is NaN-safe on every backend: XLA's CPU `max` drops NaNs from arrays of
4096 elements or more (``jnp.max(jnp.ones(4096).at[7].set(jnp.nan))`` is 1.0), so a decision
is never read off a bare `jnp.max`. Booleans come from `jnp.all` of elementwise comparisons,
which are False for NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def accumulation_dtype(dtype: Any) -> Any:
    """At least float32: inner products and norms of half-precision trees.

    Chosen explicitly rather than by type promotion, which is an error between floating dtypes
    under ``jax_numpy_dtype_promotion="strict"``.
    """
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def widest(dtypes) -> Any:
    """The most precise of some inexact dtypes (complex if any is complex)."""
    dtypes = [jnp.dtype(d) for d in dtypes]
    real = max((jnp.finfo(d).dtype for d in dtypes), key=lambda d: d.itemsize)
    if any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes):
        return jnp.dtype(jnp.complex64 if real.itemsize <= 4 else jnp.complex128)
    return real


def upcast(x: jax.Array) -> jax.Array:
    return x.astype(accumulation_dtype(x.dtype))


def real_dtype(tree: PyTree) -> Any:
    """The real accumulation dtype of a tree's norms (float32 for an empty tree)."""
    dtypes = [jnp.finfo(accumulation_dtype(leaf.dtype)).dtype for leaf in jax.tree.leaves(tree)]
    return widest(dtypes) if dtypes else jnp.dtype(jnp.float32)


def tree_vdot(x: PyTree, y: PyTree) -> jax.Array:
    """⟨x, y⟩ = Σ conj(x_i)·y_i over all leaves, accumulated in at least float32."""
    terms = [jnp.vdot(upcast(a), upcast(b)) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))]
    dtype = widest(t.dtype for t in terms)
    return sum((t.astype(dtype) for t in terms[1:]), terms[0].astype(dtype))


def tree_norm(x: PyTree) -> jax.Array:
    """‖x‖₂, for trees whose entries are O(1) (inside the linear solvers, after scaling)."""
    return jnp.sqrt(jnp.real(tree_vdot(x, x)))


def safe_norm(x: PyTree) -> jax.Array:
    """‖x‖₂ without overflow or underflow: max|x|·‖x / max|x|‖₂. NaN if x holds a NaN."""
    scale = max_abs(x)
    safe = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1)
    unit = jax.tree.map(lambda leaf: upcast(leaf) / safe.astype(upcast(leaf).dtype), x)
    return jnp.where(jnp.isfinite(scale), safe * tree_norm(unit), scale)


def max_abs(x: PyTree, finite: jax.Array | None = None) -> jax.Array:
    """max_i |x_i| over all leaves; NaN if an entry is NaN and none is inf (then inf); 0 for
    an empty tree.

    `finite` says whether every entry is finite, when the caller knows or handles it (the
    forward loop passes True and reads its NaN-safe `within_code` instead); otherwise a sum
    of x·0 (0 unless an entry is NaN or inf) tells. Both are reductions that XLA vectorises, beside the `max` (which may drop NaNs); a
    select inside the max, or a separate `isnan` pass, cost a DEQ forward solve 20–50% on a
    CPU, where it runs every step.
    """
    dtype = real_dtype(x)
    leaves = [upcast(leaf) for leaf in jax.tree.leaves(x) if leaf.size]
    if not leaves:
        return jnp.zeros((), dtype)
    largest = jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)).astype(dtype) for leaf in leaves]))
    if finite is None:
        finite = all_finite(leaves)
    return jnp.where(finite | (largest == jnp.inf), largest, jnp.nan)


def all_finite(x: PyTree) -> jax.Array:
    """Whether every entry of every leaf is finite (True for an empty tree).

    Σ x_i·0 is 0 unless an entry is NaN or inf: one floating sum per leaf (a sum never drops a
    NaN), where ``all(isfinite(x))`` costs XLA three kernels per leaf, each compiled apart.
    """
    # (x_i·0 of a complex x_i is NaN in both parts when either is not finite.)
    sums = [jnp.real(jnp.sum(leaf * 0)).astype(jnp.float32) for leaf in jax.tree.leaves(x)]
    return jnp.isfinite(sum(sums[1:], sums[0])) if sums else jnp.ones((), jnp.bool_)


def within_code(error: PyTree, scale: PyTree, rtol: jax.Array, atol: jax.Array) -> jax.Array:
    """The componentwise test |error_i| ≤ atol + rtol·|scale_i| as one max over per-entry
    codes, returned as a float32: 0 if every entry passes, 1 if some fails and all of error
    is finite, 2 if an entry of error is NaN or inf (unless its bound is inf).

    A comparison, not a ratio: an exact zero passes also with atol = 0 and scale_i = 0. The
    reduced values are the codes, never NaN, so no backend can drop a NaN from it, and the one
    pass tells both convergence and divergence (a forward solve runs it every step).
    """

    def code(e, s):
        e, s = upcast(jnp.abs(e)), upcast(jnp.abs(s))
        bound = atol.astype(e.dtype) + rtol.astype(e.dtype) * s.astype(e.dtype)
        # Codes in e's floating dtype, whose max the backends vectorise best; none is NaN.
        return jnp.max(jnp.where(e <= bound, 0, jnp.where(e < jnp.inf, 1, 2)).astype(e.dtype))

    codes = [
        code(e, s).astype(jnp.float32)
        for e, s in zip(jax.tree.leaves(error), jax.tree.leaves(scale))
    ]
    return functools.reduce(jnp.maximum, codes) if codes else jnp.zeros((), jnp.float32)


def all_within(error: PyTree, scale: PyTree, rtol: jax.Array, atol: jax.Array) -> jax.Array:
    """Whether |error_i| ≤ atol + rtol·|scale_i| for every i; False wherever error is NaN."""
    return within_code(error, scale, rtol, atol) == 0


def tree_axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
    """a·x + y, leafwise, in y's dtypes (the scalar a is cast to each leaf's dtype)."""
    return jax.tree.map(lambda u, v: _cast(a, v) * u.astype(v.dtype) + v, x, y)


def tree_scale(a: Any, x: PyTree) -> PyTree:
    """a·x, leafwise, in x's dtypes."""
    return jax.tree.map(lambda u: _cast(a, u) * u, x)


def _cast(a: Any, like: jax.Array) -> jax.Array:
    # Explicit, so that strict dtype promotion never sees two floating dtypes meet.
    if not jnp.issubdtype(like.dtype, jnp.complexfloating):
        a = jnp.real(a)
    return jnp.asarray(a).astype(like.dtype)


def tree_add(x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, x, y)


def tree_sub(x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, x, y)


def tree_zeros_like(x: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, x)


def ravel(tree: PyTree, dtype: Any = None) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """A tree's entries as one vector in `dtype` (default: the widest of its dtypes), and the
    inverse map, which restores each leaf's shape and dtype.

    The casts are explicit, so that mixed float32/float64 trees work under strict dtype
    promotion (`jax.flatten_util.ravel_pytree` promotes implicitly).
    """
    leaves, treedef = jax.tree.flatten(tree)
    dtype = jnp.dtype(widest(leaf.dtype for leaf in leaves) if dtype is None else dtype)
    shapes = [jnp.shape(leaf) for leaf in leaves]
    dtypes = [jnp.result_type(leaf) for leaf in leaves]
    splits = np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1].tolist()
    flat = jnp.concatenate([cast_to(jnp.ravel(leaf), dtype) for leaf in leaves])

    def unravel(vector: jax.Array) -> PyTree:
        parts = jnp.split(vector, splits) if splits else [vector]
        return treedef.unflatten(
            [cast_to(p, d).reshape(s) for p, d, s in zip(parts, dtypes, shapes)]
        )

    return flat, unravel


def cast_to(x: jax.Array, dtype: Any) -> jax.Array:
    """x in `dtype`; a complex x cast to a real dtype keeps its real part (explicitly, as
    `astype` does with a ComplexWarning)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating) and not jnp.issubdtype(
        dtype, jnp.complexfloating
    ):
        x = jnp.real(x)
    return x.astype(dtype)


def least_precise_dtype(tree: PyTree) -> Any:
    """The inexact dtype with the largest machine epsilon among the leaves (float32 if none)."""
    dtypes = [jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)]
    return max(dtypes, key=lambda d: float(jnp.finfo(d).eps), default=jnp.dtype(jnp.float32))


def check_floating(
    tree: PyTree, name: str, hint: str = "Cast it, e.g. .astype(jnp.float32)."
) -> None:
    """Raise a TypeError naming the first leaf of `tree` that is neither real floating point
    nor complex (complex64, complex128), or is an 8-bit float."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jnp.result_type(leaf)
        where = jax.tree_util.keystr(path) or "(root)"
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{name} must hold floating-point arrays (real or complex; the solution keeps "
                f"its dtype); at {where} got {dtype}. {hint}"
            )
        if dtype.itemsize < 2:
            raise TypeError(
                f"{name} at {where} is {dtype}: 8-bit (and narrower) floats are too coarse "
                "for an iterative solve and its derivatives. Use bfloat16, float16 or wider."
            )


def check_like(out: PyTree, like: PyTree, out_name: str, like_name: str) -> None:
    """Raise a TypeError naming the first difference in structure, shape or dtype."""
    out_def, like_def = jax.tree.structure(out), jax.tree.structure(like)
    if out_def != like_def:
        raise TypeError(
            f"{out_name} must have the same pytree structure as {like_name}; "
            f"got {out_def}, expected {like_def}."
        )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(like)):
        where = jax.tree_util.keystr(path) or "(root)"
        if jnp.shape(a) != jnp.shape(b):
            raise TypeError(
                f"{out_name} must have the shapes of {like_name}; at {where} got shape "
                f"{jnp.shape(a)}, expected {jnp.shape(b)}."
            )
        if jnp.result_type(a) != jnp.result_type(b):
            raise TypeError(
                f"{out_name} must have the dtypes of {like_name}; at {where} got "
                f"{jnp.result_type(a)}, expected {jnp.result_type(b)}."
            )
