"""(b) Root finding: the ridge-regression optimality condition

    F(w, λ) = (XᵀX + λI) w − Xᵀy = 0,

solved for w and differentiated w.r.t. λ through the validation loss ½‖X_val w − y_val‖².
The features have singular values spread over 1.5 decades, so conjugate gradients needs about
a hundred steps at tolerance 1e-5. The matrix is never formed: every method sees the matvec
w ↦ Xᵀ(Xw) + λw.
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


@dataclasses.dataclass
class RidgeProblem:
    n: int
    d: int
    x: jax.Array
    y: jax.Array
    x_val: jax.Array
    y_val: jax.Array
    lam: jax.Array
    tol: float
    max_steps: int

    @property
    def label(self) -> str:
        return f"{self.n} samples x {self.d} features"

    def matvec(self, w, lam):
        return self.x.T @ (self.x @ w) + lam * w

    @property
    def rhs(self):
        return self.x.T @ self.y

    def residual(self, w, lam):
        return self.matvec(w, lam) - self.rhs

    def loss(self, w):
        return 0.5 * jnp.sum((self.x_val @ w - self.y_val) ** 2)

    @property
    def w0(self):
        return jnp.zeros(self.d, jnp.float32)


def make_problem(n: int, d: int, tol: float = 1e-5, seed: int = 1) -> RidgeProblem:
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, -1.5, d)
    x = rng.standard_normal((n, d)) * scales / np.sqrt(n)
    w_true = rng.standard_normal(d)
    y = x @ w_true + 0.1 * rng.standard_normal(n) / np.sqrt(n)
    x_val = rng.standard_normal((n // 4, d)) * scales / np.sqrt(n // 4)
    y_val = x_val @ w_true + 0.1 * rng.standard_normal(n // 4) / np.sqrt(n // 4)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return RidgeProblem(n, d, f32(x), f32(y), f32(x_val), f32(y_val), f32(1e-3), tol, 1000)


def reference(prob: RidgeProblem) -> tuple[float, float]:
    """Validation loss and dL/dλ in float64 by Cholesky: dw/dλ = −A⁻¹w."""
    x, y = np.asarray(prob.x, np.float64), np.asarray(prob.y, np.float64)
    xv, yv = np.asarray(prob.x_val, np.float64), np.asarray(prob.y_val, np.float64)
    lam = float(prob.lam)
    a = x.T @ x + lam * np.eye(prob.d)
    w = np.linalg.solve(a, x.T @ y)
    gw = xv.T @ (xv @ w - yv)
    return 0.5 * float(np.sum((xv @ w - yv) ** 2)), float(-gw @ np.linalg.solve(a, w))


def residual_of(prob: RidgeProblem):
    def check(w):
        r = prob.residual(w, prob.lam)
        return jnp.linalg.norm(r) / jnp.linalg.norm(prob.rhs)

    def run(w):
        rel = float(jax.jit(check)(w))
        return rel, rel <= prob.tol * 1.01

    return run


def plain_cg(matvec, b, tol, max_steps):
    """Conjugate gradients in a bare lax.while_loop: stop when ‖r‖₂ ≤ tol + tol·‖b‖₂."""
    threshold = tol + tol * jnp.linalg.norm(b)

    def cond(carry):
        return (jnp.sqrt(carry[3]) > threshold) & (carry[4] < max_steps)

    def body(carry):
        w, r, p, rr, k = carry
        ap = matvec(p)
        alpha = rr / (p @ ap)
        w = w + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        return w, r, r + (rr_new / rr) * p, rr_new, k + 1

    init = (jnp.zeros_like(b), b, b, b @ b, 0)
    w, *_, k = lax.while_loop(cond, body, init)
    return w, k


def unrolled_cg(matvec, b, steps):
    """`steps` CG iterations in lax.scan, differentiated by plain backprop."""

    def body(carry, _):
        w, r, p, rr = carry
        ap = matvec(p)
        alpha = rr / (p @ ap)
        w = w + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        # Guard against 0/0 once converged (keeps the unrolled gradient finite).
        beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1), 0)
        return (w, r, r + beta * p, rr_new), None

    (w, *_), _ = lax.scan(body, (jnp.zeros_like(b), b, b, b @ b), length=steps)
    return w


QUICK = ["while_loop CG (plain)", "implicax CG step + CG", "jaxopt custom_root(CG) + CG"]


def build_candidates(prob: RidgeProblem, plain_steps: int, profile: str) -> list[Candidate]:
    tol, maxs, loss = prob.tol, prob.max_steps, prob.loss

    def vg(solve):
        return jax.value_and_grad(lambda lam: loss(solve(lam)[0]))

    def unroll(lam, k=plain_steps):
        return unrolled_cg(lambda w: prob.matvec(w, lam), prob.rhs, k), k

    def direct(lam):
        a = prob.x.T @ prob.x + lam * jnp.eye(prob.d, dtype=jnp.float32)
        return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a), prob.rhs), 0

    cands = [
        Candidate(
            "while_loop CG (plain)",
            "plain",
            f"CG in lax.while_loop, stop when ‖r‖₂ ≤ atol + rtol‖b‖₂, rtol=atol={tol:g}",
            forward=lambda lam: plain_cg(lambda w: prob.matvec(w, lam), prob.rhs, tol, maxs),
        ),
        Candidate(
            "unrolled CG backprop",
            "unrolled",
            f"{plain_steps} CG steps (the plain loop's count) in lax.scan, reverse-mode through all",
            forward=unroll,
            value_and_grad=vg(unroll),
            memory=lambda k: vg(functools.partial(unroll, k=k)),
        ),
        Candidate(
            "direct (Cholesky)",
            "direct",
            "forms XᵀX + λI (d×d), cho_factor/cho_solve, autodiff through the factorisation",
            forward=direct,
            value_and_grad=vg(direct),
        ),
    ]

    def implicax_solve(forward_solver, linear_solver, max_steps=None):
        if max_steps is not None:
            linear_solver = dataclasses.replace(linear_solver, max_steps=max_steps)
            if isinstance(forward_solver, implicax.Newton):
                forward_solver = dataclasses.replace(forward_solver, linear_solver=linear_solver)
            else:
                step = functools.partial(forward_solver.function, max_steps=max_steps)
                forward_solver = dataclasses.replace(forward_solver, function=step)

        def solve(lam):
            w, stats = implicax.root_solve(
                prob.residual,
                prob.w0,
                lam,
                solver=forward_solver,
                linear_solver=linear_solver,
                return_stats=True,
            )
            return w, stats.steps

        return solve

    def one_cg_newton_step(fn, w0, lam, max_steps=maxs):
        """A callable forward solver: one Newton step solved by CG, exact for a residual
        that is affine in w (as here). Never differentiated; implicax adds the derivative."""
        f0, matvec = jax.linearize(lambda w: fn(w, lam), w0)  # F(w0) once, not per product
        cg = implicax.CG(rtol=tol, atol=tol, max_steps=max_steps)
        return w0 + cg.solve(matvec, -f0)[0]

    cg = implicax.CG(rtol=tol, atol=tol, max_steps=maxs)
    variants = [
        (
            "implicax CG step + CG",
            # Checked at the tolerance of the Newton variant below (its defaults are tighter).
            implicax.CallableSolver(one_cg_newton_step, rtol=tol, atol=tol),
            f"root_solve, solver=callable: one Newton step by CG(rtol=atol={tol:g}) (exact for "
            f"affine F), linear_solver=CG(rtol=atol={tol:g})",
        ),
        (
            "implicax Newton(CG) + CG",
            implicax.Newton(rtol=tol, atol=tol, linear_solver=cg),
            f"root_solve, Newton(rtol=atol={tol:g}, linear_solver=CG(rtol=atol={tol:g})), "
            f"linear_solver=CG(rtol=atol={tol:g}); forward steps = Newton steps",
        ),
    ]
    for name, fwd, text in variants:
        cand = Candidate(
            name,
            "implicax",
            text,
            forward=implicax_solve(fwd, cg),
            value_and_grad=vg(implicax_solve(fwd, cg)),
            memory=lambda k, fwd=fwd: vg(implicax_solve(fwd, cg, k)),
        )

        def backward_steps(lam, fwd=fwd):
            w = lax.stop_gradient(implicax_solve(fwd, cg)(lam)[0])
            wbar = jax.grad(loss)(w)
            _, vjp = jax.vjp(lambda v: prob.residual(v, lam), w)
            return cg.solve(lambda v: vjp(v)[0], wbar)[1].steps

        cand.backward_steps = backward_steps
        cands.append(cand)

    if jaxopt is not None:
        lin = functools.partial(jaxopt.linear_solve.solve_cg, tol=tol, maxiter=maxs)

        def jaxopt_solve(lam, maxiter=maxs):
            @jaxopt.implicit_diff.custom_root(prob.residual, solve=lin)
            def ridge(w0, lam):
                return jaxopt.linear_solve.solve_cg(
                    lambda w: prob.matvec(w, lam), prob.rhs, init=w0, tol=tol, maxiter=maxiter
                )

            return ridge(prob.w0, lam), -1

        cands.append(
            Candidate(
                "jaxopt custom_root(CG) + CG",
                "jaxopt",
                f"@custom_root(F, solve=solve_cg(tol={tol:g})) around solve_cg(tol={tol:g}) "
                "(jax.scipy CG: ‖r‖₂ ≤ tol·‖b‖₂); no step counts reported",
                forward=jaxopt_solve,
                value_and_grad=vg(jaxopt_solve),
                memory=lambda k: vg(functools.partial(jaxopt_solve, maxiter=k)),
            )
        )
    if optimistix is not None:
        tags = frozenset({lineax.symmetric_tag, lineax.positive_semidefinite_tag})

        def optx_solve(lam, max_steps=maxs):
            lin = lineax.CG(rtol=tol, atol=tol, max_steps=max_steps)
            sol = optimistix.root_find(
                prob.residual,
                optimistix.Newton(rtol=tol, atol=tol, linear_solver=lin),
                prob.w0,
                lam,
                adjoint=optimistix.ImplicitAdjoint(linear_solver=lin),
                tags=tags,
                throw=False,
            )
            return sol.value, sol.stats["num_steps"]

        # lineax.linear_solve(CG) on the same operator was tried as well: several times slower
        # than this in both directions here, so it is not run.
        cands += [
            Candidate(
                "optimistix Newton(CG) + CG",
                "optimistix",
                f"root_find, Newton(rtol=atol={tol:g}, linear_solver=lineax.CG(rtol=atol={tol:g})), "
                "ImplicitAdjoint(lineax.CG), tags=symmetric+PSD, throw=False",
                forward=optx_solve,
                value_and_grad=vg(optx_solve),
                memory=lambda k: vg(functools.partial(optx_solve, max_steps=k)),
            ),
        ]
    if profile == "quick":
        cands = [c for c in cands if c.name in QUICK]
    return cands
