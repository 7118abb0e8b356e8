"""`custom_root` / `custom_fixed_point` (jaxopt's decorator contract) and ``has_aux`` on the
core entry points, against ridge regression's closed forms (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jsl
import numpy as np
import pytest

import implicax

_RNG = np.random.default_rng(0)
X = jnp.asarray(_RNG.standard_normal((12, 3)))
Y = jnp.asarray(_RNG.standard_normal(12))
TARGET = jnp.asarray([0.3, -0.2, 0.1])
LAM = 0.7


def objective(w, lam, X, y):
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * lam * jnp.sum(w**2)


def ridge(init_params, lam, X, y):  # the forward solver: never differentiated
    del init_params
    n = len(y)
    return jnp.linalg.solve(X.T @ X / n + lam * jnp.eye(X.shape[1]), X.T @ y / n)


def ridge_kwargs(init_params, **kw):
    return ridge(init_params, kw["lam"], kw["X"], kw["y"])


def closed_form(lam):
    """w(λ), dw/dλ = −A⁻¹w and d²w/dλ² = 2A⁻²w, with A = XᵀX/n + λI."""
    a = np.asarray(X.T @ X / len(Y)) + lam * np.eye(3)
    w = np.linalg.solve(a, np.asarray(X.T @ Y / len(Y)))
    dw = -np.linalg.solve(a, w)
    return w, dw, -2 * np.linalg.solve(a, dw)


def validation_hessian(lam):
    """d²/dλ² of ½‖w(λ) − t‖²: ‖w'‖² + (w − t)·w''."""
    w, dw, d2w = closed_form(lam)
    return dw @ dw + (w - np.asarray(TARGET)) @ d2w


optimality = jax.grad(objective)


def fixed_point_map(w, lam, X, y):
    return w - 0.5 * optimality(w, lam, X, y)


@pytest.mark.parametrize("kind", ["root", "fixed_point"])
def test_decorated_ridge_derivatives_match_the_closed_form(kind):
    decorated = (
        implicax.custom_root(optimality)(ridge)
        if kind == "root"
        else implicax.custom_fixed_point(fixed_point_map)(ridge)
    )
    w, dw, _ = closed_form(LAM)
    np.testing.assert_allclose(decorated(None, LAM, X, Y), w, rtol=1e-12)
    np.testing.assert_allclose(jax.jacrev(decorated, argnums=1)(None, LAM, X, Y), dw, rtol=1e-9)
    np.testing.assert_allclose(jax.jacfwd(decorated, argnums=1)(None, LAM, X, Y), dw, rtol=1e-9)
    # Keyword arguments, in any order, and under jit.
    by_keyword = jax.jit(lambda lam: decorated(None, y=Y, lam=lam, X=X))
    np.testing.assert_allclose(jax.jacrev(by_keyword)(LAM), dw, rtol=1e-9)

    def validation(lam):
        return 0.5 * jnp.sum((decorated(None, lam, X, Y) - TARGET) ** 2)

    np.testing.assert_allclose(jax.hessian(validation)(LAM), validation_hessian(LAM), rtol=1e-8)


def test_keyword_only_solver_and_vmap():
    decorated = implicax.custom_root(optimality)(ridge_kwargs)
    lams = jnp.asarray([0.3, 0.7, 2.0])
    grads = jax.vmap(jax.grad(lambda lam: decorated(None, lam=lam, X=X, y=Y)[0]))(lams)
    np.testing.assert_allclose(grads, [closed_form(lam)[1][0] for lam in lams], rtol=1e-9)


def test_decorated_solver_under_pmap():
    decorated = implicax.custom_root(optimality)(ridge)
    devices = jax.local_device_count()
    lams = jnp.linspace(0.3, 2.0, devices)
    grads = jax.pmap(jax.grad(lambda lam: decorated(None, lam, X, Y)[0]))(lams)
    np.testing.assert_allclose(grads, [closed_form(lam)[1][0] for lam in lams], rtol=1e-9)


@pytest.mark.parametrize(
    "solve",
    [implicax.CG(), implicax.Dense(), lambda matvec, b: jsl.cg(matvec, b, tol=1e-12)[0]],
    ids=["CG", "Dense", "scipy-cg-callable"],
)
def test_linear_solver_choices(solve):
    decorated = implicax.custom_root(optimality, solve=solve)(ridge)
    np.testing.assert_allclose(
        jax.grad(lambda lam: decorated(None, lam, X, Y)[1])(LAM), closed_form(LAM)[1][1], rtol=1e-8
    )


