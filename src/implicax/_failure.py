"""What a solve reports (`SolveStats`) and what happens when it fails (the failure policy)."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._tree import PyTree

FailurePolicy = Literal["warn", "nan", "raise", "ignore"]
FailurePolicy.__doc__ = """What `on_failure` does when a forward or linear solve does not converge: "warn"
(a RuntimeWarning, the result as is), "nan" (NaN in place of the failed result), "raise"
(`SolveError`; inside jit, an error that carries its message) or "ignore" (see
`SolveStats`)."""
FAILURE_POLICIES = ("warn", "nan", "raise", "ignore")


class SolveError(RuntimeError):
    """A solve failed under ``on_failure="raise"``; the message names the solve (forward,
    tangent or adjoint), its steps and residual, and where it was called.

    It is raised as itself by a forward solve called outside `jax.jit` (with concrete
    arguments). Inside a jitted function, and for the linear solves of derivatives, XLA
    reports errors of a running computation as `jax.errors.JaxRuntimeError`, whose message
    then contains this one.
    """


class _QuietSolveErrors(logging.Filter):
    # JAX logs the traceback of an exception raised in a host callback before re-raising it
    # as a JaxRuntimeError; a SolveError is an expected report, raised again to the caller.
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SolveError))


logging.getLogger("jax._src.callback").addFilter(_QuietSolveErrors())
_MESSAGE = re.compile(r"(implicax: the .*?; see SolveStats for details\.)", re.S)


def reraise_solve_error(error: Exception) -> None:
    """Raise the SolveError that a JaxRuntimeError carries, if it carries one."""
    found = _MESSAGE.search(str(error))
    if found:
        raise SolveError(found.group(1)) from None


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


PHASES = ("forward", "derivative")


def check_policy(on_failure: Any) -> tuple[FailurePolicy, FailurePolicy]:
    """The policies (forward, derivative) from `on_failure`: one policy for both, or a mapping
    from "forward" (the forward solve) and "derivative" (its tangent and adjoint linear solves)
    to a policy each, "warn" for a phase it leaves out."""
    if isinstance(on_failure, Mapping):
        unknown = sorted(set(on_failure) - set(PHASES), key=str)
        if unknown:
            raise ValueError(
                f"on_failure: unknown keys {unknown}; a mapping takes 'forward' (the forward "
                "solve) and 'derivative' (its tangent and adjoint linear solves)."
            )
        policies = tuple(on_failure.get(phase, "warn") for phase in PHASES)
    else:
        policies = (on_failure, on_failure)
    for policy in policies:
        if not isinstance(policy, str) or policy not in FAILURE_POLICIES:
            raise ValueError(
                f"on_failure must be one of {FAILURE_POLICIES}, or a mapping such as "
                f"{{'forward': 'raise', 'derivative': 'warn'}}; got {on_failure!r}."
            )
    return policies  # type: ignore[return-value]


def apply_failure_policy(
    x: PyTree, stats: SolveStats, on_failure: FailurePolicy, what: str, site: Any
) -> tuple[PyTree, SolveStats]:
    """Report a failed solve as the policy says; return (x, stats), with NaNs in place of x
    for 'nan'. `site` is the user's call, from `call_site`.

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
    filename, lineno, module_globals = site
    where = f" (solve called at {filename}:{lineno})"

    def report(converged, diverged, steps, residual):
        converged = np.asarray(converged)
        if not converged.all():
            failed = int(converged.size - converged.sum())
            reason = " (it diverged: a NaN or inf appeared)" if np.any(diverged) else ""
            detail = (
                f"{message} for {failed} of {converged.size} batch elements{reason}"
                if converged.size > 1
                else f"{message} ({_steps(steps)}residual {float(np.max(residual)):.3g}){reason}"
            )
            if on_failure == "raise":
                raise SolveError(detail + where + "; see SolveStats for details.")
            # Attributed to the user's call, deduplicated there like any warning of theirs.
            warnings.warn_explicit(
                detail + "; pass on_failure='ignore' to silence.",
                RuntimeWarning,
                filename,
                lineno,
                module=module_globals.get("__name__"),
                registry=module_globals.setdefault("__warningregistry__", {}),
            )
        return np.ones((), np.bool_)

    return _report_if_failed(
        report, (x, stats), stats.converged, stats.diverged, stats.steps, stats.residual_norm
    )


def _steps(steps) -> str:
    steps = int(np.max(steps))
    return "" if steps < 0 else f"{steps} steps, "  # −1: a callable solver's, not counted


# Modules whose frames are not the user's call site: this library, its adapters, JAX and the
# frameworks the adapters run in.
_LIBRARIES = frozenset(
    {"implicax", "implicax_flax", "implicax_haiku", "implicax_adapters", "jax", "jaxlib"}
    | {"flax", "haiku", "equinox", "contextlib", "functools"}
)


def call_site() -> tuple[str, int, dict]:
    """(file, line, module globals) of the innermost frame outside `_LIBRARIES`: where the
    user called the solve (the callback that reports runs later, from XLA, with no such
    frame)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").split(".")[0] not in _LIBRARIES:
            return frame.f_code.co_filename, frame.f_lineno, frame.f_globals
        frame = frame.f_back
    return "<unknown>", 0, {}


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
