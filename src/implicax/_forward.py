"""The forward-solver protocol and its one driver loop.

A forward solver is an immutable configuration with two hooks over a state of its own:
``init(problem, x0) -> state`` and ``step(problem, state) -> (state, Progress)``. The driver,
`AbstractForwardSolver.solve`, owns everything else: the loop, step counting, ``max_steps``,
the stopping test (`_termination`), divergence detection, mesh-axis types and `SolveStats`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._failure import SolveStats, make_stats
from ._options import (
    check_function_and_tolerances,
    dynamic_field,
    register,
)
from ._sharding import tree_varying_axes, while_loop
from ._termination import (
    Tolerances,
    forward_test,
    forward_verdict,
    resolve,
    root_code,
    start_converged,
)
from ._tree import PyTree, all_finite, max_abs, real_dtype, tree_sub, tree_zeros_like


@dataclasses.dataclass(frozen=True)
class Problem:
    """One equation in both views: F(x) = 0 and x = g(x), with g(x) = x − F(x).

    For `fixed_point_solve` g is the user's map and F(x) = x − g(x); for `root_solve` F is the
    user's residual. Each method uses the view it needs without rounding the other.
    """

    function: Callable[[PyTree], PyTree]
    fixed_point: bool
    like: PyTree = None  # shapes and dtypes of x (`jax.ShapeDtypeStruct`s), set by the driver

    def map(self, x: PyTree) -> PyTree:
        """g(x): the fixed-point map."""
        out = self.function(x)
        return out if self.fixed_point else tree_sub(x, out)

    def residual(self, x: PyTree) -> PyTree:
        """F(x): zero at the solution."""
        out = self.function(x)
        return tree_sub(x, out) if self.fixed_point else out


class Progress(NamedTuple):
    """What one step of a forward solver tells the driver.

    Attributes:
        x: the solution if the solve stops now.
        residual: F at the iterate the step evaluated (x itself, or for methods that
            evaluate before they move, the iterate before x).
        step: the step's full, undamped move in x's units (the stopping test of a root
            problem uses it; damping must not loosen the test).
        inner_failed: whether an inner solve of the step failed (Newton's linear solve).
    """

    x: PyTree
    residual: PyTree
    step: PyTree
    inner_failed: Any = False


class AbstractForwardSolver(Tolerances, abc.ABC):
    """Base class of every forward solver, built-in or yours.

    Subclass it as a frozen dataclass, add your options as fields, and write two hooks:

    - ``init(problem, x0) -> state``: any pytree of arrays (e.g. a NamedTuple);
    - ``step(problem, state) -> (state, Progress)``: one iteration.

    `problem.residual(x)` is F(x) and `problem.map(x)` is g(x) = x − F(x). The inherited
    `solve` runs the loop, stops on the common test (see ``implicax._termination``) or after
    ``max_steps`` steps, detects NaN and inf, and returns ``(x, SolveStats)``; the failure
    policy and the implicit derivative come from `root_solve` / `fixed_point_solve`. The
    fields ``rtol``, ``atol`` and ``max_steps`` are the solver's pytree leaves (they may be
    traced arrays); the other fields are static.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register(cls)

    @abc.abstractmethod
    def init(self, problem: Problem, x0: PyTree) -> Any:
        """The state before the first step."""

    @abc.abstractmethod
    def step(self, problem: Problem, state: Any) -> tuple[Any, Progress]:
        """One iteration: the new state and what it achieved."""

    def solve(self, problem: Problem, x0: PyTree) -> tuple[PyTree, SolveStats]:
        """Run the solver from x0; the one loop every forward solver shares."""
        like = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), x0)
        problem = dataclasses.replace(problem, like=like)
        rtol, atol = self.resolve(x0, atol_default_is_rtol=True)
        max_steps = self.step_limit()
        dtype = real_dtype(x0)
        if problem.fixed_point:
            initial = jnp.zeros((), dtype)  # unused: a fixed point's test needs no start
            code = jnp.ones((), jnp.float32)  # not yet converged
        else:
            initial = max_abs(problem.residual(x0)).astype(dtype)
            code = root_code(start_converged(initial, initial, rtol, atol), initial)
        # The loop carries the test's raw code and size (see `forward_test`), which the
        # condition and the exit read: scalars the body derives from them would each cost
        # XLA a kernel of its own to compile.
        zero = jnp.zeros((), jnp.int32)
        carry = (self.init(problem, x0), x0, code, initial, zero, zero)  # steps, failures

        def cond(carry):
            _, _, code, _, steps, _ = carry
            return (code == 1) & (steps < max_steps)

        def body(carry):
            state, _, _, _, steps, failures = carry
            state, progress = self.step(problem, state)
            code, size = forward_test(
                problem.fixed_point,
                progress.residual,
                progress.step,
                progress.x,
                initial,
                rtol,
                atol,
            )
            failures = failures + jnp.asarray(progress.inner_failed, jnp.int32)
            return state, progress.x, code, size.astype(dtype), steps + 1, failures

        axes = tree_varying_axes(x0)
        _, x, code, size, steps, failures = while_loop(cond, body, carry, axes)
        converged, finite, size = forward_verdict(code, size)
        finite = finite & all_finite(x)  # x itself is checked once, at exit
        return x, make_stats(steps, size, converged & finite, ~finite, failures)


@dataclasses.dataclass(frozen=True)
class CallableSolver:
    """A forward solver of yours given as a function, ``function(fn, x0, params) -> x``, and
    the tolerance its result is checked against.

    A bare callable passed as ``solver=`` is wrapped in ``CallableSolver(callable)``; wrap it
    yourself to set the tolerance. The function is never differentiated (it may be a host
    callback, a closed form or another library's loop). Its result x is converged when it is
    finite and passes the test of the built-in solvers' last step: for a fixed point
    |x_i − fn(x)_i| ≤ atol + rtol·|x_i| for every i; for a root
    max|fn(x)| ≤ atol + rtol·max|fn(x0)| (with a non-finite fn(x0) counting as 0). The defaults
    are those of the built-in solvers (rtol = eps**(2/3) of x0's dtype, atol = rtol); the
    tolerances may be traced arrays. `SolveStats.steps` is −1.

    Attributes:
        function: the solver, ``function(fn, x0, params) -> x`` with x like x0.
        rtol: relative tolerance of the check (None: the default).
        atol: absolute tolerance of the check (None: equal to rtol).
    """

    function: Callable
    rtol: Any = dynamic_field(None)
    atol: Any = dynamic_field(None)

    def __post_init__(self):
        check_function_and_tolerances(self, "function(fn, x0, params) -> x")

    def stats(self, problem: Problem, x0: PyTree, x: PyTree) -> SolveStats:
        """Check the function's result x against the tolerance."""
        rtol, atol = resolve(self.rtol, self.atol, x0, atol_default_is_rtol=True)
        dtype = real_dtype(x0)
        initial = jnp.zeros((), dtype)
        if not problem.fixed_point:
            initial = max_abs(problem.residual(x0)).astype(dtype)
            initial = jnp.where(jnp.isfinite(initial), initial, 0)
        # The test of the driver's last step; a callable reports no step, so that part
        # (the step's size for a root) checks zeros and passes.
        code, size = forward_test(
            problem.fixed_point, problem.residual(x), tree_zeros_like(x), x, initial, rtol, atol
        )
        converged, finite, size = forward_verdict(code, size)
        finite = finite & all_finite(x)
        return make_stats(-1, size.astype(dtype), converged & finite, ~finite)


register(CallableSolver)
