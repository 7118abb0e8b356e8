"""(c) A Flax (linen) DEQ classifier's training step: value_and_grad + optax.adam update.

    logits = Dense(classes)(z*),   z* = tanh(z* W + Dense(width)(x))

W starts orthogonal × 0.9 (a contraction). Every method sees the same linen cell; the implicax
rows use `implicax_flax.DEQ` when it imports, and otherwise (noted in the report) a generic
DEQ layer that calls `implicax.fixed_point_solve` on ``cell.apply``. The anchors and the
baselines use that generic layer with their own solve, so every model has the same parameter
tree and the same gradients to compare.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _anchors import jaxopt, lineax, optimistix
from _harness import Candidate
from jax import lax
from problem_deq import default_classes, implicax_defaults, plain_while_loop

import implicax

try:
    from implicax_flax import DEQ as ImplicaxDEQ
except ImportError:  # pragma: no cover - depends on the checkout
    ImplicaxDEQ = None

INPUT_SCALE = 0.2
RECURRENT_SCALE = 0.9


class Cell(nn.Module):
    width: int

    @nn.compact
    def __call__(self, z, x):
        init = nn.initializers.orthogonal(scale=RECURRENT_SCALE)
        return jnp.tanh(nn.Dense(self.width, use_bias=False, kernel_init=init)(z) + x)


class GenericDEQ(nn.Module):
    """z* = cell(z*, x) by ``solve(fn, z0, params) -> (z, steps)``; the layout of
    `implicax_flax.DEQ` (the cell is the child ``cell``), so parameter trees match."""

    cell: nn.Module
    solve: Callable

    @nn.compact
    def __call__(self, x):
        z0 = jnp.zeros_like(x)
        if self.is_initializing():
            self.cell(z0, x)
        cell, variables = self.cell.unbind()

        def fn(z, params):
            variables, x = params
            return cell.apply(variables, z, x)

        z, steps = self.solve(fn, z0, (variables, x))
        self.sow("intermediates", "steps", steps)
        return z


class Net(nn.Module):
    deq: nn.Module
    width: int
    classes: int

    @nn.compact
    def __call__(self, x):
        z = self.deq(nn.Dense(self.width)(x))
        return nn.Dense(self.classes)(z)


@dataclasses.dataclass
class FlaxProblem:
    batch: int
    features: int
    width: int
    classes: int
    x: jax.Array
    labels: jax.Array
    params: Any
    tol: float
    max_steps: int

    @property
    def label(self) -> str:
        return f"batch {self.batch}, {self.features} → width {self.width} → {self.classes} classes"

    def net(self, layer: nn.Module) -> Net:
        return Net(layer, self.width, self.classes)


OPTIMIZER = optax.adam(1e-3)


def make_problem(batch, features, width, classes=10, tol=1e-5, seed=2) -> FlaxProblem:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, features)) * INPUT_SCALE, jnp.float32)
    labels = jnp.asarray(rng.integers(0, classes, batch), jnp.int32)
    layer = GenericDEQ(Cell(width), functools.partial(_plain, tol=tol, max_steps=1000))
    params = Net(layer, width, classes).init(jax.random.key(seed), x)["params"]
    return FlaxProblem(batch, features, width, classes, x, labels, params, tol, 1000)


def _plain(fn, z0, params, tol, max_steps):
    return plain_while_loop(fn, z0, params, tol, tol, max_steps)


def _unrolled(fn, z0, params, steps):
    z, _ = lax.scan(lambda z, _: (fn(z, params), None), z0, length=steps)
    return z, jnp.asarray(steps)


def _steps_of(intermediates) -> jax.Array:
    leaves = jax.tree.leaves(intermediates)
    # implicax_flax sows SolveStats(steps, residual_norm, converged); the generic layer `steps`.
    ints = [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.integer)]
    return ints[0] if ints else jnp.asarray(-1)


def loss_fn(net: Net, params, x, labels):
    logits = net.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_candidate(name, family, settings, net_of_steps: Callable[[int | None], Net], note=""):
    """net_of_steps(max_steps or None) -> Net. Arguments: (params, opt_state, x, labels)."""
    net = net_of_steps(None)

    def forward(params, opt_state, x, labels):
        logits, state = net.apply({"params": params}, x, mutable=["intermediates"])
        return logits, _steps_of(state["intermediates"])

    def step_with(net):
        def train_step(params, opt_state, x, labels):
            loss, grads = jax.value_and_grad(functools.partial(loss_fn, net))(params, x, labels)
            updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
            return loss, grads, optax.apply_updates(params, updates), opt_state

        return train_step

    return Candidate(
        name,
        family,
        settings,
        forward,
        step_with(net),
        lambda k: step_with(net_of_steps(k)),
        note=note,
    )


def reference(prob: FlaxProblem, steps: int) -> tuple[float, Any]:
    """Loss and gradients in float64: `steps` unrolled iterations of the same model."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), prob.params)
        x = jnp.asarray(prob.x, jnp.float64)
        net = prob.net(GenericDEQ(Cell(prob.width), functools.partial(_unrolled, steps=steps)))
        loss, grads = jax.jit(jax.value_and_grad(functools.partial(loss_fn, net)))(
            params, x, prob.labels
        )
        return float(loss), jax.tree.map(np.asarray, grads)


