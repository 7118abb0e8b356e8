"""What a solve reports (`SolveStats`) and what happens when it fails (the failure policy)."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import threading
import warnings
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._sharding import make_varying
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


def _barrier_forgets_solve_errors() -> None:
    """Let `jax.effects_barrier` forget a computation that failed with a SolveError.

    JAX keeps, per device, the runtime token of the last computation with host callbacks, and
    the barrier waits on each one; it forgets them only when all succeeded. A computation
    stopped by a "raise" (run asynchronously, as under pmap) leaves failed tokens that every
    later barrier raises again, until another computation replaces them on each device. The
    error reaches the caller through the solve's results, whose every leaf depends on the
    check; so the barrier waits on such a token and drops it. Other errors are left as JAX
    handles them. JAX internals: without them (another JAX), nothing is changed.
    """
    try:
        from jax._src import dispatch
    except ImportError:
        return
    tokens = getattr(dispatch, "RuntimeTokenSet", None)
    wait = getattr(tokens, "block_until_ready", None)
    if tokens is None or wait is None or getattr(wait, "_implicax", False):
        return

    def block_until_ready(self):
        for device, token in list(getattr(self, "output_runtime_tokens", {}).items()):
            try:
                token.block_until_ready()
            except Exception as error:  # noqa: BLE001 (re-raised unless it is a SolveError)
                if not _MESSAGE.search(str(error)):
                    raise
                del self.output_runtime_tokens[device]
        wait(self)

    block_until_ready._implicax = True
    tokens.block_until_ready = block_until_ready


_barrier_forgets_solve_errors()


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


def stats_probe(dtype: Any = jnp.float32) -> jax.Array:
    """A probe for the adjoint solve's statistics: zeros to pass as ``adjoint_stats=`` and to
    differentiate with respect to.

    Reverse mode cannot return values from the backward pass, so the adjoint linear solve of
    ``root_solve(..., adjoint_stats=probe)`` (or ``fixed_point_solve``) writes its statistics
    into the probe's cotangent instead; `read_probe` turns that cotangent into `SolveStats`::

        probe = implicax.stats_probe()
        grads, probe_bar = jax.grad(loss, argnums=(0, 1))(params, probe)  # loss passes probe
        implicax.read_probe(probe_bar).steps   # matrix-vector products of the adjoint solve

    The probe's value is never read and its cotangent does not depend on the loss. A probe
    passed to several solves (or, under `jax.vmap`, one probe shared by a batch) gets the sum
    of their records: `read_probe` then gives the total steps, the sum of residual norms, and
    ``converged`` only when every solve converged. For one record per batch element, batch
    the probe too (``jnp.zeros((n, 5))`` and ``in_axes=0``). A solve without a probe, or with
    one that is not differentiated, computes nothing extra.
    """
    return jnp.zeros(len(SolveStats._fields), dtype)


def probe_record(stats: SolveStats, dtype: Any) -> jax.Array:
    """The record a solve adds to its probe's cotangent: (steps, residual norm, not converged,
    diverged, inner failures), as floats that sum meaningfully over solves."""
    fields = (stats.steps, stats.residual_norm, ~stats.converged, stats.diverged)
    return jnp.stack([jnp.asarray(f).astype(dtype) for f in (*fields, stats.inner_failures)])


def read_probe(cotangent: jax.Array) -> SolveStats:
    """The `SolveStats` recorded in a probe's cotangent (see `stats_probe`); leading axes (a
    batch of probes) are kept."""
    cotangent = jnp.asarray(cotangent)
    if cotangent.shape[-1:] != (len(SolveStats._fields),):
        raise ValueError(
            f"read_probe expects the cotangent of an implicax.stats_probe() (last axis of "
            f"size {len(SolveStats._fields)}), got an array of shape {cotangent.shape}."
        )
    steps, residual_norm, failures, diverged, inner_failures = jnp.moveaxis(cotangent, -1, 0)
    return SolveStats(
        jnp.round(steps).astype(jnp.int32),
        residual_norm,
        failures == 0,
        diverged > 0,
        jnp.round(inner_failures).astype(jnp.int32),
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
    # Under pmap or shard_map, every device must stop at a failed "raise" (see _mapped_axes).
    axes = _mapped_axes() if on_failure == "raise" else ()
    devices = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)

    def report(converged, diverged, steps, residual, failed_devices=None):
        converged = np.asarray(converged)
        detail = ""
        if not converged.all():
            failed = int(converged.size - converged.sum())
            reason = " (it diverged: a NaN or inf appeared)" if np.any(diverged) else ""
            detail = (
                f"{message} for {failed} of {converged.size} batch elements{reason}"
                if converged.size > 1
                else f"{message} ({_steps(steps)}residual {float(np.max(residual)):.3g}){reason}"
            )
        if failed_devices is not None:  # some device failed: every device raises
            mapped = f"{int(failed_devices)} of {devices} devices"
            detail = (
                f"{detail}; it failed on {mapped}"
                if detail
                else f"{message} on {mapped} (this device's solve converged)"
            )
        if detail:
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
        report,
        (x, stats),
        stats.converged,
        stats.diverged,
        stats.steps,
        stats.residual_norm,
        axes=axes,
    )


def _steps(steps) -> str:
    steps = int(np.max(steps))
    return "" if steps < 0 else f"{steps} steps, "  # −1: a callable solver's, not counted


_NESTING = threading.local()


@contextlib.contextmanager
def tracing_solve():
    """Marks the tracing of one solve (its forward pass or its derivative rule): a solve
    traced inside another is nested (`_mapped_axes`)."""
    _NESTING.depth = getattr(_NESTING, "depth", 0) + 1
    try:
        yield
    finally:
        _NESTING.depth -= 1


def _mapped_axes() -> tuple:
    """The pmap or shard_map axes over which a "raise" check decides for all devices at once.

    Each device checks its own solve. If one device stopped at its error while the others went
    on, they would wait for it in the next collective (a `pmean` of gradients) until XLA aborts
    the process. So the failure flag is first summed over the manual mesh axes (pmap, too, is
    a shard_map in this JAX): every device takes the same branch and raises. A solve nested in
    another one's fn (or derivative) runs inside that solve's loops, whose trip counts differ
    between devices; a collective there would itself hang, so it checks for its device alone.
    """
    if getattr(_NESTING, "depth", 0) > 1:
        return ()
    return tuple(sorted(jax.sharding.get_abstract_mesh().manual_axes, key=str))


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


def _report_if_failed(
    report, tree: PyTree, converged: jax.Array, *args: jax.Array, axes: tuple = ()
) -> PyTree:
    """Return tree, after ``report(converged, *args)`` has run on the host if some element
    failed; with mapped `axes`, after ``report(converged, *args, failed_devices)`` has run on
    every device if some element of some device failed.

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
        ok = jnp.all(values[0])
        if axes:  # one all-reduce of a flag: how many devices failed
            failed = lax.psum(make_varying((~ok).astype(jnp.int32), frozenset(axes)), axes)
            ok, values = failed == 0, (*values, failed)
        return lax.cond(
            ok,
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
