"""Haiku adapter for implicax: a deep equilibrium (DEQ) layer as one module.

Example::

    import haiku as hk
    import implicax
    from implicax_haiku import DEQ

    def forward(x):
        cell = lambda z, x: hk.LayerNorm(-1, True, True)(jnp.tanh(hk.Linear(16)(z) + x))
        return DEQ(cell, solver=implicax.Anderson(max_steps=50))(x)

    model = hk.transform(forward)
    params = model.init(jax.random.key(0), x)
    z_star = model.apply(params, None, x)   # no rng needed: the cell draws no random numbers
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import haiku as hk
import jax
from implicax_adapters import (
    check_diagnostics,
    deq_diagnostics,
    deq_initial_state,
    naming_the_cell,
)

import implicax
from implicax import FailurePolicy

__all__ = ["DEQ"]

PyTree = Any


class DEQ(hk.Module):
    """Deep equilibrium layer (Haiku): returns z* with z* = cell(z*, x).

    The equilibrium is found by `implicax.fixed_point_solve` (fixed-point iteration by default)
    starting from ``z0`` (zeros shaped like ``x`` when omitted). Its derivatives with respect to
    the cell's parameters and to ``x`` come from the implicit function theorem,
    (I − ∂cell/∂z)·ż = ∂cell/∂θ·θ̇, solved by ``linear_solver`` at z*, to any order and under
    jit, vmap, pmap and shard_map; the derivative with respect to ``z0`` is zero.

    The cell, any callable ``cell(z, x) -> z`` that may create parameters and state (a module
    instance or a function), is wrapped in its own `hk.transform_with_state`, whose
    ``init`` is lifted (`hk.lift_with_state`) so that its parameters and state live in the
    enclosing transform under ``"<this module's name>/cell/..."``. The solver then iterates the
    pure ``apply``. Calling one DEQ instance several times reuses its parameters. Usable in
    `hk.transform` and `hk.transform_with_state` (the latter when the cell has state).

    Statistics: ``return_stats=True`` returns ``(z*, stats)`` with the forward solve's
    `implicax.SolveStats` (steps, residual norm, converged). The adjoint solve's statistics
    go to a probe: ``DEQ(...)(x, adjoint_stats=probe)``, see `implicax.stats_probe`.

    Training diagnostics at z*, on request, as state of this module (so under
    `hk.transform_with_state`): with ``penalty_samples=k`` each call sets
    `implicax.jacobian_penalty` (k samples; differentiable, to add to the loss) as state
    ``"jacobian_penalty"``, and with ``radius_steps=k`` `implicax.spectral_radius` (k power
    iterations) as ``"spectral_radius"``; read them from the state ``apply`` returns, e.g.
    ``state["deq"]["jacobian_penalty"]``. Their random vectors take a key from
    `hk.next_rng_key`, so ``init`` and ``apply`` then need one.

    Randomness (dropout): the layer takes a random key (`hk.maybe_next_rng_key`) only while
    initialising or when the cell's output depends on one, so ``apply(params, None, x)``
    works for cells that draw no random numbers. That one key is reused by every evaluation
    of the cell in the solve, so ``hk.dropout`` keeps one fixed mask while the solver
    iterates (a deterministic map, whose fixed point and implicit derivative are exact for
    that mask), and a new key on the next call draws a new mask.

    State (``hk.BatchNorm`` and other `hk.set_state` users): every iterate is evaluated from
    the same state and its state updates are discarded (a training-mode BatchNorm normalises
    each iterate by that iterate's batch statistics, which makes the map a function of the
    whole batch); then the cell is applied once more at z*, with the same key, and the state
    it sets (e.g. running averages from the equilibrium) is written to the enclosing
    transform. Without state, no extra evaluation happens.

    Args:
        cell: callable ``cell(z, x)`` returning an array (or pytree) like z.
        solver: forward solver; None for `implicax.fixed_point_solve`'s default
            (`FixedPointIteration`).
        linear_solver: solver for the tangent and adjoint systems; None for
            `implicax.fixed_point_solve`'s default.
        on_failure: ``"warn"``, ``"nan"``, ``"raise"`` or ``"ignore"``, or one per phase
            (``{"forward": ..., "derivative": ...}``); see `implicax.fixed_point_solve`.
        penalty_samples: Hutchinson samples of the Jacobian penalty state (0: none).
        radius_steps: power iterations of the spectral radius state (0: none).
        name: the module's name.
    """

    def __init__(
        self,
        cell: Callable[[PyTree, PyTree], PyTree],
        solver: Any = None,
        linear_solver: Any = None,
        *,
        on_failure: FailurePolicy | Mapping[str, FailurePolicy] = "warn",
        penalty_samples: int = 0,
        radius_steps: int = 0,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.penalty_samples, self.radius_steps = check_diagnostics(penalty_samples, radius_steps)
        if not callable(cell):
            raise TypeError(f"DEQ: cell must be callable as cell(z, x), got {cell!r}.")
        self.cell = cell
        self.solver = solver
        self.linear_solver = linear_solver
        self.on_failure: FailurePolicy | Mapping[str, FailurePolicy] = on_failure

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
        cell = hk.transform_with_state(lambda z, x: self.cell(z, x))
        lifted_init, updater = hk.lift_with_state(cell.init, allow_reuse=True, name="cell")
        init_rng = hk.maybe_next_rng_key() if hk.running_init() else None
        params, state = lifted_init(init_rng, z0, x)
        rng = hk.maybe_next_rng_key() if _uses_rng(cell.apply, params, state, z0, x) else None

        # Every array goes in through the solve's params, none by closure: implicax hoists only
        # floating-point closed-over tracers, and PRNG keys (or integer state) are not.
        def fn(z, arrays):
            params, state, rng, x = arrays
            return cell.apply(params, state, rng, z, x)[0]  # the iterate's state is dropped

        arrays = (params, state, rng, x)
        with naming_the_cell(self.cell):
            z, stats = implicax.fixed_point_solve(
                fn,
                z0,
                arrays,
                solver=self.solver,
                linear_solver=self.linear_solver,
                on_failure=self.on_failure,
                return_stats=True,
                name=self.module_name,
                adjoint_stats=adjoint_stats,
            )
        if self.penalty_samples or self.radius_steps:
            key = hk.next_rng_key()
            diagnostics = deq_diagnostics(
                fn, z, arrays, key, self.penalty_samples, self.radius_steps
            )
            for name, value in diagnostics.items():
                hk.set_state(name, value)
        if jax.tree.leaves(state):
            updater.update(cell.apply(params, state, rng, z, x)[1])  # state set at z*
        else:
            updater.ignore_update()
        return (z, stats) if return_stats else z


def _uses_rng(apply: Callable, params: PyTree, state: PyTree, z0: PyTree, x: PyTree) -> bool:
    """Whether the transformed cell's output depends on the random key it is given."""
    closed = jax.make_jaxpr(lambda key: apply(params, state, key, z0, x))(jax.random.key(0))
    key = closed.jaxpr.invars[0]
    return any(v is key for eqn in closed.jaxpr.eqns for v in eqn.invars) or any(
        v is key for v in closed.jaxpr.outvars
    )
