"""Every linear and forward solver against NumPy and closed forms, on sizes past GMRES's restart
length and the Anderson/Broyden histories (so that restarts run), on ill-conditioned and
singular systems; and a user-written solver, tested like the built-ins."""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicax

ROOT = Path(__file__).resolve().parent.parent


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


BacktrackingNewton = _load_example("line_search_newton").BacktrackingNewton


def _name(solver):
    return type(solver).__name__


def _nonsymmetric(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.eye(n) * 2 + rng.standard_normal((n, n)) / np.sqrt(n)


def _spd(n, condition, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0, np.log10(condition), n)) @ q.T


GENERAL = [
    implicax.BiCGStab(),
    implicax.GMRES(restart=8),  # n = 60: several restarts
    implicax.GMRES(),
    implicax.Dense(),
]


@pytest.mark.parametrize("solver", GENERAL, ids=lambda s: repr(s)[:40])
def test_general_solvers_match_numpy_on_a_nonsymmetric_system(solver):
    a = _nonsymmetric(60)
    b = np.random.default_rng(1).standard_normal(60)
    x, stats = solver.solve(lambda v: jnp.asarray(a) @ v, jnp.asarray(b))
    assert bool(stats.converged) and not bool(stats.diverged)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(
        float(stats.residual_norm), np.linalg.norm(b - a @ np.asarray(x)), rtol=1e-3, atol=1e-13
    )


@pytest.mark.parametrize(
    "solver",
    [
        implicax.CG(),
        implicax.BiCGStab(max_steps=4000),
        implicax.GMRES(restart=40),
        implicax.Dense(),
    ],
    ids=lambda s: repr(s)[:40],
)
@pytest.mark.parametrize("condition", [10.0, 1e6])
def test_solvers_match_numpy_on_spd_systems(solver, condition):
    a = _spd(40, condition)
    b = np.random.default_rng(2).standard_normal(40)
    x, stats = solver.solve(lambda v: jnp.asarray(a) @ v, jnp.asarray(b))
    assert bool(stats.converged)
    # Converged means a small residual; the error is at most cond × that.
    exact = np.linalg.solve(a, b)
    np.testing.assert_allclose(np.asarray(x), exact, rtol=condition * 1e-9, atol=condition * 1e-10)


def test_neumann_matches_the_series_on_a_contraction():
    j = 0.5 * _nonsymmetric(30, seed=3) / np.linalg.norm(_nonsymmetric(30, seed=3), 2)
    a = np.eye(30) - j
    b = np.ones(30)
    x, stats = implicax.Neumann().solve(lambda v: jnp.asarray(a) @ v, jnp.asarray(b))
    assert bool(stats.converged)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=1e-9)


def test_neumann_reports_a_divergent_series():
    _, stats = implicax.Neumann().solve(lambda v: -v, jnp.ones(4))  # A = −I: J = 2I
    assert not bool(stats.converged)


@pytest.mark.parametrize("solver", [implicax.CG(), *GENERAL], ids=lambda s: repr(s)[:40])
def test_singular_consistent_systems_are_solved_or_reported(solver):
    # rank-deficient A with b in its range: any x with A·x = b is a valid answer.
    a = np.diag([1.0, 2.0, 0.0, 3.0])
    b = np.array([1.0, 1.0, 0.0, 1.0])
    x, stats = solver.solve(lambda v: jnp.asarray(a) @ v, jnp.asarray(b))
    if bool(stats.converged):
        np.testing.assert_allclose(a @ np.asarray(x), b, atol=1e-8)


@pytest.mark.parametrize("solver", [implicax.CG(), *GENERAL], ids=lambda s: repr(s)[:40])
def test_pytree_systems(solver):
    a = _spd(7, 5.0)
    b = {"u": jnp.asarray(np.arange(1.0, 4.0)), "w": jnp.asarray(np.arange(4.0, 8.0)).reshape(2, 2)}

    def matvec(v):
        flat = a @ jnp.concatenate([v["u"], v["w"].ravel()])
        return {"u": flat[:3], "w": flat[3:].reshape(2, 2)}

    x, stats = solver.solve(matvec, b)
    assert bool(stats.converged)
    exact = np.linalg.solve(a, np.arange(1.0, 8.0))
    np.testing.assert_allclose(np.concatenate([x["u"], np.ravel(x["w"])]), exact, rtol=1e-8)


