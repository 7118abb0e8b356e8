"""Regression tests for silent wrong answers: each case here was reported converged (or
crashed) before the solver protocol and the verified linear solves."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicax

FORWARD = [
    implicax.FixedPointIteration(),
    implicax.Anderson(),
    implicax.Broyden(),
    implicax.Newton(),
]
LINEAR = [implicax.BiCGStab(), implicax.GMRES(), implicax.CG(), implicax.Neumann()]


def _name(solver):
    return type(solver).__name__


# --- NaN-safe convergence decisions (XLA's CPU max drops NaNs from 4096 elements) -------------


@pytest.mark.parametrize("solver", FORWARD, ids=_name)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_a_nan_in_5000_entries_is_not_converged(solver, dtype):
    p = jnp.zeros(5000, dtype).at[3].set(jnp.nan)
    x, stats = implicax.fixed_point_solve(
        lambda x, p: 0.5 * x + p,
        jnp.zeros(5000, dtype),
        p,
        solver=solver,
        return_stats=True,
        on_failure="ignore",
    )
    assert not bool(stats.converged)
    assert bool(stats.diverged)
    assert np.isnan(float(stats.residual_norm))
    assert np.isnan(np.asarray(x)[3])
    with pytest.warns(RuntimeWarning, match="diverged"):
        implicax.fixed_point_solve(
            lambda x, p: 0.5 * x + p, jnp.zeros(5000, dtype), p, solver=solver
        )
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(
            implicax.fixed_point_solve(
                lambda x, p: 0.5 * x + p,
                jnp.zeros(5000, dtype),
                p,
                solver=solver,
                on_failure="raise",
            )
        )


def test_a_fully_nan_state_reports_nan_not_minus_inf():
    _, stats = implicax.fixed_point_solve(
        lambda x, p: 0.5 * x + p,
        jnp.zeros(5000),
        jnp.full(5000, jnp.nan),
        return_stats=True,
        on_failure="ignore",
    )
    assert np.isnan(float(stats.residual_norm)) and not bool(stats.converged)


@pytest.mark.parametrize("linear_solver", LINEAR + [implicax.Dense()], ids=_name)
def test_a_nan_in_a_large_right_hand_side_is_reported(linear_solver):
    if isinstance(linear_solver, implicax.Dense):
        n = 64  # Dense materialises n × n
        b = jnp.ones(n).at[7].set(jnp.nan)
    else:
        n = 5000
        b = jnp.ones(n).at[7].set(jnp.nan)
    x, stats = linear_solver.solve(lambda v: 2.0 * v, b)
    assert not bool(stats.converged) and bool(stats.diverged)
    assert np.isnan(np.asarray(x)).any()


# --- singular and inconsistent systems are reported ------------------------------------------


@pytest.mark.parametrize("linear_solver", LINEAR + [implicax.Dense()], ids=_name)
def test_an_inconsistent_singular_system_is_not_converged(linear_solver):
    a = jnp.array([1.0, 0.0])
    x, stats = linear_solver.solve(lambda v: a * v, jnp.ones(2))
    assert not bool(stats.converged)
    # The reported residual is the true one: at least the distance of b from range(A), 1.
    residual = float(stats.residual_norm)
    assert np.isnan(residual) or residual >= 1 - 1e-6
    if np.isfinite(np.asarray(x)).all():
        np.testing.assert_allclose(
            residual, np.linalg.norm(np.ones(2) - a * np.asarray(x)), rtol=1e-6
        )


def test_a_singular_markov_system_is_reported_by_dense():
    # I − P for a stochastic P: singular (the constant vector is in its kernel), b not in range.
    p = jnp.array([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.5, 0.5]])
    a = jnp.eye(3) - p.T
    _, stats = implicax.Dense().solve(lambda v: a @ v, jnp.array([1.0, 0.0, 0.0]))
    assert not bool(stats.converged)


def test_the_softmax_gauge_problem_raises_under_raise():
    # softmax(z) = θ has a singular Jacobian (softmax is invariant to z + c): no derivative.
    theta = jnp.array([0.2, 0.3, 0.5])

    def solution(theta):
        return implicax.root_solve(
            lambda z, t: jax.nn.softmax(z) - t,
            jnp.zeros(3),
            theta,
            solver=lambda fn, z0, t: jnp.log(t),
            linear_solver=implicax.GMRES(),
            on_failure="raise",
        )

    with pytest.raises(Exception, match="linear solve did not converge"):
        jax.block_until_ready(jax.grad(lambda t: solution(t)[0])(theta))


# --- scale: no overflow to exact zeros, no overflow to NaN ------------------------------------


@pytest.mark.parametrize("linear_solver", LINEAR, ids=_name)
def test_a_huge_float32_cotangent_gives_the_right_gradient(linear_solver):
    def loss(p):
        x = implicax.fixed_point_solve(
            lambda x, p: 0.5 * x + p,
            jnp.zeros(3, jnp.float32),
            p,
            linear_solver=linear_solver,
            on_failure="raise",
        )
        return 2e19 * jnp.sum(x)

    gradient = jax.grad(loss)(jnp.ones(3, jnp.float32))  # ∂x/∂p = 2·I
    # Relative residual ≤ 2.4e-5 of a system with condition 1: the same relative error.
    np.testing.assert_allclose(np.asarray(gradient), 4e19, rtol=5e-5)


def test_a_large_float32_root_has_a_finite_derivative():
    def root(c):
        return implicax.root_solve(lambda x, c: x**2 - c, jnp.float32(1.0), c, on_failure="raise")

    c = jnp.float32(1e16)
    np.testing.assert_allclose(float(root(c)), 1e8, rtol=1e-5)
    np.testing.assert_allclose(float(jax.grad(root)(c)), 0.5e-8, rtol=1e-4)  # 1/(2√c)


# --- BiCGStab breakdown --------------------------------------------------------------------------


def test_bicgstab_recovers_from_a_breakdown():
    # ⟨b, A·b⟩ = 0 for a permutation: plain BiCGStab divides 0 by 0 at once.
    a = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    x, stats = implicax.BiCGStab().solve(lambda v: a @ v, jnp.array([1.0, 0.0]))
    assert bool(stats.converged)
    np.testing.assert_allclose(np.asarray(x), [0.0, 1.0], atol=1e-6)


def test_bicgstab_reports_a_rotation_that_gmres_solves():
    # A rotation by 90°: ⟨s, A·s⟩ = 0 for every s, so BiCGStab's stabilising step vanishes at
    # every iteration, a known limit of the method. It must be reported, not passed off.
    n = 6
    a = jnp.kron(jnp.eye(n // 2), jnp.array([[0.0, -1.0], [1.0, 0.0]]))
    b = jnp.arange(1.0, n + 1)
    _, stats = implicax.BiCGStab().solve(lambda v: a @ v, b)
    assert not bool(stats.converged)
    x, stats = implicax.GMRES().solve(lambda v: a @ v, b)
    assert bool(stats.converged)
    np.testing.assert_allclose(np.asarray(a @ x), np.asarray(b), atol=1e-8)


# --- exact zeros are converged with atol = 0 -----------------------------------------------------


def test_newton_atol_zero_exact_root_with_a_zero_component():
    a = jnp.array([2.0, 3.0])
    x, stats = implicax.root_solve(
        lambda x, _: a * x - jnp.array([8.0, 0.0]),
        jnp.ones(2),
        solver=implicax.Newton(atol=0.0),
        return_stats=True,
        on_failure="raise",
    )
    assert bool(stats.converged)
    np.testing.assert_allclose(np.asarray(x), [4.0, 0.0])


def test_fixed_point_iteration_atol_zero_relu_map():
    # x = relu(0.5·x + b): components with b < 0 are exactly 0 at the fixed point.
    b = jnp.array([1.0, -1.0, 0.5, -0.2])
    x, stats = implicax.fixed_point_solve(
        lambda x, b: jax.nn.relu(0.5 * x + b),
        jnp.zeros(4),
        b,
        solver=implicax.FixedPointIteration(atol=0.0),
        return_stats=True,
        on_failure="raise",
    )
    assert bool(stats.converged) and int(stats.steps) > 1
    np.testing.assert_allclose(np.asarray(x), [2.0, 0.0, 1.0, 0.0], rtol=1e-10)


# --- symmetric-only solvers never give a silently wrong adjoint ----------------------------------


@pytest.mark.parametrize("coupling", [0.1, 0.2])
def test_cg_on_a_nonsymmetric_jacobian_is_right_or_reported(coupling):
    # ∂F/∂x = A = diag(1..5) + coupling·(strict upper triangle): nonsymmetric. With coupling
    # 0.1, CG converges on both A and Aᵀ (so the adjoint of a solve that assumed symmetry
    # would be silently wrong by O(0.1)); with 0.2 it converges on Aᵀ only, and the tangent
    # solve is reported.
    a = jnp.diag(jnp.arange(1.0, 6.0)) + coupling * jnp.triu(jnp.ones((5, 5)), 1)
    v = jnp.array([1.0, -2.0, 0.5, 1.0, 3.0])

    def solution(theta):
        return implicax.root_solve(
            lambda x, t: a @ x - t,
            jnp.zeros(5),
            theta,
            solver=lambda fn, x0, t: jnp.linalg.solve(a, t),
            linear_solver=implicax.CG(),
            on_failure="nan",
        )

    theta = jnp.arange(1.0, 6.0)
    gradient = jax.grad(lambda t: v @ solution(t))(theta)
    np.testing.assert_allclose(np.asarray(gradient), np.linalg.solve(np.asarray(a).T, v), rtol=1e-8)
    tangent = np.asarray(jax.jvp(solution, (theta,), (v,))[1])
    if coupling == 0.1:
        np.testing.assert_allclose(tangent, np.linalg.solve(np.asarray(a), v), rtol=1e-8)
    else:
        assert np.isnan(tangent).all()


# --- Broyden: secant condition after a restart; memory -----------------------------------------


def _inverse_jacobian(state, history):
    active = np.arange(history) < int(state.count)
    us, vs = np.asarray(state.us)[active], np.asarray(state.vs)[active]
    return np.eye(us.shape[1]) + us.T @ vs


def test_broyden_keeps_the_secant_condition_across_restarts():
    history, n = 2, 5
    rng = np.random.default_rng(0)
    a = jnp.asarray(np.eye(n) + 0.3 * rng.standard_normal((n, n)))
    b = jnp.asarray(rng.standard_normal(n))
    solver = implicax.Broyden(history=history)
    x0 = jnp.zeros(n)
    problem = implicax.Problem(
        lambda x: a @ x - b, fixed_point=False, like=jax.ShapeDtypeStruct((n,), x0.dtype)
    )
    state = solver.init(problem, x0)
    for _ in range(2 * history + 2):  # passes through two restarts
        new, _ = solver.step(problem, state)
        h = _inverse_jacobian(new, history)
        dx = np.asarray(new.x - state.x)
        df = np.asarray(new.fx - state.fx)
        np.testing.assert_allclose(h @ df, dx, rtol=1e-8, atol=1e-12)
        state = new


@pytest.mark.parametrize(
    ("solver_type", "per_slot"),
    # Anderson keeps x_i and f_i, Broyden u_i and v_i (5.8 vectors per slot before the
    # rewrite).
    [(implicax.Anderson, 2), (implicax.Broyden, 2)],
    ids=["Anderson", "Broyden"],
)
def test_history_memory_per_slot(solver_type, per_slot):
    n = 100_000
    x0 = jnp.zeros(n, jnp.float32)
    p = jnp.full(n, 0.1, jnp.float32)

    def temp_bytes(history):
        solver = solver_type(history=history)
        solve = jax.jit(
            lambda x0, p: implicax.fixed_point_solve(
                lambda x, p: 0.5 * jnp.tanh(x) + p, x0, p, solver=solver
            )
        )
        return solve.lower(x0, p).compile().memory_analysis().temp_size_in_bytes

    slope = (temp_bytes(8) - temp_bytes(2)) / 6 / (4 * n)  # vectors per history slot
    assert slope <= per_slot + 0.01, slope


# --- Newton reports its inner linear solves --------------------------------------------------


def test_newton_counts_failed_inner_solves():
    a = jnp.asarray(np.diag(np.linspace(1.0, 100.0, 30)))
    solver = implicax.Newton(linear_solver=implicax.GMRES(max_steps=2, restart=2))
    _, stats = implicax.root_solve(
        lambda x, _: a @ x + 0.1 * jnp.tanh(x) - 1.0,
        jnp.zeros(30),
        solver=solver,
        return_stats=True,
        on_failure="ignore",
    )
    assert int(stats.inner_failures) >= 1
    assert int(stats.inner_failures) <= int(stats.steps)
    _, good = implicax.root_solve(
        lambda x, _: a @ x + 0.1 * jnp.tanh(x) - 1.0, jnp.zeros(30), return_stats=True
    )
    assert int(good.inner_failures) == 0 and bool(good.converged)


# --- traced tolerances and step limits -------------------------------------------------------


def test_tolerances_and_max_steps_may_be_traced_without_recompiling():
    traces = []

    @jax.jit
    def solve(solver, p):
        traces.append(None)
        return implicax.fixed_point_solve(
            lambda x, p: 0.9 * x + p,
            jnp.zeros(3),
            p,
            solver=solver,
            return_stats=True,
            on_failure="ignore",
        )

    p = jnp.ones(3)
    few = implicax.FixedPointIteration(max_steps=jnp.asarray(5), rtol=jnp.asarray(1e-8))
    many = implicax.FixedPointIteration(max_steps=jnp.asarray(400), rtol=jnp.asarray(1e-8))
    _, stats_few = solve(few, p)
    x, stats_many = solve(many, p)
    assert len(traces) == 1
    assert int(stats_few.steps) == 5 and not bool(stats_few.converged)
    assert bool(stats_many.converged)
    np.testing.assert_allclose(np.asarray(x), 10.0, rtol=1e-7)
    loose = dataclasses.replace(many, rtol=jnp.asarray(1e-2))
    _, stats_loose = solve(loose, p)
    assert len(traces) == 1 and int(stats_loose.steps) < int(stats_many.steps)


def test_linear_solver_limits_may_be_traced():
    @jax.jit
    def gradient(limit, p):
        linear_solver = implicax.GMRES(max_steps=limit, restart=4)
        return jax.grad(
            lambda p: jnp.sum(
                implicax.fixed_point_solve(
                    lambda x, p: 0.5 * jnp.tanh(x) + p,
                    jnp.zeros(8),
                    p,
                    linear_solver=linear_solver,
                    on_failure="nan",
                )
            )
        )(p)

    p = jnp.linspace(0.0, 1.0, 8)
    assert np.isnan(np.asarray(gradient(jnp.asarray(1), p))).all()
    good = gradient(jnp.asarray(100), p)
    x = implicax.fixed_point_solve(lambda x, p: 0.5 * jnp.tanh(x) + p, jnp.zeros(8), p)
    np.testing.assert_allclose(
        np.asarray(good), 1 / (1 - 0.5 / np.cosh(np.asarray(x)) ** 2), rtol=1e-8
    )


# --- preconditioners and scaled step limits --------------------------------------------------


def _poisson(side):
    """The 5-point Laplacian on a side × side grid (Dirichlet), as a matvec on (side, side)."""

    def matvec(u):
        padded = jnp.pad(u, 1)
        return 4 * u - padded[:-2, 1:-1] - padded[2:, 1:-1] - padded[1:-1, :-2] - padded[1:-1, 2:]

    return matvec


def test_default_step_limit_scales_with_the_problem():
    side = 160  # CG needs about 340 products here
    matvec = _poisson(side)
    b = jnp.ones((side, side))
    x, stats = implicax.CG().solve(matvec, b)
    assert bool(stats.converged) and int(stats.steps) > 256  # the old fixed limit
    np.testing.assert_allclose(np.asarray(matvec(x)), 1.0, atol=1e-8)


@pytest.mark.parametrize("solver_type", [implicax.CG, implicax.BiCGStab, implicax.GMRES])
def test_a_preconditioner_cuts_the_steps(solver_type):
    d = jnp.logspace(0, 4, 200)
    off = 0.1 * jnp.ones(199)

    def matvec(v):  # tridiagonal SPD, badly scaled diagonal
        return d * v + jnp.pad(off * v[1:], (0, 1)) + jnp.pad(off * v[:-1], (1, 0))

    b = jnp.ones(200)
    _, plain = solver_type(max_steps=5000).solve(matvec, b)
    x, stats = solver_type(preconditioner=lambda v: v / d).solve(matvec, b)
    assert bool(stats.converged) and bool(plain.converged)
    assert int(stats.steps) < int(plain.steps) / 2
    np.testing.assert_allclose(np.asarray(matvec(x)), 1.0, rtol=1e-8)


def test_invalid_preconditioner_is_rejected():
    with pytest.raises(TypeError, match="preconditioner"):
        implicax.GMRES(preconditioner=3)


def test_no_warning_when_everything_converges():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.grad(lambda p: jnp.sum(implicax.root_solve(lambda x, p: x**3 - p, jnp.ones(3), p)))(
            jnp.array([1.0, 8.0, 27.0])
        )


# --- the verified driver's edges -------------------------------------------------------------


def test_a_solution_that_overflows_when_scaled_back_is_not_converged():
    x, stats = implicax.BiCGStab().solve(lambda v: 1e-3 * v, jnp.full(3, 1e37, jnp.float32))
    assert not bool(stats.converged) and bool(stats.diverged)


@pytest.mark.parametrize(
    ("solver", "most"),
    # BiCGStab's iterations take two products: it may end one past the limit.
    [
        (implicax.CG(max_steps=3), 3),
        (implicax.GMRES(max_steps=3), 3),
        (implicax.BiCGStab(max_steps=3), 4),
    ],
    ids=_name,
)
def test_the_product_budget_includes_the_check(solver, most):
    _, stats = solver.solve(lambda v: jnp.arange(1.0, 41.0) * v, jnp.ones(40))
    assert 1 <= int(stats.steps) <= most and not bool(stats.converged)


def test_gmres_on_the_zero_operator_stays_finite():
    x, stats = implicax.GMRES().solve(lambda v: 0 * v, jnp.ones(3))
    assert not bool(stats.converged) and not bool(stats.diverged)
    assert np.isfinite(np.asarray(x)).all()
    np.testing.assert_allclose(float(stats.residual_norm), np.sqrt(3.0))


def test_a_direct_solver_subclass_that_is_not_a_dataclass():
    class Diagonal(implicax.AbstractLinearSolver):
        """Solves diagonal systems from one product with the ones vector."""

        def solve(self, matvec, b):
            x = b / matvec(jnp.ones_like(b))
            residual = jnp.linalg.norm(b - matvec(x))
            stats = implicax.SolveStats(
                jnp.asarray(2), residual, residual <= 1e-12, jnp.asarray(False), jnp.asarray(0)
            )
            return x, stats

    gradient = jax.grad(
        lambda p: jnp.sum(
            implicax.fixed_point_solve(
                lambda x, p: 0.5 * x + p,
                jnp.zeros(2),
                p,
                linear_solver=Diagonal(),
                on_failure="raise",
            )
        )
    )(jnp.ones(2))
    np.testing.assert_allclose(np.asarray(gradient), 2.0)


def test_newton_on_a_large_poisson_problem_takes_its_quadratic_steps():
    # −Δu + u³ = 1 on the unit square, a 128² grid: each Newton system needs more than 256 products (the old
    # fixed limit, which made the inexact steps quietly double the Newton steps).
    side = 128
    laplacian = _poisson(side)
    h2 = (side + 1.0) ** 2  # the unit square's grid spacing, squared, inverted
    _, stats = implicax.root_solve(
        lambda u, f: h2 * laplacian(u) + u**3 - f,
        jnp.zeros((side, side)),
        jnp.ones((side, side)),
        return_stats=True,
        on_failure="raise",
    )
    assert bool(stats.converged)
    assert int(stats.inner_failures) == 0
    assert int(stats.steps) <= 6


def test_a_preconditioner_from_the_differentiated_array_via_stop_gradient():
    a = jnp.arange(1.0, 5.0)

    def total(p):
        inverse = jax.lax.stop_gradient(a * p)
        solver = implicax.BiCGStab(preconditioner=lambda v: v / inverse)
        return implicax.root_solve(
            lambda x, p: a * p * x - 1.0, jnp.zeros(4), p, linear_solver=solver, on_failure="raise"
        ).sum()

    p = jnp.array([1.0, 2.0, 0.5, 1.5])
    np.testing.assert_allclose(
        np.asarray(jax.grad(total)(p)), -1 / (np.asarray(a) * np.asarray(p) ** 2), rtol=1e-10
    )
