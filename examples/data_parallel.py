"""Data-parallel DEQ training on several devices, two ways: `jax.pmap` + `lax.pmean`, and
`jax.jit` with `NamedSharding` inputs (the compiler inserts the gradient all-reduce).

The model is the DEQ classifier of ``deq_digits_flax.py`` (z* = cell(z*, x), Anderson forward
solve, implicit BiCGStab backward solve). Each global batch is split over the devices:

* pmap: every device solves the equilibrium of its own shard (its own number of solver
  steps) and the gradients are averaged with ``lax.pmean``;
* jit + NamedSharding: the batch axis is sharded over a ``("data",)`` mesh and the solve runs
  once on the global batch (its stopping test reduces over all shards).

Both start from the same parameters and see the same batches, so they end with the same
parameters up to rounding. On CPU the script asks XLA for 4 host devices (unless XLA_FLAGS
already sets a count); on GPUs or TPUs it uses the local accelerators as they are.
Multi-host: call ``jax.distributed.initialize()`` first and feed each process its share
(see docs/integrations.md).

    python examples/data_parallel.py            # ~40 s on 2 CPU cores
    python examples/data_parallel.py --short    # 10 steps each: a smoke test
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only affects the CPU platform; must happen before JAX initialises its backends.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from deq_digits_flax import Classifier, batches, load_data  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402


def loss_fn(model, params, images, labels):
    logits, state = model.apply(params, images, mutable=["intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    (stats,) = state["intermediates"]["deq"]["solve_stats"]
    return loss, stats


def train_pmap(model, optimizer, params, data, steps, batch_size, seed):
    """`jax.pmap` over the local devices; gradients averaged with `lax.pmean`."""
    x_train, y_train = data
    devices = jax.local_devices()
    n = len(devices)
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=devices)
    # Leading axis = device axis, one slice per device: the sharding pmap's outputs have, so
    # the parameters it returns feed the next step without a recompilation.
    stacked = NamedSharding(mesh, P("data"))

    @functools.partial(jax.pmap, axis_name="data")
    def step(params, opt_state, images, labels):
        (loss, stats), grads = jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True)(
            params, images, labels
        )
        grads = lax.pmean(grads, "data")
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, lax.pmean(loss, "data"), stats

    def replicate(tree):
        return jax.device_put(jax.tree.map(lambda a: np.stack([a] * n), tree), stacked)

    params, opt_state = replicate(params), replicate(optimizer.init(params))
    indices = batches(np.random.default_rng(seed), len(x_train), batch_size)
    bar = tqdm(range(steps), desc=f"pmap ({n} devices)", unit="step")
    for i in bar:
        batch = next(indices)
        # Device arrays, not host NumPy: each shard goes to its device before the step runs.
        images = jax.device_put(x_train[batch].reshape(n, -1, x_train.shape[-1]), stacked)
        labels = jax.device_put(y_train[batch].reshape(n, -1), stacked)
        params, opt_state, loss, stats = step(params, opt_state, images, labels)
        if i % 10 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss[0]):.3f}", fwd_steps=int(stats.steps.max()))
    return jax.tree.map(lambda a: np.asarray(a[0]), params)


def train_sharded_jit(model, optimizer, params, data, steps, batch_size, seed):
    """`jax.jit` on a batch sharded over a ("data",) mesh; parameters replicated."""
    x_train, y_train = data
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
    sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    @jax.jit
    def step(params, opt_state, images, labels):
        (loss, stats), grads = jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True)(
            params, images, labels
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, stats

    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)
    indices = batches(np.random.default_rng(seed), len(x_train), batch_size)
    bar = tqdm(range(steps), desc=f"jit + NamedSharding ({n} devices)", unit="step")
    for i in bar:
        batch = next(indices)
        images = jax.device_put(x_train[batch], sharded)
        labels = jax.device_put(y_train[batch], sharded)
        params, opt_state, loss, stats = step(params, opt_state, images, labels)
        if i % 10 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}", fwd_steps=int(stats.steps))
    return jax.tree.map(np.asarray, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="a few steps (smoke test)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    n = jax.device_count()
    batch_size = max(n, args.batch_size // n * n)  # divisible by the number of devices
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = Classifier()
    params = jax.device_get(jax.jit(model.init)(jax.random.key(args.seed), x_train[:1]))
    steps = 10 if args.short else args.epochs * (len(x_train) // batch_size)
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
    predict = jax.jit(lambda params, images: model.apply(params, images).argmax(-1))
    print(f"{n} devices: {jax.devices()}")

    results = {}
    for name, train in (("pmap", train_pmap), ("jit + NamedSharding", train_sharded_jit)):
        trained = train(model, optimizer, params, (x_train, y_train), steps, batch_size, args.seed)
        accuracy = float(np.mean(np.asarray(predict(trained, x_test)) == y_test))
        print(f"{name}: test accuracy: {accuracy:.2%}")
        results[name] = trained
    difference = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(results["pmap"]), jax.tree.leaves(results["jit + NamedSharding"])
        )
    )
    print(f"max parameter difference pmap vs jit: {difference:.2e}")
    print(f"total time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
