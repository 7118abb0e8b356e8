"""Flax NNX adapter for implicax: ``implicax_flax.nnx.DEQ``.

Example::

    from flax import nnx
    import implicax
    from implicax_flax.nnx import DEQ

    class Cell(nnx.Module):
        def __init__(self, n, rngs):
            self.linear = nnx.Linear(n, n, rngs=rngs)
            self.norm = nnx.LayerNorm(n, rngs=rngs)

        def __call__(self, z, x):
            return self.norm(nnx.tanh(self.linear(z) + x))

    layer = DEQ(Cell(16, nnx.Rngs(0)), solver=implicax.Anderson(max_steps=50))
    z_star = layer(x)          # also under nnx.jit, nnx.grad, with nnx.Optimizer
    layer.stats.get_value()    # SolveStats of the last call
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.errors import TraceContextError
from implicax_adapters import (
    check_diagnostics,
    deq_diagnostics,
    deq_initial_state,
    naming_the_cell,
)

import implicax
from implicax import FailurePolicy

__all__ = ["DEQ", "DiagnosticVariable", "SolveStatsVariable"]

PyTree = Any


def _stats_float() -> Any:
    """The stored residual_norm's dtype: the default float (float64 with x64 on), not weak."""
    return jnp.empty(()).dtype


class SolveStatsVariable(nnx.Variable):
    """Holds the `implicax.SolveStats` of a `DEQ`'s last forward solve (not a parameter)."""


class DiagnosticVariable(nnx.Variable):
    """Holds a `DEQ`'s last Jacobian penalty or spectral radius at z* (not a parameter)."""


