"""The entry points, `root_solve` and `fixed_point_solve`: check the inputs, make closed-over
arrays explicit, and call the implicit-function rule (`_implicit`)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
from jax import lax

from . import _cache
from ._failure import (
    FailurePolicy,
    SolveStats,
    call_site,
    check_policy,
    reraise_solve_error,
    tracing_solve,
)
from ._forward import AbstractForwardSolver, CallableSolver
from ._implicit import Spec, solve, unpack
from ._krylov import BiCGStab
from ._linear import AbstractLinearSolver, as_linear_solver
from ._options import check_instance
from ._sharding import make_varying, varying_axes
from ._solvers import FixedPointIteration, Newton
from ._tree import PyTree, check_floating, check_like

ForwardSolver = AbstractForwardSolver | CallableSolver | Callable[..., Any]
LinearSolver = AbstractLinearSolver | Callable[..., Any]


def _closure_convert(fn, x0, params):
    """fn as ``function(x, params, *consts)``, with every array fn closes over made an argument;
    also the closed-over arrays, fn's output shapes and its jaxpr.

    The custom_jvp rule must see closed-over arrays as inputs to differentiate with respect to
    them. `jax.closure_convert` hoists only values that can carry a tangent: integer arrays and
    PRNG keys closed over inside an outer `jit` would stay in the function as stale tracers and
    leak when that `jit` is differentiated, so all constants of fn's jaxpr are hoisted here.
    """
    # A fresh wrapper each call: `make_jaxpr` caches traces by function identity, which would
    # keep the values of globals and closed-over arrays from fn's first call.
    with tracing_solve():  # a solve in fn is nested in this one
        closed, out_shape = jax.make_jaxpr(lambda x, p: fn(x, p), return_shape=True)(x0, params)
    jaxpr, consts, out_tree = closed.jaxpr, list(closed.consts), jax.tree.structure(out_shape)

    def function(x, params, *consts):
        out = jax.core.eval_jaxpr(jaxpr, list(consts), *jax.tree.leaves((x, params)))
        return jax.tree.unflatten(out_tree, out)

    return function, consts, out_shape, jaxpr


def _check_x0(x0: PyTree) -> PyTree:
    x0 = jax.tree.map(jnp.asarray, x0)
    if not jax.tree.leaves(x0):
        raise ValueError("x0 must contain at least one array; got an empty pytree.")
    check_floating(x0, "x0")
    return x0


def _check_probe(entry: str, probe: Any) -> jax.Array | None:
    if probe is None:
        return None
    shape, dtype = jnp.shape(probe), jnp.result_type(probe)
    if shape != (len(SolveStats._fields),) or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{entry}: adjoint_stats must be a probe made by implicax.stats_probe() (a float "
            f"array of shape ({len(SolveStats._fields)},)), got {shape} {dtype}. Under vmap, "
            "batch the probe along with the solve."
        )
    return jnp.asarray(probe)


_WITHOUT_AUX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _without_aux(fn: Callable) -> Callable:
    """fn's first output, as a function that lives as long as fn (so that the compiled solves
    cached under it, see `_cache`, are found again on the next call)."""
    try:
        return _WITHOUT_AUX[fn]
    except (KeyError, TypeError):  # not seen yet, or fn cannot be held weakly
        pass

    def without_aux(x, params):
        return fn(x, params)[0]

    try:
        _WITHOUT_AUX[fn] = without_aux
    except TypeError:
        pass
    return without_aux


def _check_pair(entry: str, out: Any) -> None:
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise TypeError(
            f"{entry}: with has_aux=True, fn(x, params) must return a pair (out, aux), out "
            f"like x; got {jax.tree.structure(out)}."
        )


def _forward_solver(entry: str, solver: Any, default: AbstractForwardSolver):
    if solver is None:
        return default
    if isinstance(solver, (AbstractForwardSolver, CallableSolver)):
        return solver
    check_instance(entry, "solver", solver)
    if callable(solver):
        return CallableSolver(solver)
    raise TypeError(
        f"{entry}: solver must be an implicax solver (FixedPointIteration, Anderson, Broyden, "
        f"Newton, or a subclass of implicax.AbstractForwardSolver) or a callable "
        f"solver(fn, x0, params) -> x (optionally wrapped in implicax.CallableSolver), got "
        f"{solver!r}."
    )


def _implicit_solve(
    fn,
    x0,
    params,
    *,
    fixed_point,
    solver,
    linear_solver,
    on_failure,
    return_stats,
    name,
    default_solver,
    adjoint_stats,
    has_aux=False,
):
    entry = "fixed_point_solve" if fixed_point else "root_solve"
    if not callable(fn):
        raise TypeError(f"{entry}: fn must be callable as fn(x, params), got {fn!r}.")
    if has_aux:
        x0 = _check_x0(x0)
        _check_pair(entry, jax.eval_shape(fn, x0, params))
        result, stats = _implicit_solve(
            _without_aux(fn),
            x0,
            params,
            fixed_point=fixed_point,
            solver=solver,
            linear_solver=linear_solver,
            on_failure=on_failure,
            return_stats=True,
            name=name,
            default_solver=default_solver,
            adjoint_stats=adjoint_stats,
        )
        # aux at the solution, outside the implicit rule: differentiable through x* and params.
        at_solution: Any = fn(result, params)
        result = (result, at_solution[1])
        return (result, stats) if return_stats else result
    solver = _forward_solver(entry, solver, default_solver)
    linear_solver = as_linear_solver(BiCGStab() if linear_solver is None else linear_solver, entry)
    on_failure = check_policy(on_failure)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{entry}: name must be a string or None, got {name!r}.")
    x0 = _check_x0(x0)
    probe = _check_probe(entry, adjoint_stats)
    function, consts, out, jaxpr = _closure_convert(fn, x0, params)
    what = "fn(x, params)" + ("" if fixed_point else " (the residual)")
    check_like(out, x0, what, "x0")
    # Inside shard_map, fn(x0, params) may vary over more mesh axes than x0 (per-device params,
    # replicated x0). Give x0 the output's type so the loop carry keeps one type, and convert
    # fn again for the type it will be called with.
    varying = jax.tree.map(lambda a, o: make_varying(a, varying_axes(o)), x0, out)
    if any(v is not a for v, a in zip(jax.tree.leaves(varying), jax.tree.leaves(x0))):
        x0 = varying
        function, consts, out, jaxpr = _closure_convert(fn, x0, params)
    leaves, treedef = jax.tree.flatten((solver, linear_solver))
    # Only limits given as arrays travel as operands (traced, no recompile when they change).
    # Python numbers stay constants of the spec: inside shard_map, a replayed jaxpr whose
    # constants became operands would meet them with other varying-axes types.
    traced = tuple(isinstance(leaf, jax.Array) for leaf in leaves)
    constants = tuple(None if t else leaf for leaf, t in zip(leaves, traced))
    site = call_site()
    spec = Spec(function, fixed_point, (treedef, constants, traced), on_failure, site, name)
    limits = [lax.stop_gradient(leaf) for leaf, t in zip(leaves, traced) if t]
    trees = (jax.tree.structure((x0, params)), jax.tree.structure(out))
    config = (trees, fixed_point, treedef, constants, traced, on_failure, site[:2], name)
    compiled = _cache.compiled(
        functools.partial(solve, spec), fn, jaxpr, (solver, linear_solver), config
    )
    arguments = (limits, lax.stop_gradient(x0), params, consts, probe)
    if on_failure[0] == "raise" and not any(
        isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(arguments)
    ):
        try:  # outside jit: wait for the result, so that a failure raises here, as itself
            x, stats = jax.block_until_ready(compiled(*arguments))
        except jax.errors.JaxRuntimeError as error:
            reraise_solve_error(error)
            raise
    else:
        x, stats = compiled(*arguments)
    return (x, unpack(lax.stop_gradient(stats))) if return_stats else x


def root_solve(
    fn: Callable[[PyTree, PyTree], PyTree],
    x0: PyTree,
    params: PyTree = None,
    *,
    solver: ForwardSolver | None = None,
    linear_solver: LinearSolver | None = None,
    on_failure: FailurePolicy | Mapping[str, FailurePolicy] = "warn",
    return_stats: bool = False,
    name: str | None = None,
    adjoint_stats: jax.Array | None = None,
    has_aux: bool = False,
) -> PyTree | tuple[PyTree, SolveStats]:
    """Solve fn(x, params) = 0 for x, differentiably in params (and in arrays fn closes over).

    The derivative follows from the implicit function theorem: with F = fn and x* the
    solution, ∂F/∂x·ẋ = −∂F/∂θ·θ̇, solved by `linear_solver` without forming ∂F/∂x (reverse mode
    solves the transposed system). It is exact at the solution whatever the forward solver did,
    zero with respect to x0, and available to any order in forward and reverse mode.

    Args:
        fn: the residual, ``fn(x, params)``, returning a pytree with the structure, shapes and
            dtypes of x.
        x0: initial guess (pytree of floating or complex arrays); the solution keeps its
            dtypes. For complex leaves, fn must be holomorphic in x (no conj, abs, real or
            imag of x; params may enter in any way), and real leaves' residuals may depend
            on real leaves only: the tangent and adjoint systems are solved as
            complex-linear. Otherwise those solves are reported as not converged (never
            silently wrong); pass such an x as a pair of real arrays (real, imaginary).
        params: any pytree of arrays that fn depends on.
        solver: forward solver: `Newton` (default), `Broyden`, `Anderson`,
            `FixedPointIteration`, your subclass of `AbstractForwardSolver`, or any callable
            ``solver(fn, x0, params) -> x`` (never differentiated, so it may be a host
            callback). Its tolerances may be traced arrays.
        linear_solver: for the tangent and adjoint systems: `BiCGStab` (default), `GMRES`,
            `CG` (for symmetric, or Hermitian, positive definite ∂F/∂x), `Neumann`, `Dense`, your subclass of
            `AbstractLinearSolver`, or any callable ``linear_solver(matvec, b) -> x`` on
            pytrees.
        on_failure: when a forward or linear solve does not converge: ``"warn"`` (default; a
            RuntimeWarning from a host callback, the result is returned as is), ``"nan"`` (NaN
            solution or derivative, per batch element under vmap), ``"raise"``
            (`SolveError` outside jit, an error carrying its message inside; under vmap one
            failure fails the whole batch, under pmap or shard_map every device) or
            ``"ignore"``; or a policy for each phase, e.g.
            ``{"forward": "raise", "derivative": "ignore"}`` ("derivative": the tangent and
            adjoint linear solves; a phase left out is "warn").
        return_stats: also return the forward solve's `SolveStats`.
        name: the solve's name in failure reports ("the forward solve of 'encoder' ...").
        adjoint_stats: a probe from `implicax.stats_probe`, into whose cotangent reverse mode
            writes the adjoint linear solve's `SolveStats` (read them with
            `implicax.read_probe`); None (default) records nothing, at no cost.
        has_aux: fn returns a pair ``(residual, aux)``; the result is then ``(x, aux)``, with
            aux evaluated at the solution (one more call of fn) and differentiable through it.

    Returns:
        x with fn(x, params) ≈ 0 (``(x, aux)`` with has_aux), or ``(that, stats)`` when
        return_stats is True.
    """
    return _implicit_solve(
        fn,
        x0,
        params,
        fixed_point=False,
        solver=solver,
        linear_solver=linear_solver,
        on_failure=on_failure,
        return_stats=return_stats,
        name=name,
        adjoint_stats=adjoint_stats,
        has_aux=has_aux,
        default_solver=Newton(),
    )


def fixed_point_solve(
    fn: Callable[[PyTree, PyTree], PyTree],
    x0: PyTree,
    params: PyTree = None,
    *,
    solver: ForwardSolver | None = None,
    linear_solver: LinearSolver | None = None,
    on_failure: FailurePolicy | Mapping[str, FailurePolicy] = "warn",
    return_stats: bool = False,
    name: str | None = None,
    adjoint_stats: jax.Array | None = None,
    has_aux: bool = False,
) -> PyTree | tuple[PyTree, SolveStats]:
    """Solve x = fn(x, params) for x, differentiably in params (and in arrays fn closes over).

    The derivative is that of the root of F(x) = x − fn(x, params):
    (I − ∂fn/∂x)·ẋ = ∂fn/∂θ·θ̇, and in reverse mode λ(I − ∂fn/∂x) = x̄, solved by
    `linear_solver` from the solution alone (no backpropagation through the iterations).

    Args:
        fn: the map, ``fn(x, params)``, returning a pytree like x.
        x0: initial guess (floating or complex arrays); the solution keeps its structure
            and dtypes. For complex leaves fn must be holomorphic in x; see `root_solve`.
        params: any pytree of arrays that fn depends on.
        solver: `FixedPointIteration` (default), `Anderson`, `Broyden`, `Newton`, your
            subclass of `AbstractForwardSolver`, or any callable ``solver(fn, x0, params) -> x``.
        linear_solver: `BiCGStab` (default), `GMRES`, `Neumann` (fax's two-phase adjoint
            iteration; needs a contraction), `Dense`, `CG` (for symmetric positive definite
            I − ∂fn/∂x), your subclass of `AbstractLinearSolver`, or any callable
            ``linear_solver(matvec, b) -> x``.
        on_failure: ``"warn"`` (default), ``"nan"``, ``"raise"`` or ``"ignore"``, or one
            per phase (``{"forward": ..., "derivative": ...}``); see `root_solve`.
        return_stats: also return the forward solve's `SolveStats`.
        name: the solve's name in failure reports.
        adjoint_stats: a probe for the adjoint solve's statistics; see `root_solve`.
        has_aux: fn returns ``(map value, aux)``; the result is ``(x, aux)``, see `root_solve`.

    Returns:
        x with x ≈ fn(x, params) (``(x, aux)`` with has_aux), or ``(that, stats)`` when
        return_stats is True.
    """
    return _implicit_solve(
        fn,
        x0,
        params,
        fixed_point=True,
        solver=solver,
        linear_solver=linear_solver,
        on_failure=on_failure,
        return_stats=return_stats,
        name=name,
        adjoint_stats=adjoint_stats,
        has_aux=has_aux,
        default_solver=FixedPointIteration(),
    )
