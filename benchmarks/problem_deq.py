"""(a) DEQ-style fixed point z = tanh(z W + x U + b), differentiated w.r.t. (W, U, b).

W is a Gaussian matrix scaled to spectral radius 0.95; the injection x U + b is scaled by
`INPUT_SCALE` so that plain fixed-point iteration needs about 75 steps at tolerance 1e-5
(batch 128 x width 128). Loss ½‖z* − y‖² (a sum, so the cotangent z* − y is O(1) and the
absolute parts of the tolerances do not dominate the backward solves).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from _anchors import jaxopt, lineax, optimistix
from _harness import Candidate
from jax import lax

import implicax

INPUT_SCALE = 0.3
RADIUS = 0.95


@dataclasses.dataclass
class DEQProblem:
    batch: int
    width: int
    params: tuple  # (W, U, b), float32
    x: jax.Array
    y: jax.Array
    tol: float
    max_steps: int

    @property
    def label(self) -> str:
        return f"batch {self.batch} x width {self.width}"

    def fn(self, z, params):
        w, u, b = params
        return jnp.tanh(z @ w + self.x @ u + b)

    def loss(self, z):
        return 0.5 * jnp.sum((z - self.y) ** 2)

    @property
    def z0(self):
        return jnp.zeros((self.batch, self.width), jnp.float32)


def make_problem(batch: int, width: int, tol: float = 1e-5, seed: int = 0) -> DEQProblem:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((width, width))
    w *= RADIUS / np.max(np.abs(np.linalg.eigvals(w)))
    u = rng.standard_normal((width, width)) / np.sqrt(width) * INPUT_SCALE
    b = rng.standard_normal(width) * 0.1 * INPUT_SCALE
    x = rng.standard_normal((batch, width))
    y = rng.standard_normal((batch, width)) * 0.5
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return DEQProblem(batch, width, (f32(w), f32(u), f32(b)), f32(x), f32(y), tol, 1000)


def reference(prob: DEQProblem) -> tuple[float, tuple, int]:
    """Loss and gradients in float64 with NumPy (independent of JAX): Picard iteration to
    1e-14, then the adjoint λ = z̄ + Jᵀλ by the same iteration. Returns (loss, grads, steps)."""
    w, u, b = (np.asarray(a, np.float64) for a in prob.params)
    x, y = np.asarray(prob.x, np.float64), np.asarray(prob.y, np.float64)
    pre = x @ u + b
    z = np.zeros((prob.batch, prob.width))
    steps = 0
    while steps < 20_000:
        z_new = np.tanh(z @ w + pre)
        steps += 1
        done = np.max(np.abs(z_new - z)) < 1e-14
        z = z_new
        if done:
            break
    zbar = z - y
    slope = 1 - z**2
    lam = zbar
    for _ in range(20_000):
        lam_new = zbar + (lam * slope) @ w.T
        done = np.max(np.abs(lam_new - lam)) < 1e-14 * max(1.0, np.max(np.abs(lam_new)))
        lam = lam_new
        if done:
            break
    mu = lam * slope
    grads = (z.T @ mu, x.T @ mu, mu.sum(0))
    return 0.5 * float(np.sum(zbar**2)), grads, steps


# ----------------------------------------------------------------------------- candidates


def plain_while_loop(fn, z0, params, rtol, atol, max_steps):
    """The floor: a bare lax.while_loop of z ← fn(z) with the same elementwise stopping test."""

    def cond(carry):
        return (carry[1] > 1) & (carry[2] < max_steps)

    def body(carry):
        z, _, k = carry
        fz = fn(z, params)
        error = jnp.max(jnp.abs(fz - z) / (atol + rtol * jnp.abs(fz)))
        return fz, error, k + 1

    z, _, steps = lax.while_loop(cond, body, (z0, jnp.asarray(jnp.inf, z0.dtype), 0))
    return z, steps


def unrolled(fn, z0, params, steps):
    """Plain backprop through `steps` iterations (lax.scan; memory grows with steps)."""
    z, _ = lax.scan(lambda z, _: (fn(z, params), None), z0, length=steps)
    return z


def _implicit_candidates(name, family, settings, solve, loss, args0, note=""):
    """forward/value_and_grad/memory from solve(params, max_steps) -> (z, steps)."""

    def forward(params):
        return solve(params, None)

    def value_and_grad(params):
        return jax.value_and_grad(lambda p: loss(solve(p, None)[0]))(params)

    def memory(steps):
        return jax.value_and_grad(lambda p: loss(solve(p, steps)[0]))

    return Candidate(name, family, settings, forward, value_and_grad, memory, note=note)


def implicax_candidate(prob, name, solver, linear_solver, on_failure="warn", settings=""):
    def solve(params, max_steps):
        s = solver
        if max_steps is not None:  # the memory sweep; None: the library's default solver
            default = default_classes("fixed_point_solve")[0] or implicax.Anderson
            s = dataclasses.replace(solver or default(), max_steps=max_steps)
        z, stats = implicax.fixed_point_solve(
            prob.fn,
            prob.z0,
            params,
            solver=s,
            linear_solver=linear_solver,
            on_failure=on_failure,
            return_stats=True,
        )
        return z, stats.steps

    cand = _implicit_candidates(name, "implicax", settings, solve, prob.loss, prob.params)

    def backward_steps(params):
        # The adjoint system that reverse mode solves, λ(I − ∂fn/∂z) = z̄, run on its own so
        # that its matrix-vector products can be counted.
        z = lax.stop_gradient(solve(params, None)[0])
        zbar = jax.grad(prob.loss)(z)
        _, vjp = jax.vjp(lambda v: prob.fn(v, params), z)
        lin = linear_solver
        if lin is None:  # the library's default, whatever this checkout has
            default = default_classes("fixed_point_solve")[1]
            if default is None:
                return jnp.asarray(-1)
            lin = default()
        return lin.solve(lambda v: v - vjp(v)[0], zbar)[1].steps

    cand.backward_steps = backward_steps
    return cand


def default_classes(entry: str):
    """(forward solver class, linear solver class) that this checkout's `implicax.<entry>` uses
    when none is given, read from its source (for labels and the memory sweep); None if unknown."""
    import inspect
    import re

    try:
        forward = re.search(
            r"default_solver=(\w+)\(\)", inspect.getsource(getattr(implicax, entry))
        )
        linear = re.search(
            r"as_linear_solver\((\w+)\(\) if linear_solver is None",
            inspect.getsource(implicax._solve),
        )
    except (OSError, TypeError, AttributeError):
        return None, None
    return tuple(getattr(implicax, m.group(1), None) if m else None for m in (forward, linear))


def implicax_defaults(entry: str) -> str:
    """A label for the defaults of this checkout's `implicax.<entry>`."""
    fwd, lin = default_classes(entry)
    tol = float(jnp.finfo(jnp.float32).eps) ** (2 / 3)  # the documented default rtol
    return (
        f"{describe(fwd()) if fwd else 'default forward solver'} + "
        f"{describe(lin()) if lin else 'default linear solver'} "
        f"(unset rtol = atol = eps^(2/3) = {tol:.2g} in float32), on_failure='warn'"
    )