class DEQ(nnx.Module):
    """Deep equilibrium layer (Flax NNX): returns z* with z* = cell(z*, x).

    The equilibrium is found by `implicax.fixed_point_solve` (fixed-point iteration by default)
    starting from ``z0`` (zeros shaped like ``x`` when omitted). Its derivatives with respect to
    the cell's parameters and to ``x`` come from the implicit function theorem,
    (I − ∂cell/∂z)·ż = ∂cell/∂θ·θ̇, solved by ``linear_solver`` at z*, to any order; the
    derivative with respect to ``z0`` is zero. The cell is split into a graph definition and
    its state (`nnx.split`) so the solver sees a pure function of the state; the layer works
    with `nnx.jit`, `nnx.grad`, `nnx.value_and_grad` and `nnx.Optimizer`, and, through
    `nnx.split` / `nnx.merge`, under any JAX transformation.

    Statistics: ``return_stats=True`` returns ``(z*, stats)``, the forward solve's
    `implicax.SolveStats` (steps, residual norm, converged). The layer also keeps them in
    ``layer.stats`` (a `SolveStatsVariable`), updated by every call made where NNX lets the
    layer's state change: eagerly and under `nnx.jit`, `nnx.grad`, `nnx.value_and_grad` and
    the like. A layer rebuilt by `nnx.merge` outside a JAX transformation (``jax.grad``,
    ``jax.jit``, ...) and called inside it leaves ``layer.stats`` as it was (NNX forbids that
    update; use ``return_stats=True`` there). Under ``nnx.vmap`` with the layer's state
    broadcast (``in_axes=None``) the stats are batched and cannot be stored: build the layer
    with ``store_stats=False`` and use ``return_stats=True``. The adjoint solve's statistics
    go to a probe: ``layer(x, adjoint_stats=probe)``, see `implicax.stats_probe`.

    Training diagnostics at z*, on request: with ``penalty_samples=k`` each call stores
    `implicax.jacobian_penalty` (k samples) in ``layer.jacobian_penalty`` (a
    `DiagnosticVariable`; read inside the loss, ``layer.jacobian_penalty.get_value()`` is
    differentiable), and with ``radius_steps=k`` `implicax.spectral_radius` (k power
    iterations) in ``layer.spectral_radius``. Their random vectors come from ``rngs``
    (its ``jacobian`` stream, else its default one), which they then require.

    Randomness and state: every evaluation of the cell during one solve starts from the same
    state, so a ``Dropout`` with its own ``rngs`` keeps one fixed mask while the solver iterates
    (a deterministic map, whose fixed point and implicit derivative are exact for that mask),
    and a training-mode ``BatchNorm`` normalises each iterate by that iterate's batch statistics
    (which makes the map a function of the whole batch); the iterates' state updates are
    discarded. When the cell holds any non-parameter state, it is then called once more at
    z*, with the same state as the iterates (so the same dropout mask): that call advances the
    random streams (a new mask on the next call) and updates BatchNorm's running averages from
    the equilibrium. ``layer.eval()`` / ``layer.train()`` switch the cell's modes as usual.

    Args:
        cell: an `nnx.Module` (or any NNX graph node callable as ``cell(z, x)``) returning an
            array (or pytree) like z.
        solver: forward solver; None for `implicax.fixed_point_solve`'s default
            (`FixedPointIteration`).
        linear_solver: solver for the tangent and adjoint systems; None for
            `implicax.fixed_point_solve`'s default.
        on_failure: ``"warn"``, ``"nan"``, ``"raise"`` or ``"ignore"``, or one per phase
            (``{"forward": ..., "derivative": ...}``); see `implicax.fixed_point_solve`.
        store_stats: keep the last solve's statistics in ``layer.stats``.
        penalty_samples: Hutchinson samples of the stored Jacobian penalty (0: none).
        radius_steps: power iterations of the stored spectral radius (0: none).
        rngs: an `nnx.Rngs` for those estimates' random vectors.
    """

    def __init__(
        self,
        cell: nnx.Module,
        solver: Any = None,
        linear_solver: Any = None,
        *,
        on_failure: FailurePolicy | Mapping[str, FailurePolicy] = "warn",
        store_stats: bool = True,
        penalty_samples: int = 0,
        radius_steps: int = 0,
        rngs: nnx.Rngs | None = None,
    ):
        if not callable(cell) or not nnx.graph.is_graph_node(cell):
            raise TypeError(
                "DEQ: cell must be an nnx.Module (or another NNX graph node) callable as "
                f"cell(z, x), got {cell!r}."
            )
        penalty_samples, radius_steps = check_diagnostics(penalty_samples, radius_steps)
        if (penalty_samples or radius_steps) and not isinstance(rngs, nnx.Rngs):
            raise TypeError(
                "DEQ: penalty_samples and radius_steps draw random vectors: pass "
                f"rngs=nnx.Rngs(jacobian=0) (an nnx.Rngs), got rngs={rngs!r}."
            )
        self.cell = cell
        self.penalty_samples = penalty_samples
        self.radius_steps = radius_steps
        self.rngs = rngs if penalty_samples or radius_steps else None
        if penalty_samples:
            self.jacobian_penalty = DiagnosticVariable(jnp.full((), jnp.nan, _stats_float()))
        if radius_steps:
            self.spectral_radius = DiagnosticVariable(jnp.full((), jnp.nan, _stats_float()))
        self.solver = solver
        self.linear_solver = linear_solver
        self.on_failure: FailurePolicy | Mapping[str, FailurePolicy] = on_failure
        self.store_stats = store_stats
        self.stats = SolveStatsVariable(
            implicax.SolveStats(
                steps=jnp.zeros((), jnp.int32),
                residual_norm=jnp.full((), jnp.nan, _stats_float()),
                converged=jnp.zeros((), jnp.bool_),
                diverged=jnp.zeros((), jnp.bool_),
                inner_failures=jnp.zeros((), jnp.int32),
            )
        )

    def __call__(
        self,
        x: PyTree,
        z0: PyTree | None = None,
        *,
        return_stats: bool = False,
        adjoint_stats: jax.Array | None = None,
    ) -> PyTree | tuple[PyTree, implicax.SolveStats]:
        """Solve z* = cell(z*, x).

        Args:
            x: the layer's input (the cell's second argument).
            z0: initial guess for z*; zeros shaped like ``x`` when None.
            return_stats: also return the forward solve's `implicax.SolveStats`.
            adjoint_stats: a probe (`implicax.stats_probe`) for the adjoint solve's
                statistics.

        Returns:
            z*, or ``(z*, stats)`` when ``return_stats`` is True.
        """
        z0 = deq_initial_state(x, z0)
        graphdef, params, rest = nnx.split(self.cell, nnx.Param, ...)

        # All of the cell's state goes in through the solve's params, none by closure: implicax
        # hoists only floating-point closed-over tracers, and PRNG keys and counts are not.
        def fn(z, arrays):
            params, rest, x = arrays
            # copy=True: fresh Variables, so the iterate's state updates stay local to it.
            return nnx.merge(graphdef, params, rest, copy=True)(z, x)

        arrays = (params, rest, x)
        with naming_the_cell(self.cell):
            z, stats = implicax.fixed_point_solve(
                fn,
                z0,
                arrays,
                solver=self.solver,
                linear_solver=self.linear_solver,
                on_failure=self.on_failure,
                return_stats=True,
                name=type(self).__name__,
                adjoint_stats=adjoint_stats,
            )
        if self.rngs is not None:
            key = self.rngs.jacobian()
            diagnostics = deq_diagnostics(
                fn, z, arrays, key, self.penalty_samples, self.radius_steps
            )
            for name, value in diagnostics.items():
                getattr(self, name).set_value(value.astype(_stats_float()))
        if jax.tree.leaves(rest):
            self.cell(z, x)  # advance the random streams, update running statistics at z*
        if self.store_stats:
            try:
                # One dtype whatever the solve's: a changing variable type would make the
                # first nnx.jit step compile twice.
                stored = stats._replace(residual_norm=stats.residual_norm.astype(_stats_float()))
                self.stats.set_value(stored)
            except TraceContextError:
                pass  # merged outside the transformation it is called in: see the docstring
        return (z, stats) if return_stats else z


# NNX's module metaclass hides the constructor's signature behind (*args, **kwargs).
_parameters = list(inspect.signature(DEQ.__init__).parameters.values())[1:]  # without self
DEQ.__signature__ = inspect.Signature(_parameters)  # type: ignore[attr-defined]
