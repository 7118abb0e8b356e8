"""implicax_flax.nnx.DEQ (Flax NNX): derivatives against unrolled iteration and finite
differences, chex variants, nnx.jit / nnx.grad / nnx.Optimizer, vmap / pmap / shard_map /
sharded-jit training steps, cells, state and dropout.

Compilation dominates the run time, so each test compiles as few programs as it can.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from deq_helpers import (
    F64,
    FAST,
    INEXACT_GRADIENTS,
    PENALTY_SAMPLES,
    PROBE_CASES,
    RADIUS_STEPS,
    UNROLL,
    assert_tree_allclose,
    check_diagnostics,
    check_probe,
    data_mesh,
    random_data,
    replicated_per_device,
    split_per_device,
    symmetric_kernel,
)
from flax import nnx
from implicax_flax.nnx import DEQ, SolveStatsVariable
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import implicax
from implicax.testing import check_derivatives


def small(scale: float = 0.25):
    """Kernel initializer with operator norm about 2·scale (the tanh cells contract), drawn with
    NumPy: compiling float64 threefry for every shape would cost seconds."""

    def init(key, shape, dtype=F64):
        del key
        fan_in = int(np.prod(shape[:-1]))
        values = np.random.default_rng(list(shape)).standard_normal(shape)
        return jnp.asarray(scale * values / np.sqrt(fan_in), dtype)

    return init


def _linear(n_in, n_out, scale=0.25):
    return nnx.Linear(n_in, n_out, kernel_init=small(scale), param_dtype=F64, rngs=nnx.Rngs(0))


class Inner(nnx.Module):
    def __init__(self, n):
        self.mix = _linear(n, n)

    def __call__(self, z):
        return self.mix(z)


class DenseCell(nnx.Module):
    """z ↦ tanh(Inner(z) + Linear(x)), with a nested submodule."""

    def __init__(self, n=3):
        self.inner = Inner(n)
        self.inject = _linear(n, n, 1.0)

    def __call__(self, z, x):
        return jnp.tanh(self.inner(z) + self.inject(x))


class ConvNormCell(nnx.Module):
    """z ↦ LayerNorm(GroupNorm(tanh(Conv(z) + x))) / 2 on images."""

    def __init__(self, channels=4):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(
            channels, channels, (3, 3), kernel_init=small(0.15), param_dtype=F64, rngs=rngs
        )
        self.group_norm = nnx.GroupNorm(channels, num_groups=2, param_dtype=F64, rngs=rngs)
        self.layer_norm = nnx.LayerNorm(channels, param_dtype=F64, rngs=rngs)

    def __call__(self, z, x):
        return 0.5 * self.layer_norm(self.group_norm(jnp.tanh(self.conv(z) + x)))


def _functional(cell_factory, **kwargs):
    """(graphdef, params, rest) of a DEQ, and ``layer(params, x)`` built by nnx.merge."""
    graphdef, params, rest = nnx.split(DEQ(cell_factory(), **{**FAST, **kwargs}), nnx.Param, ...)

    def layer(params, x, **call):
        return nnx.merge(graphdef, params, rest)(x, **call)

    return params, rest, layer


def _unrolled(graphdef_and_rest, params, x):
    graphdef, rest = graphdef_and_rest
    cell = nnx.merge(graphdef, params, rest).cell
    return lax.fori_loop(0, UNROLL, lambda _, z: cell(z, x), jnp.zeros_like(x))


CELLS = {
    "dense-nested": (DenseCell, (2, 3)),
    "conv-groupnorm-layernorm": (ConvNormCell, (2, 3, 3, 4)),
}


@pytest.mark.parametrize("name", list(CELLS))
def test_matches_unrolled_iteration(name):
    """Value and gradient w.r.t. parameters and input (and, for one cell, the JVP)."""
    factory, shape = CELLS[name]
    x, weights = random_data(shape), random_data(shape, seed=2)
    model = DEQ(factory(), **FAST)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert set(params) == {"cell"}
    tangents = (jax.tree.map(np.ones_like, params), random_data(shape, seed=3))

    def implicit(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    @jax.jit
    def both(params, x):
        def derivatives(layer):
            loss = lambda p, x: jnp.sum(weights * layer(p, x) ** 2)
            out = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
            if name == "dense-nested":  # forward mode as well
                out = out, jax.jvp(layer, (params, x), tangents)
            return out

        return derivatives(implicit), derivatives(functools.partial(_unrolled, (graphdef, rest)))

    got, expected = both(params, x)
    assert_tree_allclose(got, expected)


@pytest.mark.parametrize(**INEXACT_GRADIENTS)
def test_inexact_gradient_matches_its_unrolled_definition(solver, steps, damping):
    """linear_solver=PhantomGradient: the gradient of k damped cell steps from z* held fixed;
    JacobianFree: the same with one undamped step."""
    factory, shape = CELLS["dense-nested"]
    x, weights = random_data(shape), random_data(shape, seed=2)
    graphdef, params, rest = nnx.split(
        DEQ(factory(), **{**FAST, "linear_solver": solver}), nnx.Param, ...
    )

    def implicit(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    def phantom(params, x):
        z = lax.stop_gradient(_unrolled((graphdef, rest), params, x))
        cell = nnx.merge(graphdef, params, rest).cell
        for _ in range(steps):
            z = (1 - damping) * z + damping * cell(z, x)
        return z

    @jax.jit
    def both(params, x):
        def gradient(layer):
            return jax.grad(lambda p, x: jnp.sum(weights * layer(p, x) ** 2), (0, 1))(params, x)

        return gradient(implicit), gradient(phantom)

    got, expected = both(params, x)
    assert_tree_allclose(got, expected)


class TinyCell(nnx.Module):
    def __init__(self):
        self.linear = _linear(2, 2)

    def __call__(self, z, x):
        return jnp.tanh(self.linear(z) + x)


def test_derivatives_match_finite_differences_to_third_order():
    solvers = {
        "solver": implicax.FixedPointIteration(max_steps=200),
        "linear_solver": implicax.Dense(),
    }
    params, _, layer = _functional(TinyCell, **solvers)
    x = random_data((1, 2))
    check_derivatives(layer, (params, x), order=3, modes=("fwd", "rev"), transforms=("none",))


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_layer_call(self):
        x = random_data((2, 3))
        params, _, layer = _functional(DenseCell)
        z = self.variant(layer)(params, x)
        cell = DenseCell()
        np.testing.assert_allclose(cell(z, x), z, rtol=1e-9, atol=1e-10)  # a fixed point


def test_vmap_matches_batch():
    x = random_data((4, 3))
    params, _, layer = _functional(DenseCell)
    unstored = DEQ(DenseCell(), store_stats=False, **FAST)

    @nnx.jit
    def both(unstored, x):
        value_and_grad = jax.value_and_grad(lambda x: jnp.sum(layer(params, x) ** 2))
        # nnx.vmap with the layer's state broadcast: batched stats are returned, not stored.
        z, stats = nnx.vmap(lambda m, x: m(x, return_stats=True), in_axes=(None, 0))(unstored, x)
        return jax.vmap(value_and_grad)(x), value_and_grad(x), z, stats

    (values, grads), (value, grad), z, stats = both(unstored, x)
    assert_tree_allclose((jnp.sum(values), grads), (value, grad), rtol=1e-8, atol=1e-10)
    assert_tree_allclose(z, layer(params, x), rtol=1e-8, atol=1e-10)
    assert stats.steps.shape == (4,) and bool(jnp.all(stats.converged))


class Net(nnx.Module):
    """Linear → DEQ → Linear: the model of the training-step tests."""

    def __init__(self):
        self.encode = _linear(5, 3, 1.0)
        self.deq = DEQ(DenseCell(), **FAST)
        self.decode = _linear(3, 2, 1.0)

    def __call__(self, x):
        return self.decode(self.deq(self.encode(x)))


TX = optax.adam(1e-2)


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def _functional_step(graphdef, params, rest, opt_state, x, y, axis_name=None, apply=None):
    """A training step on the split model; ``apply(params, x)`` replaces the merged model."""

    def loss_fn(params):
        if apply is not None:
            return jnp.mean((apply(params, x) - y) ** 2)
        return _loss(nnx.merge(graphdef, params, rest), x, y)

    value, grads = jax.value_and_grad(loss_fn)(params)
    if axis_name is not None:
        grads = lax.pmean(grads, axis_name)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


@pytest.fixture(scope="module")
def training():
    """The split model, a batch, and one reference step with nnx.jit + nnx.Optimizer."""
    x, y = random_data((8, 5)), random_data((8, 2), seed=4)
    model = Net()
    graphdef, params, rest = nnx.split(nnx.clone(model), nnx.Param, ...)  # before the update
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        value, grads = nnx.value_and_grad(_loss)(model, x, y)
        optimizer.update(model, grads)
        return value

    value = step(model, optimizer, x, y)
    stats = model.deq.stats.get_value()
    assert isinstance(stats, implicax.SolveStats) and bool(stats.converged)
    return graphdef, params, rest, x, y, (nnx.state(model, nnx.Param), value)


def test_sharded_jit_training_step(training):
    """nnx.jit + nnx.Optimizer on a batch sharded over 4 devices, parameters replicated."""
    graphdef, params, rest, x, y, expected = training
    mesh = data_mesh()
    sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    model = nnx.merge(
        graphdef, jax.device_put(params, replicated), jax.device_put(rest, replicated)
    )
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        value, grads = nnx.value_and_grad(_loss)(model, x, y)
        optimizer.update(model, grads)
        return value

    value = step(model, optimizer, jax.device_put(x, sharded), jax.device_put(y, sharded))
    assert_tree_allclose((nnx.state(model, nnx.Param), value), expected, rtol=1e-8)


def test_pmap_training_step(training):
    graphdef, params, rest, x, y, expected = training
    step = jax.pmap(
        lambda p, r, o, x, y: _functional_step(graphdef, p, r, o, x, y, axis_name="data"),
        axis_name="data",
    )
    new_params, _, value = step(
        replicated_per_device(params),
        replicated_per_device(rest),
        replicated_per_device(TX.init(params)),
        split_per_device(x),
        split_per_device(y),
    )
    new_params = jax.tree.map(lambda a: np.asarray(a)[0], new_params)
    assert_tree_allclose(new_params, expected[0], rtol=1e-8)


def test_shard_map_training_step(training):
    graphdef, params, rest, x, y, expected = training

    def apply(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    sharded = jax.shard_map(apply, mesh=data_mesh(), in_specs=(P(), P("data")), out_specs=P("data"))
    step = jax.jit(lambda p, o, x, y: _functional_step(graphdef, p, rest, o, x, y, apply=sharded))
    new_params, _, value = step(params, TX.init(params), x, y)
    assert_tree_allclose((new_params, value), expected, rtol=1e-8)


def test_stats_attribute_and_return_stats():
    x = random_data((2, 3))
    layer = DEQ(DenseCell())  # default solvers
    assert isinstance(layer.stats, SolveStatsVariable)

    @nnx.jit
    def run(layer, x):
        return layer(x, return_stats=True)

    z, stats = run(layer, x)
    assert bool(stats.converged) and int(stats.steps) > 0 and float(stats.residual_norm) < 1e-9
    assert_tree_allclose(layer.stats.get_value(), stats)


class DropoutCell(nnx.Module):
    def __init__(self):
        self.linear = _linear(3, 3)
        self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=7))

    def __call__(self, z, x):
        return jnp.tanh(self.dropout(self.linear(z)) + x)


def test_dropout_mask_fixed_per_solve():
    x = random_data((4, 3))
    layer = DEQ(DropoutCell(), **FAST)
    graphdef, params, rest = nnx.split(nnx.clone(layer), nnx.Param, ...)  # before any call
    run = nnx.jit(lambda layer, x: layer(x, return_stats=True))
    count = int(layer.cell.dropout.rngs.count[...])
    z1, stats1 = run(layer, x)
    z2, stats2 = run(layer, x)
    assert bool(stats1.converged) and bool(stats2.converged)  # one mask per solve
    assert int(layer.cell.dropout.rngs.count[...]) == count + 2  # one key drawn per call
    assert not np.allclose(z1, z2)  # a new mask on the next call
    # Same state, same mask: the derivative is exact for it.
    functional = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x))
    layer_fn = lambda p, x: functional(p, rest, x)
    np.testing.assert_array_equal(layer_fn(params, x), z1)
    check_derivatives(layer_fn, (params, x), order=1, modes=("rev",), transforms=("none",))
    layer.eval()  # deterministic dropout
    assert bool(run(layer, x)[1].converged)


class BatchNormCell(nnx.Module):
    def __init__(self):
        self.linear = _linear(3, 3)
        self.norm = nnx.BatchNorm(3, momentum=0.5, param_dtype=F64, rngs=nnx.Rngs(0))
        # nnx.BatchNorm keeps float32 statistics whatever the dtypes; match the float64 data.
        self.norm.mean = nnx.BatchStat(jnp.zeros(3, F64))
        self.norm.var = nnx.BatchStat(jnp.ones(3, F64))

    def __call__(self, z, x):
        return jnp.tanh(0.2 * self.norm(self.linear(z)) + x)


def test_batchnorm_statistics_updated_once_from_equilibrium():
    x = random_data((6, 3))
    layer = DEQ(BatchNormCell(), **FAST)
    reference = nnx.clone(layer.cell)

    @nnx.jit
    def run(layer, reference, x):
        z = layer(x)
        return z, reference(z, x)

    z, image = run(layer, reference, x)
    np.testing.assert_allclose(image, z, atol=1e-9)  # z* is a fixed point of the training map
    assert_tree_allclose(layer.cell.norm.mean[...], reference.norm.mean[...])
    assert not np.allclose(layer.cell.norm.mean[...], 0)
    before = np.asarray(layer.cell.norm.mean[...])
    layer.eval()  # running averages, no update
    nnx.jit(lambda layer, x: layer(x))(layer, x)
    np.testing.assert_array_equal(layer.cell.norm.mean[...], before)


def test_integer_input_needs_z0():
    with pytest.raises(TypeError, match="z0"):
        DEQ(DenseCell())(jnp.ones((2, 3), jnp.int32))


class MemoryCell(nnx.Module):
    """A state {"h", "m"} whose "m" part depends on neither the parameters nor x."""

    def __init__(self):
        self.inner = Inner(3)

    def __call__(self, z, x):
        h = jnp.tanh(self.inner(z["h"]) + x + 0.1 * z["m"])
        return {"h": h, "m": 0.5 * z["m"] + 1.0}


def test_a_state_part_the_parameters_do_not_reach():
    x, weights = random_data((2, 3)), random_data((2, 3), seed=2)
    z0 = {"h": jnp.zeros_like(x), "m": jnp.zeros_like(x)}
    params, rest, layer = _functional(MemoryCell)
    graphdef = nnx.graphdef(DEQ(MemoryCell(), **FAST))

    def unrolled(params, x):
        cell = nnx.merge(graphdef, params, rest).cell
        return lax.fori_loop(0, UNROLL, lambda _, z: cell(z, x), z0)

    def loss(layer):
        return lambda p, x: jnp.sum(weights * layer(p, x)["h"] ** 2) + jnp.sum(layer(p, x)["m"])

    implicit = lambda p, x: layer(p, x, z0=z0)  # noqa: E731
    for transform in (jax.value_and_grad, jax.jacfwd):
        got = transform(loss(implicit), argnums=(0, 1))(params, x)
        assert_tree_allclose(got, transform(loss(unrolled), argnums=(0, 1))(params, x))


def test_a_cell_returning_the_wrong_shape_is_named():
    class Widening(nnx.Module):
        def __init__(self):
            self.linear = _linear(3, 5)

        def __call__(self, z, x):
            return self.linear(z)

    with pytest.raises(
        TypeError, match=r"cell Widening must have the shapes of z.*got shape \(2, 5\).*pass z0"
    ):
        DEQ(Widening())(random_data((2, 3)))


def test_the_first_jitted_training_steps_compile_once():
    # Before: the stored stats started as a weak-typed NaN whose type changed after the first
    # step, so the second step compiled the whole training step again.
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    model = Net()
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    x, y = random_data((8, 5)), random_data((8, 2), seed=4)

    @nnx.jit
    def step(model, optimizer, x, y):
        value, grads = nnx.value_and_grad(_loss)(model, x, y)
        optimizer.update(model, grads)
        return value

    step(model, optimizer, x, y)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        step(model, optimizer, x, y)
        step(model, optimizer, x, y)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_the_signature_is_the_constructors():
    import inspect

    assert list(inspect.signature(DEQ).parameters) == [
        "cell",
        "solver",
        "linear_solver",
        "on_failure",
        "store_stats",
        "penalty_samples",
        "radius_steps",
        "rngs",
    ]


class SymmetricCell(nnx.Module):
    def __init__(self, n):
        self.linear = _linear(n, n)
        self.linear.kernel.set_value(symmetric_kernel(self.linear.kernel.get_value()))

    def __call__(self, z, x):
        return jnp.tanh(self.linear(z) + x)


def test_diagnostics_are_stored_and_the_penalty_is_differentiable():
    x = random_data((1, 3))
    layer = DEQ(
        SymmetricCell(3),
        **FAST,
        penalty_samples=PENALTY_SAMPLES,
        radius_steps=RADIUS_STEPS,
        rngs=nnx.Rngs(jacobian=0),
    )

    @nnx.jit
    def run(layer):
        z = layer(x)
        return z, layer.jacobian_penalty.get_value(), layer.spectral_radius.get_value()

    z, penalty, radius = run(layer)
    assert float(layer.spectral_radius.get_value()) == float(radius)  # stored by the call
    check_diagnostics(z, lambda z: layer.cell(z, x), penalty, radius)

    grad = nnx.grad(lambda layer: run(layer)[1])(layer)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grad))
    with pytest.raises(TypeError, match="rngs=nnx.Rngs"):
        DEQ(SymmetricCell(3), penalty_samples=1)
    with pytest.raises(ValueError, match="radius_steps must be a whole number"):
        DEQ(SymmetricCell(3), radius_steps=-1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(**PROBE_CASES)
def test_adjoint_stats_probe(linear_solver, steps):
    x = random_data((1, 2))
    layer = DEQ(TinyCell(), solver=FAST["solver"], linear_solver=linear_solver)

    def loss(layer, probe):
        return jnp.sum(layer(x, adjoint_stats=probe) ** 2)

    _, record = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, implicax.stats_probe())
    check_probe(record, steps)