def describe(solver) -> str:
    fields = {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)}
    shown = {k: v for k, v in fields.items() if v is not None and k != "regularization"}
    return f"{type(solver).__name__}({', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in shown.items())})"


# Rows per profile: "main" (the full comparison and the ablations), "size" (other sizes),
# "quick" (smoke run). Rows with a memory sweep: MEMORY_ROWS.
TUNED = "implicax FPI + BiCGStab, ignore"
LOOSER_TOLERANCES = (3e-5, 1e-4, 3e-4)


def loose_name(tol: float) -> str:
    return f"implicax FPI + BiCGStab, tol {tol:.0e}"


PROFILES = {
    "quick": [
        "while_loop (plain)",
        "unrolled backprop",
        TUNED,
        "jaxopt FPI + normal CG (default)",
        "optimistix FPI + GMRES",
    ],
    "size": [
        "while_loop (plain)",
        "unrolled backprop",
        "implicax defaults",
        "implicax FPI + GMRES",
        TUNED,
        "jaxopt FPI + normal CG (default)",
        "jaxopt FPI + GMRES",
        "optimistix FPI + GMRES",
    ],
}
MEMORY_ROWS = {
    "unrolled backprop",
    "implicax defaults",
    "implicax FPI + GMRES",
    TUNED,
    "jaxopt FPI + normal CG (default)",
    "jaxopt FPI + GMRES",
    "optimistix FPI + GMRES",
}


