"""A user-written forward solver: Newton's method with a backtracking line search.

Subclassing `implicax.AbstractForwardSolver` gives it the library's loop, stopping test,
NaN detection, statistics, failure policy and implicit derivatives; it only says how to take
one step.

    python examples/line_search_newton.py
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import implicax


# --8<-- [start:solver]
class State(NamedTuple):
    x: Any
    fx: Any  # F(x)


@dataclasses.dataclass(frozen=True)
class BacktrackingNewton(implicax.AbstractForwardSolver):
    """Newton steps x ← x + t·δ, J·δ = −F(x), with t halved until ‖F‖ decreases (at most
    `halvings` times)."""

    halvings: int = 10
    linear_solver: implicax.AbstractLinearSolver = implicax.GMRES()

    def init(self, problem, x0):
        return State(x0, problem.residual(x0))

    def step(self, problem, state):
        x, fx = state
        _, jvp = jax.linearize(problem.residual, x)
        delta, stats = self.linear_solver.solve(jvp, jax.tree.map(jnp.negative, fx))

        def norm(tree):
            return jnp.sqrt(sum(jnp.vdot(leaf, leaf) for leaf in jax.tree.leaves(tree)))

        def trial(t):
            y = jax.tree.map(lambda a, d: a + t * d, x, delta)
            return y, problem.residual(y)

        def shorter(carry):
            t, _, _, k = carry
            y, fy = trial(t / 2)
            return t / 2, y, fy, k + 1

        def worse(carry):
            _, _, fy, k = carry
            return (norm(fy) >= norm(fx)) & (k < self.halvings)

        y, fy = trial(1.0)
        _, y, fy, _ = jax.lax.while_loop(worse, shorter, (1.0, y, fy, 0))
        return State(y, fy), implicax.Progress(y, fy, delta, ~stats.converged)


# --8<-- [end:solver]


def main():
    # arctan(x) = θ from x0 = 10: a plain Newton step overshoots and diverges from here.
    solver = BacktrackingNewton()
    theta = jnp.array([0.5, 1.0, -1.2])
    solve = lambda t: implicax.root_solve(
        lambda x, t: jnp.arctan(x) - t, jnp.full(3, 10.0), t, solver=solver
    )
    x, stats = implicax.root_solve(
        lambda x, t: jnp.arctan(x) - t, jnp.full(3, 10.0), theta, solver=solver, return_stats=True
    )
    print("x =", x, "(tan θ =", jnp.tan(theta), ")", stats)
    print(
        "dx/dθ =", jnp.diag(jax.jacfwd(solve)(theta)), "(1 + tan² θ =", 1 + jnp.tan(theta) ** 2, ")"
    )


if __name__ == "__main__":
    main()
