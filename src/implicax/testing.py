"""Verification helpers: check an implicit function's derivatives the way implicax checks its own.

Use them in your test suite (float64 recommended: ``jax.config.update("jax_enable_x64", True)``)::

    from implicax.testing import check_derivatives, check_against_unrolled

    check_derivatives(lambda p: my_layer(p, x), (params,), order=2, transforms=("jit", "vmap"))
    check_against_unrolled(cell, z0, params, steps=500)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from ._implicit import fixed_point_solve

__all__ = ["check_against_unrolled", "check_derivatives"]

TRANSFORMS = ("none", "jit", "vmap", "pmap")


def check_derivatives(
    f: Callable[..., Any],
    args: Sequence[Any],
    *,
    order: int = 1,
    modes: Sequence[str] = ("fwd", "rev"),
    transforms: Sequence[str] = ("jit",),
    atol: float | None = None,
    rtol: float | None = None,
    eps: float | None = None,
) -> None:
    """Check f's derivatives against central finite differences, up to `order`, in each mode and
    under each transform, with `jax.test_util.check_grads`. Raises AssertionError on mismatch.

    Args:
        f: function of `args` (arrays or pytrees of floating arrays).
        args: the point at which to check.
        order: highest derivative order (3 checks jvp/vjp of jvp/vjp of jvp/vjp).
        modes: any of ``"fwd"`` (jvp, jacfwd) and ``"rev"`` (vjp, grad).
        transforms: any of ``"none"``, ``"jit"``, ``"vmap"`` (a batch of two copies of args;
            every output row is checked), ``"pmap"`` (args replicated over all local devices).
        atol, rtol, eps: passed to `check_grads` (defaults: its per-dtype tolerances).
    """
    unknown = set(transforms) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown transforms {sorted(unknown)}; choose from {TRANSFORMS}.")
    unknown_modes = set(modes) - {"fwd", "rev"}
    if unknown_modes:
        raise ValueError(f"unknown modes {sorted(unknown_modes)}; choose from ('fwd', 'rev').")
    args = tuple(args)
    for transform in transforms:
        g, g_args = _transformed(f, args, transform)
        check_grads(g, g_args, order=order, modes=tuple(modes), atol=atol, rtol=rtol, eps=eps)


def _transformed(f, args, transform):
    if transform == "none":
        return f, args
    if transform == "jit":
        return jax.jit(f), args
    size = jax.local_device_count() if transform == "pmap" else 2
    batched = jax.tree.map(lambda a: jnp.broadcast_to(a, (size, *jnp.shape(a))), args)
    mapped = jax.vmap(f) if transform == "vmap" else jax.pmap(f)
    return mapped, batched


def check_against_unrolled(
    fn: Callable[[Any, Any], Any],
    x0: Any,
    params: Any,
    *,
    steps: int = 1000,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    **solve_kwargs: Any,
) -> None:
    """Check that `fixed_point_solve(fn, x0, params)` and its Jacobian with respect to params
    (reverse and forward mode) match plain iteration x ← fn(x, params), `steps` times from x0,
    differentiated by ordinary backpropagation. Needs a contraction.

    Raises AssertionError naming the first mismatching leaf.
    """

    def implicit(p):
        return fixed_point_solve(fn, x0, p, **solve_kwargs)

    def unrolled(p):
        return jax.lax.fori_loop(0, steps, lambda _, x: fn(x, p), x0)

    checks = {
        "solution": (jax.jit(implicit)(params), jax.jit(unrolled)(params)),
        "jacrev": (jax.jit(jax.jacrev(implicit))(params), jax.jit(jax.jacrev(unrolled))(params)),
        "jacfwd": (jax.jit(jax.jacfwd(implicit))(params), jax.jit(jax.jacfwd(unrolled))(params)),
    }
    for name, (got, expected) in checks.items():
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)
        ):
            np.testing.assert_allclose(
                np.asarray(a, np.float64),
                np.asarray(b, np.float64),
                rtol=rtol,
                atol=atol,
                err_msg=f"{name} differs from unrolled iteration at {jax.tree_util.keystr(path)}",
            )