def build_candidates(prob: DEQProblem, plain_steps: int, profile: str) -> list[Candidate]:
    tol, maxs = prob.tol, prob.max_steps
    fn, loss, z0 = prob.fn, prob.loss, prob.z0
    cands = [
        Candidate(
            "while_loop (plain)",
            "plain",
            f"lax.while_loop z←f(z), stop when max|f(z)−z|/(atol+rtol|f(z)|) ≤ 1, rtol=atol={tol:g}",
            forward=lambda p: plain_while_loop(fn, z0, p, tol, tol, maxs),
        ),
        Candidate(
            "unrolled backprop",
            "unrolled",
            f"lax.scan of {plain_steps} steps (the plain loop's count), reverse-mode through all",
            forward=lambda p: (unrolled(fn, z0, p, plain_steps), plain_steps),
            value_and_grad=jax.value_and_grad(lambda p: loss(unrolled(fn, z0, p, plain_steps))),
            memory=lambda k: jax.value_and_grad(lambda p: loss(unrolled(fn, z0, p, k))),
        ),
    ]
    cands.append(
        implicax_candidate(
            prob,
            "implicax defaults",
            None,
            None,
            settings=f"fixed_point_solve with no options: {implicax_defaults('fixed_point_solve')}",
        )
    )
    fpi = implicax.FixedPointIteration(rtol=tol, atol=tol, max_steps=maxs)
    anderson = implicax.Anderson(rtol=tol, atol=tol, max_steps=maxs)
    lins = {
        "GMRES": implicax.GMRES(rtol=tol, atol=tol, max_steps=maxs),
        "BiCGStab": implicax.BiCGStab(rtol=tol, atol=tol, max_steps=maxs),
        "Neumann": implicax.Neumann(rtol=tol, atol=tol, max_steps=maxs),
        "GMRES(restart=8)": implicax.GMRES(rtol=tol, atol=tol, max_steps=maxs, restart=8),
    }
    rows = [
        ("FPI", fpi, "GMRES", "warn"),
        ("FPI", fpi, "GMRES", "ignore"),
        ("Anderson", anderson, "GMRES", "warn"),
        ("Anderson", anderson, "GMRES", "ignore"),
        ("FPI", fpi, "BiCGStab", "warn"),
        ("FPI", fpi, "Neumann", "warn"),
        ("FPI", fpi, "BiCGStab", "ignore"),
        ("FPI", fpi, "Neumann", "ignore"),
        ("FPI", fpi, "GMRES(restart=8)", "ignore"),
    ]
    named = [
        (f"implicax {f} + {lin}" + (", ignore" if policy == "ignore" else ""), s, lins[lin], policy)
        for f, s, lin, policy in rows
    ]
    # The default solvers at looser tolerances: gradient accuracy against time, for the target
    # "at equal or better gradient accuracy" (the anchors stop on looser tests than ours).
    named += [
        (loose_name(t), _with_tol(fpi, t), _with_tol(lins["BiCGStab"], t), "warn")
        for t in LOOSER_TOLERANCES
    ]
    for name, solver, lin, on_failure in named:
        cands.append(
            implicax_candidate(
                prob,
                name,
                solver,
                lin,
                on_failure,
                settings=f"{describe(solver)}, {describe(lin)}, on_failure='{on_failure}'"
                + (" (no host callback)" if on_failure == "ignore" else ""),
            )
        )
    cands += anchor_candidates(prob, profile == "main")
    if profile in PROFILES:
        cands = [c for c in cands if c.name in PROFILES[profile]]
    for c in cands:
        if c.name not in MEMORY_ROWS or (
            profile == "quick" and c.family != "implicax" and c.family != "unrolled"
        ):
            c.memory = None
    return cands


