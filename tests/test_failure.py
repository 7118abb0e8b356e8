"""A failed solve is reported, never silent; healthy batch elements are unaffected."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicax


def diverging(x, p):
    return 2.0 * x + p  # |∂f/∂x| = 2: fixed-point iteration diverges


def contraction(x, p):
    return 0.5 * jnp.cos(x) + p


def scaled(x, p):
    # Contractive for p < 1, diverging for p > 1: one entry of a batch can fail.
    return p * x + 1.0


def test_default_warns_and_stats_record_failure():
    with pytest.warns(RuntimeWarning, match="forward solve did not converge"):
        x, stats = implicax.fixed_point_solve(
            diverging, jnp.zeros(2), 1.0, solver=implicax.FixedPointIteration(), return_stats=True
        )
    assert not bool(stats.converged)
    assert int(stats.steps) <= 256
    assert not np.isfinite(float(stats.residual_norm)) or float(stats.residual_norm) > 1


def test_overflow_stops_the_loop_early():
    with pytest.warns(RuntimeWarning, match="did not converge"):
        _, stats = implicax.fixed_point_solve(
            diverging,
            jnp.zeros(2, jnp.float32),
            jnp.float32(1.0),
            solver=implicax.FixedPointIteration(max_steps=10_000),
            return_stats=True,
        )
    assert int(stats.steps) < 200  # 2**128 overflows float32 long before max_steps


def test_max_steps_too_small_is_reported():
    with pytest.warns(RuntimeWarning, match=r"did not converge \(3 steps"):
        _, stats = implicax.fixed_point_solve(
            contraction,
            jnp.zeros(2),
            0.1,
            solver=implicax.FixedPointIteration(max_steps=3),
            return_stats=True,
        )
    assert int(stats.steps) == 3 and not bool(stats.converged)


def test_nan_policy_returns_nan():
    x = implicax.fixed_point_solve(
        diverging, jnp.zeros(2), 1.0, solver=implicax.FixedPointIteration(), on_failure="nan"
    )
    assert np.all(np.isnan(x))


def test_raise_policy_raises_from_inside_jit():
    solve = jax.jit(
        lambda p: implicax.fixed_point_solve(
            diverging, jnp.zeros(2), p, solver=implicax.FixedPointIteration(), on_failure="raise"
        )
    )
    with pytest.raises(Exception, match="forward solve did not converge"):
        jax.block_until_ready(solve(1.0))


@pytest.mark.parametrize("on_failure", ["warn", "raise"])
def test_failure_report_adds_no_jax_effect(on_failure):
    # A jitted function with a JAX effect (such as jax.debug.callback) is dispatched on JAX's
    # slower Python path on every call; the report must not add one, nor be compiled away.
    def loss(p):
        x = implicax.fixed_point_solve(diverging, jnp.zeros(2), p, on_failure=on_failure)
        return jnp.sum(x)

    def stats_only(p):
        _, stats = implicax.fixed_point_solve(
            diverging, jnp.zeros(2), p, on_failure=on_failure, return_stats=True
        )
        return stats.converged

    for fn in (loss, jax.value_and_grad(loss), stats_only):
        assert not jax.make_jaxpr(fn)(1.0).effects
        assert "callback" in jax.jit(fn).lower(1.0).compile().as_text()


def test_report_runs_when_only_the_stats_are_used():
    def converged(p):
        _, stats = implicax.fixed_point_solve(diverging, jnp.zeros(2), p, return_stats=True)
        return stats.converged

    with pytest.warns(RuntimeWarning, match="forward solve did not converge") as record:
        assert not bool(jax.jit(converged)(1.0))
    assert len(record) == 1


def test_nan_produced_mid_solve_is_not_convergence():
    def poisoned(x, p):
        return jnp.where(x > 0.5, jnp.nan, x + p)

    with pytest.warns(RuntimeWarning, match="did not converge"):
        x, stats = implicax.fixed_point_solve(poisoned, jnp.zeros(1), 0.3, return_stats=True)
    assert not bool(stats.converged)


def test_one_failing_batch_element_leaves_the_others_intact():
    ps = jnp.array([0.5, 1.5, 0.25])

    def solve(p):
        return implicax.fixed_point_solve(
            scaled,
            jnp.zeros(()),
            p,
            solver=implicax.FixedPointIteration(),
            on_failure="nan",
            return_stats=True,
        )

    x, stats = jax.jit(jax.vmap(solve))(ps)
    np.testing.assert_array_equal(np.asarray(stats.converged), [True, False, True])
    np.testing.assert_allclose(x[jnp.array([0, 2])], 1 / (1 - ps[jnp.array([0, 2])]), rtol=1e-9)
    assert np.isnan(x[1])
    grads = jax.vmap(jax.grad(lambda p: solve(p)[0]))(ps)
    np.testing.assert_allclose(
        grads[jnp.array([0, 2])], 1 / (1 - ps[jnp.array([0, 2])]) ** 2, rtol=1e-8
    )
    assert np.isnan(grads[1])


def test_warning_under_vmap_counts_failed_elements():
    with pytest.warns(RuntimeWarning, match="for 1 of 3 batch elements"):
        jax.vmap(
            lambda p: implicax.fixed_point_solve(
                scaled, jnp.zeros(()), p, solver=implicax.FixedPointIteration()
            )
        )(jnp.array([0.5, 1.5, 0.25]))


def test_failed_backward_solve_is_reported():
    # Neumann needs a contraction; at the fixed point of x = 1.5·x the adjoint series diverges.
    def loss(p):
        return implicax.fixed_point_solve(
            lambda x, p: 1.5 * x - 0.5 * p,  # fixed point x = p, found by Newton in one step
            jnp.zeros(()),
            p,
            solver=implicax.Newton(),
            linear_solver=implicax.Neumann(max_steps=50),
            on_failure="nan",
        )

    assert np.isnan(jax.grad(loss)(1.0))
    with pytest.warns(RuntimeWarning, match="adjoint linear solve did not converge"):
        jax.grad(
            lambda p: implicax.fixed_point_solve(
                lambda x, p: 1.5 * x - 0.5 * p,
                jnp.zeros(()),
                p,
                solver=implicax.Newton(),
                linear_solver=implicax.Neumann(max_steps=50),
            )
        )(1.0)


def test_singular_jacobian_in_backward_solve_is_reported():
    # F(x) = x², root x = 0 with ∂F/∂x = 0: the tangent system is singular.
    def solve(p):
        return implicax.root_solve(
            lambda x, p: x**2 - p, jnp.zeros(()), p, solver=lambda fn, x0, p: x0, on_failure="nan"
        )

    assert np.isnan(jax.jvp(solve, (0.0,), (1.0,))[1])


def test_ignore_is_silent():
    x = implicax.fixed_point_solve(
        contraction,
        jnp.zeros(2),
        0.1,
        solver=implicax.FixedPointIteration(max_steps=2),
        on_failure="ignore",
    )
    assert x.shape == (2,)


def _ill_conditioned(condition, n=40):
    """A = Q·diag(s)·Qᵀ, symmetric positive definite, eigenvalues log-spaced from 1 to
    1/condition."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.logspace(0, -np.log10(condition), n)) @ q.T
    return jnp.asarray(a), jnp.asarray(rng.standard_normal(n)), jnp.asarray(rng.standard_normal(n))


