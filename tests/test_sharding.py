"""Multi-device: pmap, shard_map (with its varying-axes type checks) and jit with NamedSharding,
on the 4 CPU devices forced by conftest.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import implicax


def cell(x, p):
    return jnp.tanh(p["w"] * x + p["b"])


PARAMS = {"w": jnp.linspace(0.1, 0.5, 8), "b": jnp.linspace(-1.0, 1.0, 8)}


def solve(p, x0):
    return implicax.fixed_point_solve(cell, x0, p)


def reference(p):
    x = jax.lax.fori_loop(0, 300, lambda _, x: cell(x, p), jnp.zeros(8))
    return x, jax.grad(
        lambda p: jnp.sum(jax.lax.fori_loop(0, 300, lambda _, x: cell(x, p), jnp.zeros(8)))
    )(p)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 4, "conftest.py must force 4 CPU devices"
    return jax.make_mesh((4,), ("i",), axis_types=(jax.sharding.AxisType.Auto,))


def assert_tree_close(got, expected, rtol=1e-9):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(g).reshape(np.shape(e)), e, rtol=rtol, atol=1e-12)


def test_pmap_value_and_grad():
    x_ref, g_ref = reference(PARAMS)
    per_device = jax.tree.map(lambda a: a.reshape(4, 2), PARAMS)
    x, grad = jax.pmap(jax.value_and_grad(lambda p, x0: jnp.sum(solve(p, x0))), in_axes=(0, None))(
        per_device, jnp.zeros(2)
    )
    np.testing.assert_allclose(x, x_ref.reshape(4, 2).sum(axis=1), rtol=1e-9)
    assert_tree_close(grad, g_ref, rtol=1e-8)


def test_pmap_with_collective_in_loss():
    _, g_ref = reference(PARAMS)
    per_device = jax.tree.map(lambda a: a.reshape(4, 2), PARAMS)

    def loss(p, solve_fn):
        return jax.lax.psum(jnp.sum(solve_fn(p)), "d")

    def unrolled(p):
        return jax.lax.fori_loop(0, 300, lambda _, x: cell(x, p), jnp.zeros(2))

    got = jax.pmap(jax.grad(lambda p: loss(p, lambda p: solve(p, jnp.zeros(2)))), axis_name="d")(
        per_device
    )
    expected = jax.pmap(jax.grad(lambda p: loss(p, unrolled)), axis_name="d")(per_device)
    assert_tree_close(got, jax.tree.map(np.asarray, expected), rtol=1e-8)


def test_shard_map_varying_params_replicated_x0(mesh):
    x_ref, g_ref = reference(PARAMS)

    def loss(p, x0):
        return jax.lax.psum(jnp.sum(solve(p, x0[:2])), "i")

    grad = jax.jit(
        jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=(P("i"), P()), out_specs=P("i"))
    )(PARAMS, jnp.zeros(8))
    assert_tree_close(grad, g_ref, rtol=1e-8)
    x = jax.jit(
        jax.shard_map(
            lambda p, x0: solve(p, x0[:2]), mesh=mesh, in_specs=(P("i"), P()), out_specs=P("i")
        )
    )(PARAMS, jnp.zeros(8))
    assert_tree_close(x, x_ref)


@pytest.mark.parametrize(
    "linear_solver",
    [implicax.GMRES(), implicax.BiCGStab(), implicax.Neumann(), implicax.Dense()],
    ids=lambda s: type(s).__name__,
)
def test_shard_map_forward_mode_and_linear_solvers(mesh, linear_solver):
    def jac(p, x0):
        return jax.jacfwd(
            lambda b: implicax.fixed_point_solve(
                cell, x0[:2], {"w": p["w"], "b": b}, linear_solver=linear_solver
            )
        )(p["b"])

    got = jax.jit(jax.shard_map(jac, mesh=mesh, in_specs=(P("i"), P()), out_specs=P("i")))(
        PARAMS, jnp.zeros(8)
    )
    full = jax.jacfwd(
        lambda b: jax.lax.fori_loop(
            0, 300, lambda _, x: cell(x, {"w": PARAMS["w"], "b": b}), jnp.zeros(8)
        )
    )(PARAMS["b"])
    np.testing.assert_allclose(
        got,
        np.concatenate([full[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] for i in range(4)]),
        rtol=1e-8,
        atol=1e-12,
    )


def test_jit_with_named_sharding(mesh):
    x_ref, g_ref = reference(PARAMS)
    sharded = jax.device_put(PARAMS, NamedSharding(mesh, P("i")))
    x0 = jax.device_put(jnp.zeros(8), NamedSharding(mesh, P("i")))
    x = jax.jit(solve)(sharded, x0)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(solve(p, x0))))(sharded)
    assert_tree_close(x, x_ref)
    assert_tree_close(grad, g_ref, rtol=1e-8)
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, P("i")), 1)


# Failures under each multi-device transform: the entries of device 2 diverge (x ↦ 2x + 1),
# the others contract (x ↦ x/2 + 1, fixed point 2). The failure is reported, "nan" fills only
# the failed problem, and the healthy ones are untouched.
SLOPES = jnp.array([0.5, 0.5, 0.5, 0.5, 2.0, 2.0, 0.5, 0.5])
EXPECTED = np.where(np.asarray(SLOPES) < 1, 2.0, np.nan).reshape(4, 2)


def affine(x, slope):
    return slope * x + 1.0


def solve_affine(slope, on_failure):
    return implicax.fixed_point_solve(affine, jnp.zeros(2), slope, on_failure=on_failure)


def assert_only_device_2_failed(x):
    np.testing.assert_allclose(np.asarray(x).reshape(4, 2), EXPECTED, rtol=1e-9)


def assert_one_report(record):
    assert len([w for w in record if "did not converge" in str(w.message)]) == 1


def test_failure_under_pmap_is_reported_for_its_device():
    run = jax.pmap(solve_affine, static_broadcasted_argnums=1)
    with pytest.warns(RuntimeWarning, match="forward solve did not converge") as record:
        jax.block_until_ready(run(SLOPES.reshape(4, 2), "warn"))
    assert_one_report(record)
    assert_only_device_2_failed(run(SLOPES.reshape(4, 2), "nan"))


def test_failure_under_shard_map_is_reported_for_its_device(mesh):
    def run(on_failure):
        return jax.jit(
            jax.shard_map(
                lambda s: solve_affine(s, on_failure), mesh=mesh, in_specs=P("i"), out_specs=P("i")
            )
        )(SLOPES)

    with pytest.warns(RuntimeWarning, match="forward solve did not converge") as record:
        jax.block_until_ready(run("warn"))
    assert_one_report(record)
    assert_only_device_2_failed(run("nan"))


def test_failure_in_a_sharded_batch_names_the_failed_elements(mesh):
    slopes = jax.device_put(SLOPES.reshape(4, 2), NamedSharding(mesh, P("i")))

    def run(on_failure):
        return jax.jit(jax.vmap(lambda s: solve_affine(s, on_failure)))(slopes)

    with pytest.warns(RuntimeWarning, match="did not converge for 1 of 4 batch elements") as record:
        jax.block_until_ready(run("warn"))
    assert_one_report(record)
    assert_only_device_2_failed(run("nan"))