def _with_tol(solver, tol):
    return dataclasses.replace(solver, rtol=tol, atol=tol)


def anchor_candidates(prob: DEQProblem, ablation: bool) -> list[Candidate]:
    tol, maxs, fn, z0 = prob.tol, prob.max_steps, prob.fn, prob.z0
    cands = []
    if jaxopt is not None:
        # jaxopt stops on the L2 norm of the step, ‖z_k+1 − z_k‖₂ ≤ tol, over all batch × width
        # entries; the elementwise test max|Δ_i|/(atol + rtol|z_i|) ≤ 1 with rtol = atol = 1e-5
        # corresponds to tol = 1e-5·√n (an RMS step of 1e-5). The literal tol = 1e-5 on the L2
        # norm is out of float32's reach here: jaxopt then runs to maxiter.
        jtol = tol * float(np.sqrt(prob.batch * prob.width))
        restarts = maxs // 20
        solves = [
            (
                "GMRES",
                functools.partial(jaxopt.linear_solve.solve_gmres, tol=tol, maxiter=restarts),
                f"solve_gmres(tol={tol:g}, restart=20, maxiter={restarts} restarts, "
                "solve_method='batched')",
            ),
            (
                "normal CG (default)",
                functools.partial(jaxopt.linear_solve.solve_normal_cg, tol=tol, maxiter=maxs),
                f"solve_normal_cg(tol={tol:g}, maxiter={maxs})",
            ),
        ]
        if ablation:
            solves.append(
                (
                    "GMRES incremental",
                    functools.partial(
                        jaxopt.linear_solve.solve_gmres,
                        tol=tol,
                        maxiter=restarts,
                        solve_method="incremental",
                    ),
                    f"solve_gmres(tol={tol:g}, restart=20, maxiter={restarts} restarts, "
                    "solve_method='incremental')",
                )
            )
        for label, lin, lin_text in solves:

            def solve(params, max_steps, lin=lin):
                solver = jaxopt.FixedPointIteration(
                    fn, maxiter=max_steps or maxs, tol=jtol, implicit_diff_solve=lin
                )
                z, state = solver.run(z0, params)
                return z, state.iter_num

            cands.append(
                _implicit_candidates(
                    f"jaxopt FPI + {label}",
                    "jaxopt",
                    f"FixedPointIteration(tol={jtol:.3g} = {tol:g}·√n on ‖z_k+1 − z_k‖₂, "
                    f"maxiter={maxs}), implicit_diff_solve={lin_text}",
                    solve,
                    prob.loss,
                    prob.params,
                )
            )
    if optimistix is not None:
        # lineax.BiCGStab was tried too: it reports a breakdown on this problem (and raises
        # from inside the adjoint even with throw=False), so only GMRES is run.
        lins = [("GMRES", lineax.GMRES(rtol=tol, atol=tol, max_steps=maxs))]
        for label, lin in lins:

            def solve(params, max_steps, lin=lin):
                sol = optimistix.fixed_point(
                    fn,
                    optimistix.FixedPointIteration(rtol=tol, atol=tol),
                    z0,
                    params,
                    max_steps=max_steps or maxs,
                    adjoint=optimistix.ImplicitAdjoint(linear_solver=lin),
                    throw=False,
                )
                return sol.value, sol.stats["num_steps"]

            restart = f", restart={lin.restart}" if hasattr(lin, "restart") else ""
            cands.append(
                _implicit_candidates(
                    f"optimistix FPI + {label}",
                    "optimistix",
                    f"FixedPointIteration(rtol=atol={tol:g}, max_norm), max_steps={maxs}, "
                    f"throw=False, ImplicitAdjoint(lineax.{label}(rtol=atol={tol:g}{restart}))",
                    solve,
                    prob.loss,
                    prob.params,
                )
            )
    return cands