def reference_steps(prob: FlaxProblem) -> int:
    """Plain iterations to reach 1e-14 in float64 (the reference unrolls a bit more)."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), prob.params)
        x = jnp.asarray(prob.x, jnp.float64)
        layer = GenericDEQ(Cell(prob.width), functools.partial(_plain, tol=1e-14, max_steps=5000))
        _, state = prob.net(layer).apply({"params": params}, x, mutable=["intermediates"])
        return int(_steps_of(state["intermediates"]))


QUICK = ["while_loop (plain)", "implicax FPI + BiCGStab, ignore"]


def build_candidates(prob: FlaxProblem, plain_steps: int, profile: str) -> list[Candidate]:
    tol, maxs, width = prob.tol, prob.max_steps, prob.width

    def generic(solve):
        return lambda k: prob.net(GenericDEQ(Cell(width), functools.partial(solve, k=k)))

    def plain(fn, z0, params, k):
        return _plain(fn, z0, params, tol, k or maxs)

    def unrolled(fn, z0, params, k):
        return _unrolled(fn, z0, params, k or plain_steps)

    plain_cand = make_candidate(
        "while_loop (plain)",
        "plain",
        f"the generic layer with a bare lax.while_loop, rtol=atol={tol:g} elementwise",
        generic(plain),
    )
    plain_cand.value_and_grad = plain_cand.memory = None
    cands = [
        plain_cand,
        make_candidate(
            "unrolled backprop",
            "unrolled",
            f"lax.scan of {plain_steps} steps (the plain loop's count), reverse-mode through all",
            generic(unrolled),
        ),
    ]

    fpi = implicax.FixedPointIteration(rtol=tol, atol=tol, max_steps=maxs)
    gmres = implicax.GMRES(rtol=tol, atol=tol, max_steps=maxs)
    bicgstab = implicax.BiCGStab(rtol=tol, atol=tol, max_steps=maxs)
    variants = [
        (
            "defaults",
            None,
            None,
            "warn",
            f"no options: {implicax_defaults('fixed_point_solve')}",
        ),
        ("FPI + GMRES", fpi, gmres, "warn", f"FixedPointIteration + GMRES, rtol=atol={tol:g}"),
        (
            "FPI + BiCGStab, ignore",
            fpi,
            bicgstab,
            "ignore",
            f"FixedPointIteration + BiCGStab, rtol=atol={tol:g}, on_failure='ignore'",
        ),
    ]
    for label, solver, linear_solver, on_failure, text in variants:

        def implicax_net(k, solver=solver, linear_solver=linear_solver, on_failure=on_failure):
            s = solver
            if k is not None:  # the memory sweep; None: the library's default solver
                default = default_classes("fixed_point_solve")[0] or implicax.Anderson
                s = dataclasses.replace(solver or default(), max_steps=k)
            if ImplicaxDEQ is not None:
                return prob.net(
                    ImplicaxDEQ(
                        Cell(width), solver=s, linear_solver=linear_solver, on_failure=on_failure
                    )
                )

            def solve(fn, z0, params, k=None):
                z, stats = implicax.fixed_point_solve(
                    fn,
                    z0,
                    params,
                    solver=s,
                    linear_solver=linear_solver,
                    on_failure=on_failure,
                    return_stats=True,
                )
                return z, stats.steps

            return prob.net(GenericDEQ(Cell(width), solve))

        layer = "implicax_flax.DEQ" if ImplicaxDEQ is not None else "generic layer + implicax"
        note = "" if ImplicaxDEQ is not None else "implicax_flax not importable: generic layer"
        cands.append(
            make_candidate(
                f"implicax {label}", "implicax", f"{layer}, {text}", implicax_net, note=note
            )
        )

    if jaxopt is not None:
        jtol = tol * float(np.sqrt(prob.batch * width))
        lins = [
            (
                "normal CG (default)",
                functools.partial(jaxopt.linear_solve.solve_normal_cg, tol=tol, maxiter=maxs),
            ),
            (
                "GMRES",
                functools.partial(jaxopt.linear_solve.solve_gmres, tol=tol, maxiter=maxs // 20),
            ),
        ]
        for label, lin in lins:

            def jaxopt_solve(fn, z0, params, k, lin=lin):
                solver = jaxopt.FixedPointIteration(
                    fn, maxiter=k or maxs, tol=jtol, implicit_diff_solve=lin
                )
                z, state = solver.run(z0, params)
                return z, state.iter_num

            cands.append(
                make_candidate(
                    f"jaxopt FPI + {label}",
                    "jaxopt",
                    f"generic layer + FixedPointIteration(tol={jtol:.3g} = {tol:g}·√n on the L2 "
                    f"step), {label} (tol={tol:g})",
                    generic(jaxopt_solve),
                )
            )
    if optimistix is not None:

        def optx_solve(fn, z0, params, k):
            sol = optimistix.fixed_point(
                fn,
                optimistix.FixedPointIteration(rtol=tol, atol=tol),
                z0,
                params,
                max_steps=k or maxs,
                adjoint=optimistix.ImplicitAdjoint(
                    lineax.GMRES(rtol=tol, atol=tol, max_steps=maxs)
                ),
                throw=False,
            )
            return sol.value, sol.stats["num_steps"]

        cands.append(
            make_candidate(
                "optimistix FPI + GMRES",
                "optimistix",
                f"generic layer + FixedPointIteration(rtol=atol={tol:g}), "
                f"ImplicitAdjoint(lineax.GMRES(rtol=atol={tol:g})), throw=False",
                generic(optx_solve),
            )
        )
    if profile == "quick":
        cands = [c for c in cands if c.name in QUICK]
    return cands
