"""The stopping rule, in one place: tolerances, their defaults, and when a solve has converged.

``atol`` has one meaning everywhere: the absolute part of a test, in the units of the quantity
tested (x for a step, F for a root's residual, b for a linear residual). Its default differs by
kind, because only forward problems have a natural absolute scale:

- forward solvers: ``rtol=None`` is ``eps**(2/3)`` of the least precise dtype of x0, and
  ``atol=None`` equals rtol;
- linear solvers: ``rtol=None`` likewise (dtype of b), and ``atol=None`` is 0. The right-hand
  side is a tangent or a cotangent, whose scale is arbitrary (the cotangent of a batch-mean loss
  is tiny); an absolute floor at the forward tolerance cost a 10× larger gradient error.

Divergence, a non-finite iterate or residual, stops a solve and is reported apart from running
out of steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ._options import check_step_limit, check_tolerance, dynamic_field, set_checked
from ._tree import PyTree, all_within, least_precise_dtype, max_abs, real_dtype, within_code


def default_tolerance(dtype: Any) -> float:
    """The default rtol for a dtype: eps**(2/3).

    float64 → 3.7e-11, float32 → 2.4e-5, bfloat16 → 3.9e-2. Two thirds of the digits: tighter
    than sqrt(eps) so that derivatives (whose error is proportional to the forward residual)
    keep about as many digits as the solution, loose enough to be reachable in few steps.
    """
    return float(jnp.finfo(dtype).eps) ** (2 / 3)


def resolve(
    rtol: Any, atol: Any, like: PyTree, atol_default_is_rtol: bool
) -> tuple[jax.Array, jax.Array]:
    """(rtol, atol) for unknowns like `like`, defaults filled in: the default comes from its
    least precise dtype, and both are cast to the dtype its norms are computed in."""
    rtol = default_tolerance(least_precise_dtype(like)) if rtol is None else rtol
    if atol is None:
        atol = rtol if atol_default_is_rtol else 0.0
    dtype = real_dtype(like)
    return jnp.asarray(rtol).astype(dtype), jnp.asarray(atol).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """rtol, atol and max_steps: the fields every iterative solver shares.

    Each may be a Python number or a scalar array (traced under `jit`: changing it does not
    recompile). Values are checked when the solver is built; arrays only by shape and dtype.
    """

    rtol: Any = dynamic_field(None)
    atol: Any = dynamic_field(None)
    max_steps: Any = dynamic_field(256)

    def __post_init__(self):
        name = type(self).__name__
        set_checked(self, "rtol", check_tolerance(name, "rtol", self.rtol))
        set_checked(self, "atol", check_tolerance(name, "atol", self.atol))
        steps = check_step_limit(name, self.max_steps, allow_none=self._scaled_step_limit())
        set_checked(self, "max_steps", steps)

    def _scaled_step_limit(self) -> bool:
        """Whether max_steps=None is allowed (linear solvers scale it with the problem)."""
        return False

    def resolve(self, like: PyTree, atol_default_is_rtol: bool) -> tuple[jax.Array, jax.Array]:
        """(rtol, atol) for unknowns like `like`; see `resolve`."""
        return resolve(self.rtol, self.atol, like, atol_default_is_rtol)

    def step_limit(self) -> jax.Array:
        """max_steps as an int32 scalar (a Python int or an integer array of any width)."""
        return jnp.asarray(self.max_steps).astype(jnp.int32)


def forward_test(
    fixed_point: bool,
    residual: PyTree,
    step: PyTree,
    x: PyTree,
    initial_size: jax.Array,
    rtol: jax.Array,
    atol: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(code, size): whether a forward solve has converged at x, as a float32 code (0: it
    has, never for NaN; 1: not yet; 2: its residual is not finite), and the residual's
    max-abs, exact where code < 2 (`forward_verdict` reads both).

    ``residual`` is F at the iterate the solver last evaluated, ``step`` the solver's last
    full (undamped) step, and ``initial_size`` = max|F(x0)|.

    For a fixed point, F(x) = x − g(x) is itself a step, in the units of x:
    |F_i| ≤ atol + rtol·|x_i| for every i. A root's residual has units of its own (a gradient,
    a force), so two tests must hold: the step, in x's units, |step_i| ≤ atol + rtol·|x_i|,
    and the residual against where it started, max|F| ≤ atol + rtol·max|F(x0)|. The step test
    alone passes iterates that run away in small steps from a problem with no root; the
    residual test alone is loose after a start far from the root. Either way an exact zero
    residual is converged, also with atol = 0 where components of x are zero.
    """
    if fixed_point:
        # One NaN-safe pass decides convergence and finiteness; the size is one more plain
        # max (the old loop's two reductions), which may drop a NaN where code = 2.
        return within_code(residual, x, rtol, atol), max_abs(
            residual, finite=jnp.ones((), jnp.bool_)
        )
    size = max_abs(residual)
    converged = all_within(step, x, rtol, atol) & start_converged(size, initial_size, rtol, atol)
    return root_code(converged | (size == 0), size), size


def root_code(converged: jax.Array, size: jax.Array) -> jax.Array:
    """The code of `forward_test` for a root's test result and residual size."""
    return jnp.where(jnp.isfinite(size), jnp.where(converged, 0, 1), 2).astype(jnp.float32)


def forward_verdict(code: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(converged, finite, size) from `forward_test`'s code and size, the size NaN where the
    residual was not finite (unless it was inf)."""
    finite = code < 2
    return code == 0, finite, jnp.where(finite | (size == jnp.inf), size, jnp.nan)


def start_converged(size: jax.Array, initial_size: jax.Array, rtol, atol) -> jax.Array:
    """The root residual test, max|F| ≤ atol + rtol·max|F(x0)|; before the first step it is
    the only test, so a start within atol (or an exact root) stops at once."""
    return (size == 0) | (size <= atol + rtol * initial_size)


def linear_threshold(norm_b: jax.Array, rtol: jax.Array, atol: jax.Array) -> jax.Array:
    """A linear solve has converged when ‖b − A·x‖₂ ≤ atol + rtol·‖b‖₂."""
    return atol + rtol * norm_b