def _solve_linear(a, p, linear_solver, on_failure):
    return implicax.root_solve(
        lambda x, p: a @ x - p,
        jnp.zeros_like(p),
        p,
        solver=lambda fn, x0, p: jnp.linalg.solve(a, p),
        linear_solver=linear_solver,
        on_failure=on_failure,
    )


FEW = implicax.BiCGStab(max_steps=20)


def test_well_conditioned_control_converges_in_few_steps():
    # The control for the test below: with cond(A) = 2 the same 20 products suffice.
    a, p, v = _ill_conditioned(2.0)
    gradient = jax.grad(lambda p: v @ _solve_linear(a, p, FEW, "raise"))(p)
    expected = np.linalg.solve(np.asarray(a), np.asarray(v))
    np.testing.assert_allclose(gradient, expected, rtol=1e-8, atol=1e-8)


def test_ill_conditioned_jacobian_in_backward_solve_is_reported():
    # F(x) = A·x − p with cond(A) = 1e8 (invertible, not singular): the forward solve is exact,
    # but 20 BiCGStab products cannot resolve eigenvalues spread over 8 decades.
    a, p, v = _ill_conditioned(1e8)
    assert 1e7 < np.linalg.cond(np.asarray(a)) < 1e9

    @jax.jit
    def derivatives(p, v):
        nan_gradient = jax.grad(lambda p: v @ _solve_linear(a, p, FEW, "nan"))(p)
        gradient = jax.grad(lambda p: v @ _solve_linear(a, p, FEW, "warn"))(p)
        tangent = jax.jvp(lambda p: _solve_linear(a, p, FEW, "warn"), (p,), (v,))[1]
        exact = jax.jvp(lambda p: _solve_linear(a, p, implicax.Dense(), "raise"), (p,), (v,))[1]
        return nan_gradient, gradient, tangent, exact

    with pytest.warns(RuntimeWarning) as caught:
        nan_gradient, gradient, tangent, exact = jax.block_until_ready(derivatives(p, v))
    messages = sorted(str(warning.message).split(" (")[0] for warning in caught)
    assert messages == [
        "implicax: the adjoint linear solve did not converge",
        "implicax: the tangent linear solve did not converge",
    ]
    assert np.all(np.isnan(nan_gradient))
    # The system is well posed: a direct solve gives the derivative A⁻¹·v to about
    # cond(A)·eps, and reports nothing; the 20-step answers returned under "warn" are far off.
    expected = np.linalg.solve(np.asarray(a), np.asarray(v))
    assert np.linalg.norm(exact - expected) <= 1e-6 * np.linalg.norm(expected)
    for approximate in (gradient, tangent):
        assert np.linalg.norm(approximate - expected) > 1e-3 * np.linalg.norm(expected)


