"""Flax adapters for implicax: a deep equilibrium (DEQ) layer as one module.

``implicax_flax.DEQ`` is a `flax.linen` module; ``implicax_flax.nnx.DEQ`` is its Flax NNX
counterpart. Both solve z* = cell(z*, x) with `implicax.fixed_point_solve` and so inherit its
derivatives (implicit function theorem, any order, forward and reverse mode, any transform).

Example::

    import flax.linen as nn
    import implicax
    from implicax_flax import DEQ

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return nn.LayerNorm()(nn.tanh(nn.Dense(x.shape[-1])(z) + x))

    layer = DEQ(Cell(), solver=implicax.Anderson(max_steps=50))
    variables = layer.init(jax.random.key(0), x)
    z_star = layer.apply(variables, x)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
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


class DEQ(nn.Module):
    """Deep equilibrium layer (linen): returns z* with z* = cell(z*, x).

    The equilibrium is found by `implicax.fixed_point_solve` (fixed-point iteration by default)
    starting from ``z0`` (zeros shaped like ``x`` when omitted). Its derivatives with respect to
    the cell's parameters and to ``x`` come from the implicit function theorem,
    (I − ∂cell/∂z)·ż = ∂cell/∂θ·θ̇, solved by ``linear_solver`` at z* without backpropagating
    through the iterations; they exist to any order and under jit, vmap, pmap and shard_map.
    The derivative with respect to ``z0`` is zero.

    The cell is any linen module called as ``cell(z, x)`` and returning an array (or pytree)
    like z. Its variables are created by ``init`` wherever Flax's ownership rules place the
    cell: under this layer (``.../DEQ/cell/...``) when the cell is constructed at top level or
    in a ``setup`` method, under the enclosing module when it is constructed inside that
    module's ``nn.compact`` method (as for any module passed as an attribute).

    Statistics: each call sows the forward solve's `implicax.SolveStats` (steps, residual
    norm, converged) as ``("intermediates", "solve_stats")``; read it with
    ``layer.apply(variables, x, mutable=["intermediates"])``. ``return_stats=True`` returns
    ``(z*, stats)`` instead. The adjoint solve's statistics go to a probe:
    ``layer.apply(variables, x, adjoint_stats=probe)``, see `implicax.stats_probe`.

    Training diagnostics at z*, on request: with ``penalty_samples=k`` each call sows
    `implicax.jacobian_penalty` (k samples; differentiable, to add to the loss) as
    ``("intermediates", "jacobian_penalty")``, and with ``radius_steps=k``
    `implicax.spectral_radius` (k power iterations) as ``("intermediates",
    "spectral_radius")``. Their random vectors come from the ``"jacobian"`` PRNG stream
    (``apply(..., rngs={"jacobian": key}, mutable=["intermediates"])``); a call without that
    stream (``init``, evaluation) computes neither.

    Randomness (dropout): one key per PRNG stream available to this layer (all but
    ``"params"``) is drawn per call and reused by every evaluation of the cell in that solve,
    so a ``Dropout(deterministic=False)`` cell keeps one fixed mask while the solver iterates
    (a deterministic map, whose fixed point and implicit derivative are exact for that mask),
    and draws a new mask on the next call.

    Mutable collections (BatchNorm statistics, sown intermediates): every iterate is evaluated
    with the collections read-only in effect (a training-mode BatchNorm normalises each
    iterate with that iterate's batch statistics, which makes the map a function of the
    whole batch). When a collection is mutable and the cell would write to it, the cell is
    called once more at the solution, as an ordinary call, so running averages are updated
    from z* and the cell's sown intermediates are those at z*; that call draws its own dropout
    mask.

    Attributes:
        cell: the linen module defining the map z ↦ cell(z, x).
        solver: forward solver; None for `implicax.fixed_point_solve`'s default
            (`FixedPointIteration`).
        linear_solver: solver for the tangent and adjoint systems; None for
            `implicax.fixed_point_solve`'s default.
        on_failure: ``"warn"``, ``"nan"``, ``"raise"`` or ``"ignore"``, or one per phase
            (``{"forward": ..., "derivative": ...}``); see `implicax.fixed_point_solve`.
        penalty_samples: Hutchinson samples of the sown Jacobian penalty (0: none).
        radius_steps: power iterations of the sown spectral radius (0: none).
    """

    cell: nn.Module
    solver: Any = None
    linear_solver: Any = None
    on_failure: FailurePolicy | Mapping[str, FailurePolicy] = "warn"
    penalty_samples: int = 0
    radius_steps: int = 0

    @nn.compact
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
        if not isinstance(self.cell, nn.Module):
            raise TypeError(
                f"DEQ: cell must be a flax.linen Module called as cell(z, x), got {self.cell!r}."
            )
        penalty_samples, radius_steps = check_diagnostics(self.penalty_samples, self.radius_steps)
        z0 = deq_initial_state(x, z0)
        if self.is_initializing():
            self.cell(z0, x)  # create the cell's variables (unbind() returns none before)
        cell, variables = self.cell.unbind()
        rngs = {name: self.make_rng(name) for name in _rng_streams(self) if name != "params"}
        assert self.scope is not None  # bound: inside init or apply
        mutable = self.scope.mutable

        # Every array goes in through the solve's params, none by closure: implicax hoists only
        # floating-point closed-over tracers, and PRNG keys (or integer variables) are not.
        def apply(z, arrays):
            variables, rngs, x = arrays
            return cell.apply(variables, z, x, rngs=rngs, mutable=mutable)

        def fn(z, arrays):
            out = apply(z, arrays)
            return out if mutable is False else out[0]  # drop an iterate's collection updates

        arrays = (variables, rngs, x)
        with naming_the_cell(self.cell):
            z, stats = implicax.fixed_point_solve(
                fn,
                z0,
                arrays,
                solver=self.solver,
                linear_solver=self.linear_solver,
                on_failure=self.on_failure,
                return_stats=True,
                name="/".join(self.path) or type(self).__name__,
                adjoint_stats=adjoint_stats,
            )
        if mutable is not False and _writes_state(jax.eval_shape(apply, z0, arrays)[1]):
            self.cell(z, x)  # record collection updates once, from the equilibrium
        self.sow("intermediates", "solve_stats", stats)
        if (penalty_samples or radius_steps) and self.has_rng("jacobian"):
            key = self.make_rng("jacobian")
            diagnostics = deq_diagnostics(fn, z, arrays, key, penalty_samples, radius_steps)
            for name, value in diagnostics.items():
                self.sow("intermediates", name, value)
        return (z, stats) if return_stats else z


def _writes_state(updates: dict) -> bool:
    """Whether a cell's collection updates hold anything besides parameters."""
    return any(jax.tree.leaves(value) for name, value in updates.items() if name != "params")


def _rng_streams(module: nn.Module) -> list[str]:
    """Names of the PRNG streams available to a bound module."""
    return sorted(getattr(module.scope, "rngs", {}) or {})


from . import nnx as nnx  # noqa: E402  (implicax_flax.nnx.DEQ after `import implicax_flax`)