@pytest.mark.parametrize("solver", [implicax.CG(), *GENERAL], ids=lambda s: repr(s)[:40])
def test_zero_right_hand_side(solver):
    x, stats = solver.solve(lambda v: 3.0 * v, jnp.zeros(5))
    assert bool(stats.converged)
    np.testing.assert_array_equal(np.asarray(x), 0.0)


# --- forward solvers ---------------------------------------------------------------------------

FORWARD = [
    implicax.FixedPointIteration(),
    implicax.Anderson(history=3),  # n = 50: the history wraps around many times
    implicax.Broyden(history=4),  # restarts
    implicax.Newton(),
    BacktrackingNewton(),
]


@pytest.mark.parametrize("solver", FORWARD, ids=_name)
def test_forward_solvers_find_a_fixed_point(solver):
    # x = 0.5·tanh(W·x) + b with ‖W‖₂ = 1: a contraction of rate ≤ 0.5; checked against
    # NumPy's root of the same equation by Newton iteration in float64.
    n = 50
    rng = np.random.default_rng(4)
    w = rng.standard_normal((n, n))
    w /= np.linalg.norm(w, 2)
    b = rng.standard_normal(n)
    x = np.zeros(n)
    for _ in range(100):
        f = x - 0.5 * np.tanh(w @ x) - b
        jac = np.eye(n) - 0.5 * (1 - np.tanh(w @ x) ** 2)[:, None] * w
        x = x - np.linalg.solve(jac, f)
    got, stats = implicax.fixed_point_solve(
        lambda x, p: 0.5 * jnp.tanh(p[0] @ x) + p[1],
        jnp.zeros(n),
        (jnp.asarray(w), jnp.asarray(b)),
        solver=solver,
        return_stats=True,
        on_failure="raise",
    )
    assert bool(stats.converged) and int(stats.steps) >= 1
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "solver", [implicax.Broyden(history=4), implicax.Newton(), BacktrackingNewton()], ids=_name
)
def test_forward_solvers_find_a_root(solver):
    # x + ½·tanh(x) = c, elementwise: one root, known because c is computed from it.
    x_true = np.linspace(-2.0, 2.0, 20)
    c = x_true + 0.5 * np.tanh(x_true)
    got, stats = implicax.root_solve(
        lambda x, c: x + 0.5 * jnp.tanh(x) - c,
        jnp.zeros(20),
        jnp.asarray(c),
        solver=solver,
        return_stats=True,
        on_failure="raise",
    )
    assert bool(stats.converged)
    np.testing.assert_allclose(np.asarray(got), x_true, rtol=1e-9, atol=1e-9)


def test_backtracking_newton_derivatives_match_the_closed_form():
    # arctan(x) = θ from far away, where plain Newton diverges: x = tan θ, dx/dθ = 1 + tan²θ.
    theta = jnp.array([0.5, 1.0, -1.2])

    def solution(theta):
        return implicax.root_solve(
            lambda x, t: jnp.arctan(x) - t,
            jnp.full(3, 10.0),
            theta,
            solver=BacktrackingNewton(),
            on_failure="raise",
        )

    np.testing.assert_allclose(np.asarray(solution(theta)), np.tan(theta), rtol=1e-10)
    derivative = 1 + np.tan(np.asarray(theta)) ** 2
    np.testing.assert_allclose(np.diag(jax.jacfwd(solution)(theta)), derivative, rtol=1e-8)
    np.testing.assert_allclose(np.diag(jax.jacrev(solution)(theta)), derivative, rtol=1e-8)
    second = 2 * np.tan(np.asarray(theta)) * derivative  # d²x/dθ²
    hessian = jax.jacfwd(jax.jacrev(solution))(theta)
    np.testing.assert_allclose(np.einsum("iii->i", hessian), second, rtol=1e-7)
    _, stats = implicax.root_solve(
        lambda x, t: jnp.arctan(x) - t,
        jnp.full(3, 10.0),
        theta,
        solver=implicax.Newton(),
        return_stats=True,
        on_failure="ignore",
    )
    assert not bool(stats.converged)  # plain Newton fails from there


def test_a_user_solver_gets_the_failure_policy():
    with pytest.warns(RuntimeWarning, match="forward solve did not converge"):
        implicax.root_solve(
            lambda x, _: jnp.tanh(x) - 1.5, jnp.zeros(2), solver=BacktrackingNewton(max_steps=5)
        )
