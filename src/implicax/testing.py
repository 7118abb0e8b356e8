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

from ._solve import fixed_point_solve

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

    Raises:
        TypeError or ValueError: for invalid options, and for arguments that are not floating
            or not finite.
        AssertionError: when a derivative mismatches, or f's value at args is not finite (its
            finite differences would then be NaN, which compares equal to a NaN derivative).
    """
    if not callable(f):
        raise TypeError(f"check_derivatives: f must be callable, got {f!r}.")
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            "check_derivatives: args must be a tuple or list of f's arguments, got "
            f"{type(args).__name__}; for one argument x write (x,)."
        )
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"check_derivatives: order must be an int >= 1, got {order!r}.")
    transforms = _names("transforms", transforms, TRANSFORMS)
    modes = _names("modes", modes, ("fwd", "rev"))
    for name, value in (("atol", atol), ("rtol", rtol), ("eps", eps)):
        _check_tolerance("check_derivatives", name, value, positive=name == "eps")
    args = jax.tree.map(jnp.asarray, tuple(args))
    _check_leaves(
        "check_derivatives",
        "args",
        args,
        floating="derivatives are checked with respect to every argument, which must be "
        "floating (or complex)",
        finite="; derivatives at NaN or inf cannot be checked",
    )
    for transform in transforms:
        g, g_args = _transformed(f, args, transform)
        # Finite differences of a NaN value are NaN, and NaN compares equal to NaN.
        for path, leaf in jax.tree_util.tree_leaves_with_path(g(*g_args)):
            if not bool(jnp.all(jnp.isfinite(leaf))):
                raise AssertionError(
                    f"check_derivatives: f's output{jax.tree_util.keystr(path)} is not finite "
                    f"(transform {transform!r}), so its derivatives cannot be checked."
                )
        tolerances = dict(atol=atol, rtol=rtol, eps=eps)
        try:
            check_grads(g, g_args, order=order, modes=modes, **tolerances)
        except AssertionError as error:
            raise AssertionError(_locate(g, g_args, order, modes, transform, tolerances)) from error


_ORDINALS = {1: "first", 2: "second", 3: "third"}


def _locate(g, args, order, modes, transform, tolerances) -> str:
    """Say which argument, order and mode fail: rerun the check one argument, one mode and
    one order at a time (lowest first) after the joint check has failed."""
    for k in range(1, order + 1):
        for mode in modes:
            for i in range(len(args)):

                def one(arg, i=i):
                    return g(*args[:i], arg, *args[i + 1 :])

                try:
                    check_grads(one, (args[i],), order=k, modes=(mode,), **tolerances)
                except AssertionError as error:
                    ordinal = _ORDINALS.get(k, f"order-{k}")
                    how = "jvp" if mode == "fwd" else "vjp"
                    return (
                        f"check_derivatives: the {ordinal} derivative of f with respect to "
                        f"args[{i}] in {mode} mode ({how}, checked by "
                        f"jax.test_util.check_grads) under transform {transform!r} does not "
                        f"match central finite differences:\n{error}"
                    )
    return (
        f"check_derivatives: a derivative of f (order <= {order}, modes {tuple(modes)}) under "
        f"transform {transform!r} does not match central finite differences in a joint "
        "direction of all args, though each argument alone passes."
    )


def _names(field: str, values: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError(
            f"check_derivatives: {field} must be a sequence of names, got the string "
            f"{values!r}; write ({values!r},)."
        )
    values = tuple(values)
    unknown = set(values) - set(allowed)
    if unknown:
        raise ValueError(
            f"check_derivatives: unknown {field} {sorted(unknown)}; choose from {allowed}."
        )
    if not values:
        raise ValueError(f"check_derivatives: {field} is empty, so nothing would be checked.")
    return values


def _check_tolerance(entry: str, name: str, value: Any, *, positive: bool = False) -> None:
    """None, a finite float (> 0 if `positive`, else >= 0), or a dict of such per dtype (as
    `check_grads` accepts)."""
    if value is None:
        return
    for tol in value.values() if isinstance(value, dict) else [value]:
        ok = isinstance(tol, (int, float, np.floating)) and not isinstance(tol, bool)
        if not ok or not np.isfinite(tol) or tol < 0 or (positive and tol == 0):
            bound = "> 0" if positive else ">= 0"
            raise ValueError(
                f"{entry}: {name} must be a finite float {bound} (or a dict of them per dtype), "
                f"got {value!r}."
            )


def _check_leaves(
    entry: str, name: str, tree: Any, *, floating: str | None = None, finite: str = ""
) -> None:
    """Raise for the first leaf of `tree` that is not finite, or (when `floating` gives the
    reason) not floating or complex; the messages name the leaf by its path."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        where = name + jax.tree_util.keystr(path)
        dtype = jnp.result_type(leaf)
        if floating is not None and not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(f"{entry}: {where} has dtype {dtype}; {floating}.")
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(f"{entry}: {where} is not finite{finite}.")


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

    Raises AssertionError naming the first mismatching leaf (NaN never matches), TypeError or
    ValueError for invalid arguments (integer or non-finite params, non-finite x0, steps < 1).
    """

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"check_against_unrolled: steps must be an int >= 1, got {steps!r}.")
    _check_tolerance("check_against_unrolled", "rtol", rtol)
    _check_tolerance("check_against_unrolled", "atol", atol)
    if "return_stats" in solve_kwargs:
        raise TypeError("check_against_unrolled: return_stats is not supported.")
    _check_leaves(
        "check_against_unrolled",
        "params",
        params,
        floating="the Jacobian is taken with respect to every leaf of params, which must be "
        "floating",
    )
    _check_leaves("check_against_unrolled", "x0", x0)

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
                equal_nan=False,  # NaN in both must fail, not pass
                err_msg=f"{name} differs from unrolled iteration at {jax.tree_util.keystr(path)}",
            )