def test_has_aux_returns_the_solvers_aux_undifferentiated():
    def ridge_with_aux(init_params, lam, X, y):
        w = ridge(init_params, lam, X, y)
        return w, {"lam_seen": lam, "norm": jnp.linalg.norm(w)}

    decorated = implicax.custom_root(optimality, has_aux=True)(ridge_with_aux)
    w, aux = decorated(None, LAM, X, Y)
    np.testing.assert_allclose(aux["norm"], np.linalg.norm(closed_form(LAM)[0]), rtol=1e-12)
    jac, aux_jac = jax.jacrev(decorated, argnums=1)(None, LAM, X, Y)
    np.testing.assert_allclose(jac, closed_form(LAM)[1], rtol=1e-9)
    assert float(aux_jac["lam_seen"]) == 0.0 and float(aux_jac["norm"]) == 0.0


def test_reference_signature_matches_keywords_to_positions():
    def optimality_renamed(w, strength, features, targets):
        return optimality(w, strength, features, targets)

    def solver(init_params, strength, features, targets):
        return ridge(init_params, strength, features, targets)

    decorated = implicax.custom_root(optimality_renamed, reference_signature=solver)(solver)
    got = jax.grad(lambda s: decorated(None, targets=Y, strength=s, features=X)[2])(LAM)
    np.testing.assert_allclose(got, closed_form(LAM)[1][2], rtol=1e-9)


def test_a_wrong_solution_is_reported():
    def sloppy(init_params, lam, X, y):
        return ridge(init_params, lam, X, y) + 1e-2

    with pytest.warns(RuntimeWarning, match="forward solve of 'sloppy' did not converge"):
        implicax.custom_root(optimality)(sloppy)(None, LAM, X, Y)
    with pytest.raises(implicax.SolveError):
        implicax.custom_root(optimality, on_failure="raise")(sloppy)(None, LAM, X, Y)


def test_bad_input_gets_clear_errors():
    with pytest.raises(TypeError, match="optimality_fun must be callable"):
        implicax.custom_root(3)
    with pytest.raises(TypeError, match="decorates a solver function"):
        implicax.custom_fixed_point(fixed_point_map)(None)
    with pytest.raises(TypeError, match="optimality_fun must have the shapes of the solution"):
        implicax.custom_root(lambda w, lam, X, y: jnp.sum(w))(ridge)(None, LAM, X, Y)
    with pytest.raises(TypeError, match="pytree of floating-point arrays"):
        implicax.custom_root(optimality)(lambda *_: "done")(None, LAM, X, Y)
    with pytest.raises(TypeError, match="must return \\(solution, aux\\)"):
        implicax.custom_root(optimality, has_aux=True)(ridge)(None, LAM, X, Y)
    with pytest.raises(TypeError, match="do not fit the reference signature"):
        implicax.custom_root(optimality)(ridge_kwargs)(None, lam=LAM, X=X, z=Y)


# --- has_aux on root_solve and fixed_point_solve ---------------------------------------------


def residual_with_aux(x, t):  # x³ + x = t; aux x²·t
    return x**3 + x - t, {"scaled": x**2 * t}


def test_root_solve_has_aux_is_differentiable_through_the_solution():
    t = jnp.asarray([2.0, 10.0])  # roots 1 and 2; dx/dt = 1 / (3x² + 1)

    def loss(t):
        x, aux = implicax.root_solve(residual_with_aux, jnp.ones(2), t, has_aux=True)
        return jnp.sum(aux["scaled"])

    x = np.asarray([1.0, 2.0])
    expected = 2 * x * np.asarray(t) / (3 * x**2 + 1) + x**2  # d(x²t)/dt
    np.testing.assert_allclose(jax.grad(loss)(t), expected, rtol=1e-9)
    np.testing.assert_allclose(jax.jacfwd(loss)(t), expected, rtol=1e-9)
    (x_star, aux), stats = implicax.root_solve(
        residual_with_aux, jnp.ones(2), t, has_aux=True, return_stats=True
    )
    np.testing.assert_allclose(x_star, x, rtol=1e-9)
    assert bool(stats.converged)


def test_fixed_point_solve_has_aux_and_its_errors():
    def cell(z, a):
        return 0.5 * jnp.cos(z) + a, jnp.sum(z)

    z, total = implicax.fixed_point_solve(cell, jnp.zeros(3), 0.1, has_aux=True)
    np.testing.assert_allclose(total, jnp.sum(z), rtol=1e-12)
    with pytest.raises(TypeError, match="must return a pair \\(out, aux\\)"):
        implicax.fixed_point_solve(lambda z, a: 0.5 * z + a, jnp.zeros(3), 0.1, has_aux=True)