ROOT_SOLVERS = [
    implicax.FixedPointIteration(),
    implicax.Anderson(),
    implicax.Broyden(),
    implicax.Newton(),
]


@pytest.mark.parametrize("solver", ROOT_SOLVERS, ids=lambda s: type(s).__name__)
def test_root_problem_without_a_root_is_not_converged(solver):
    # tanh(x) = 1.5 has no solution; iterates run away while the residual stays near 0.5.
    # From x0 = 1e5 the steps are already small relative to |x|, so a step or |x|-relative
    # test alone would pass; the residual test must not. (Newton's Jacobian is 0 there: NaN.)
    with pytest.warns(RuntimeWarning, match="forward solve did not converge"):
        _, stats = implicax.root_solve(
            lambda x, p: jnp.tanh(x) - p, jnp.full(1, 1e5), 1.5, solver=solver, return_stats=True
        )
    assert not bool(stats.converged)
    assert float(stats.residual_norm) > 0.49 or not np.isfinite(float(stats.residual_norm))


@pytest.mark.parametrize("solver_class", [implicax.Newton, implicax.Broyden])
def test_damping_does_not_loosen_the_root_test(solver_class):
    # The step test uses the full (undamped) step: a damped solve must still reach the root
    # to the tolerance, not stop when its shortened steps look small.
    x, stats = implicax.root_solve(
        lambda x, p: x**3 - p,
        jnp.full(1, 3.0),
        2.0,
        solver=solver_class(rtol=1e-8, atol=1e-12, damping=0.1, max_steps=2000),
        return_stats=True,
    )
    assert bool(stats.converged)
    np.testing.assert_allclose(np.asarray(x), 2.0 ** (1 / 3), rtol=2e-8)


def test_root_test_is_not_loosened_by_a_distant_start():
    # From x0 = 100, |F(x0)| = 1e6: the residual test alone (|F| ≤ atol + rtol·1e6 ≈ 24 in
    # float32) would accept x ≈ 2.7; the step test keeps Newton going to the root 2^(1/3).
    x, stats = implicax.root_solve(
        lambda x, p: x**3 - p, jnp.full(1, 100.0, jnp.float32), 2.0, return_stats=True
    )
    assert bool(stats.converged)
    np.testing.assert_allclose(np.asarray(x), 2.0 ** (1 / 3), rtol=1e-5)


@pytest.mark.parametrize("solver", ROOT_SOLVERS, ids=lambda s: type(s).__name__)
def test_exact_root_with_zero_atol_is_converged(solver):
    # F(x0) = 0 and x0 ≠ 0 with atol = 0: 0 / 0 in a scaled test must count as converged.
    solver = dataclasses.replace(solver, atol=0.0)
    x, stats = implicax.root_solve(
        lambda x, p: x**3 - p,
        jnp.array([2.0, 0.0]),
        jnp.array([8.0, 0.0]),
        solver=solver,
        return_stats=True,
    )
    assert bool(stats.converged) and int(stats.steps) <= 1
    np.testing.assert_array_equal(np.asarray(x), [2.0, 0.0])


def test_root_test_is_relative_to_the_initial_residual():
    # Newton is invariant to the scale of F, and with atol=0 so is the stopping test: the same
    # step count at every scale, in float32, where a test of |F| against atol + rtol·|x| could
    # not be met at scale 1e6 (it would need |x − 3| ≤ 3e-12).
    def residual(x, p):
        scale, target = p
        return scale * (x**3 + x - target)

    steps = []
    for scale in (1e-3, 1.0, 1e6):
        x, stats = implicax.root_solve(
            residual,
            jnp.zeros(2, jnp.float32),
            (jnp.float32(scale), jnp.float32(30.0)),
            solver=implicax.Newton(atol=0.0, linear_solver=implicax.Dense()),
            return_stats=True,
        )
        assert bool(stats.converged)
        np.testing.assert_allclose(np.asarray(x), 3.0, rtol=1e-5)
        assert float(stats.residual_norm) <= 2.4e-5 * 30.0 * scale
        steps.append(int(stats.steps))
    assert len(set(steps)) == 1, steps
