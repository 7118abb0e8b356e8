"""What a solve reports (`SolveStats`) and what happens when it fails (the failure policy)."""

from __future__ import annotations

import warnings
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._tree import PyTree

FailurePolicy = Literal["warn", "nan", "raise", "ignore"]
FailurePolicy.__doc__ = """What `on_failure` does when a forward or linear solve does not converge: "warn"
(a RuntimeWarning, the result as is), "nan" (NaN in place of the failed result), "raise" (an
error from inside jit) or "ignore" (see `SolveStats`)."""
FAILURE_POLICIES = ("warn", "nan", "raise", "ignore")


class SolveStats(NamedTuple):
    """What a solve did. Under `jax.vmap` every field is per batch element.

    Attributes:
        steps: for a forward solve, the solver's iterations (evaluations of ``fn`` for the
            fixed-point methods and Broyden, Newton steps for `Newton`; 0 when x0 already
            solves a root problem); for a linear solve, matrix-vector products, including the
            one that verifies the residual; -1 for a user callable solver.
        residual_norm: for a forward solve, max_i |F(x)_i| at the last checked iterate, where F
            is the residual (``fn(x, params)`` for a root, ``x - fn(x, params)`` for a fixed
            point); for a linear solve, the true ‖b − A·x‖₂, recomputed at the solution.
        converged: the solve met its tolerance and its solution is finite.
        diverged: the solve stopped at a non-finite iterate or residual (NaN or inf), as
            opposed to running out of steps.
        inner_failures: forward solves only: how many of the solver's inner linear solves
            (Newton's) did not converge; 0 for the other solvers and for linear solves.
    """

    steps: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    diverged: jax.Array
    inner_failures: jax.Array


def make_stats(steps, residual_norm, converged, diverged, inner_failures=0) -> SolveStats:
    return SolveStats(
        jnp.asarray(steps, jnp.int32),
        jnp.asarray(residual_norm),
        jnp.asarray(converged, jnp.bool_),
        jnp.asarray(diverged, jnp.bool_),
        jnp.asarray(inner_failures, jnp.int32),
    )


def check_policy(on_failure: Any) -> None:
    if on_failure not in FAILURE_POLICIES:
        raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}.")


def apply_failure_policy(
    x: PyTree, stats: SolveStats, on_failure: FailurePolicy, what: str
) -> tuple[PyTree, SolveStats]:
    """Report a failed solve as the policy says; return (x, stats), with NaNs in place of x
    for 'nan'.

    'warn' and 'raise' run a host callback with the converged flag; under `jax.vmap` the
    callback sees the whole batch at once and reports how many elements failed. The report
    runs whenever the returned x or stats are used.
    """
    if on_failure == "ignore":
        return x, stats
    if on_failure == "nan":
        nan_x = jax.tree.map(
            lambda leaf: jnp.where(stats.converged, leaf, jnp.full_like(leaf, jnp.nan)), x
        )
        return nan_x, stats
    message = f"implicax: the {what} did not converge"

    def report(converged, diverged, steps, residual):
        converged = np.asarray(converged)
        if not converged.all():
            failed = int(converged.size - converged.sum())
            reason = " (it diverged: a NaN or inf appeared)" if np.any(diverged) else ""
            detail = (
                f"{message} for {failed} of {converged.size} batch elements{reason}"
                if converged.size > 1
                else f"{message} ({int(np.max(steps))} steps, residual "
                f"{float(np.max(residual)):.3g}){reason}"
            )
            if on_failure == "raise":
                raise RuntimeError(detail + "; see SolveStats for details.")
            warnings.warn(
                detail + "; pass on_failure='ignore' to silence.", RuntimeWarning, stacklevel=1
            )
        return np.ones((), np.bool_)

    return _report_if_failed(
        report, (x, stats), stats.converged, stats.diverged, stats.steps, stats.residual_norm
    )


def _report_if_failed(report, tree: PyTree, converged: jax.Array, *args: jax.Array) -> PyTree:
    """Return tree, after ``report(converged, *args)`` has run on the host if some element
    failed.

    Only the failed branch of a `lax.cond` calls back, so a converged solve pays for one
    predicate, no transfer, and the select of tree through the flag. Under vmap the check
    runs once on the whole batch (a custom_vmap rule un-batches it), so that the branch stays
    a real `lax.cond`.

    The callback is a `jax.pure_callback`. It returns True (or raises), and every leaf of tree
    is selected through that flag, so the callback runs whenever any of them is used: XLA
    removes a pure callback whose result nothing reads. `jax.debug.callback` would need no
    such tie, but it is a JAX effect, and JAX dispatches a jitted function with an effect on
    its slower Python path, even when the branch is not taken (docs/performance.md).
    """

    @jax.custom_batching.custom_vmap
    def check(values):
        flag = jax.ShapeDtypeStruct((), jnp.bool_)
        return lax.cond(
            jnp.all(values[0]),
            lambda: jnp.ones((), jnp.bool_),
            lambda: jax.pure_callback(report, flag, *values),
        )

    @check.def_vmap
    def _(axis_size, in_batched, values):
        # Batched or not, each value reaches the callback whole (the report takes the
        # batch's max), and the flag is one for the batch.
        del axis_size, in_batched
        return check(values), False

    keep = check((converged, *args))
    return jax.tree.map(lambda leaf: jnp.where(keep, leaf, jnp.zeros_like(leaf)), tree)
