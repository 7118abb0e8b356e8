"""Train a convolutional DEQ image classifier four ways, with and without Jacobian
regularisation: exact implicit gradients, `implicax.PhantomGradient`, `implicax.JacobianFree`
and unrolled backpropagation.

The model is an MDEQ-tiny style classifier of scikit-learn's 8×8 digits: a convolutional
input injection x, the equilibrium z* = cell(z*, x) of a residual cell
cell(z, x) = GN(relu(conv(relu(conv(z))) + x)) (GN: GroupNorm) found by Anderson
acceleration, then GroupNorm and a linear head. With ``--jacobian-weight w``
the regularised runs add w times `implicax.jacobian_penalty` at z* (one sample, sown by the
layer) to the loss. The progress bar shows the loss, the forward and backward solver steps of
the latest batch (the backward steps from an `implicax.stats_probe`) and the penalty.

    python examples/deq_training.py                  # 8 runs, a few minutes on 2 CPU cores
    python examples/deq_training.py --short          # 2 runs of 8 steps: a smoke test
    python benchmarks/deq_training.py                # the same, written to docs/ as a table

Data: ``sklearn.datasets.load_digits`` (ships with scikit-learn, no download).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from implicax_flax import DEQ
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import implicax

CHANNELS = 16
GROUPS = 4
SOLVER = implicax.Anderson(rtol=1e-3, atol=1e-3, max_steps=40)
UNROLL = 12  # unrolled backprop: this many cell steps from z = 0, differentiated through


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    gradient: str  # "implicit", "phantom", "jacobian-free" or "unrolled"
    regularised: bool

    @property
    def linear_solver(self) -> Any:
        return {
            "implicit": implicax.BiCGStab(),  # the default, at its default tolerance
            "phantom": implicax.PhantomGradient(steps=5, damping=0.8),
            "jacobian-free": implicax.JacobianFree(),
        }.get(self.gradient)


VARIANTS = [
    Variant(f"{gradient}{', regularised' if regularised else ''}", gradient, regularised)
    for gradient in ("implicit", "phantom", "jacobian-free", "unrolled")
    for regularised in (False, True)
]


def conv(channels: int) -> nn.Conv:
    return nn.Conv(
        channels,
        (3, 3),
        use_bias=False,
        kernel_init=nn.initializers.variance_scaling(0.1, "fan_in", "normal"),
    )


class Cell(nn.Module):
    """A residual block with input injection: z ↦ GN(relu(conv(relu(conv(z))) + x)).

    (MDEQ's block also adds z and normalises after each convolution; normalising conv(z)
    makes the map scale-invariant in z and far from contractive, so its forward solves run to
    their step limit. Here the one GroupNorm sees x + a small correction.)
    """

    channels: int = CHANNELS

    @nn.compact
    def __call__(self, z, x):
        y = conv(self.channels)(nn.relu(conv(self.channels)(z)))
        return nn.GroupNorm(GROUPS)(nn.relu(y + x))


class Unrolled(nn.Module):
    """UNROLL cell steps from z = 0 (weight-tied), differentiated by backpropagation; sows the
    Jacobian penalty at the last state as the DEQ layer does."""

    cell: nn.Module
    penalty_samples: int = 0

    @nn.compact
    def __call__(self, x, adjoint_stats=None):
        del adjoint_stats  # no linear solve to report on
        z = jnp.zeros_like(x)
        for _ in range(UNROLL):
            z = self.cell(z, x)
        if self.penalty_samples and self.has_rng("jacobian"):
            cell, variables = self.cell.unbind()
            penalty = implicax.jacobian_penalty(
                lambda z, v: cell.apply(v, z, x),
                jax.lax.stop_gradient(z),
                variables,
                self.make_rng("jacobian"),
                samples=self.penalty_samples,
            )
            self.sow("intermediates", "jacobian_penalty", penalty)
        return z


class Classifier(nn.Module):
    variant: Variant

    @nn.compact
    def __call__(self, images, adjoint_stats=None):
        x = nn.GroupNorm(GROUPS)(conv(CHANNELS)(images[..., None]))
        samples = 1 if self.variant.regularised else 0
        if self.variant.gradient == "unrolled":
            layer = Unrolled(Cell(), penalty_samples=samples, name="deq")
        else:
            layer = DEQ(
                Cell(),
                solver=SOLVER,
                linear_solver=self.variant.linear_solver,
                on_failure="ignore",  # the statistics are watched instead
                penalty_samples=samples,
                name="deq",
            )
        z = layer(x, adjoint_stats=adjoint_stats)
        z = nn.GroupNorm(GROUPS)(z)
        return nn.Dense(10)(z.reshape(z.shape[0], -1))


def load_data(seed: int = 0):
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return train_test_split(
        images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )


@dataclasses.dataclass
class Result:
    variant: Variant
    accuracy: float
    forward_steps: list[int]  # per training step (UNROLL for unrolled backprop)
    backward_steps: list[int]  # per training step (-1: none reported)
    penalty: list[float]  # per training step (NaN: not computed)
    steps_per_epoch: int
    state: Any = None  # (model, params, batch, weight): for the timing and memory measurements


def make_loss(model: nn.Module, weight: float):
    """loss_fn(params, probe, images, labels, key) -> (training loss, (cross-entropy,
    penalty or NaN, forward steps))."""

    def loss_fn(params, probe, images, labels, key):
        logits, sown = model.apply(
            params, images, probe, rngs={"jacobian": key}, mutable=["intermediates"]
        )
        sown = sown.get("intermediates", {}).get("deq", {})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        stats = sown["solve_stats"][0].steps if "solve_stats" in sown else UNROLL
        if "jacobian_penalty" not in sown:
            return loss, (loss, jnp.nan, stats)
        penalty = sown["jacobian_penalty"][0]
        return loss + weight * penalty, (loss, penalty, stats)

    return loss_fn


def make_step(model: nn.Module, optimizer: optax.GradientTransformation, weight: float):
    loss_fn = make_loss(model, weight)

    @jax.jit
    def step(params, opt_state, images, labels, key):
        (_, aux), (grads, record) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
            params, implicax.stats_probe(), images, labels, key
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux, record

    return step


def train(
    variant: Variant,
    data,
    *,
    epochs: int,
    batch_size: int,
    weight: float,
    seed: int,
    max_steps: int | None = None,
    leave: bool = True,
) -> Result:
    x_train, x_test, y_train, y_test = data
    model = Classifier(variant)
    params = jax.jit(model.init)(jax.random.key(seed), x_train[:1])
    steps_per_epoch = len(x_train) // batch_size
    total = max_steps or epochs * steps_per_epoch
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, total))
    opt_state = optimizer.init(params)
    step = make_step(model, optimizer, weight)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed + 1)
    forward, backward, penalties = [], [], []
    bar = tqdm(range(total), desc=f"{variant.name:26s}", unit="step", leave=leave)
    for i in bar:
        if i % steps_per_epoch == 0:
            order = rng.permutation(len(x_train))
        batch = order[(i % steps_per_epoch) * batch_size :][:batch_size]
        key, step_key = jax.random.split(key)
        params, opt_state, (loss, penalty, fwd), record = step(
            params, opt_state, x_train[batch], y_train[batch], step_key
        )
        bwd = int(implicax.read_probe(record).steps) if variant.gradient != "unrolled" else -1
        forward.append(int(fwd))
        backward.append(bwd)
        penalties.append(float(penalty))
        if i % 10 == 0 or i == total - 1:
            bar.set_postfix(
                loss=f"{float(loss):.3f}",
                fwd_steps=forward[-1],
                bwd_steps=bwd if bwd >= 0 else "-",
                penalty=f"{penalties[-1]:.3f}",
            )
    predict = jax.jit(lambda params, images: model.apply(params, images).argmax(-1))
    accuracy = float(np.mean(np.asarray(predict(params, x_test)) == y_test))
    batch = (x_train[:batch_size], y_train[:batch_size])
    return Result(
        variant,
        accuracy,
        forward,
        backward,
        penalties,
        steps_per_epoch,
        (model, params, batch, weight),
    )


def _compiled(result: Result):
    """The trained model's forward pass (the loss alone) and gradient on one batch, jitted and
    run once, with the gradient's compiled temporary memory."""
    model, params, (images, labels), weight = result.state
    loss_fn = make_loss(model, weight)
    key, probe = jax.random.key(0), implicax.stats_probe()

    def loss(params):
        return loss_fn(params, probe, images, labels, key)[0]

    forward, gradient = jax.jit(loss), jax.jit(jax.grad(loss))
    memory = gradient.lower(params).compile().memory_analysis().temp_size_in_bytes
    jax.block_until_ready((forward(params), gradient(params)))
    return forward, gradient, params, memory


def measure(results: list[Result], repeats: int = 20) -> dict[str, dict[str, float]]:
    """Per variant, at its trained parameters on one batch, calls interleaved over the
    variants: the median times of the forward pass and of the gradient (backward = their
    difference), and the gradient's temporary memory."""
    compiled = {r.variant.name: _compiled(r) for r in results}
    times = {name: {"forward": [], "gradient": []} for name in compiled}
    for _ in range(repeats):
        for name, (forward, gradient, params, _) in compiled.items():
            for kind, fn in (("forward", forward), ("gradient", gradient)):
                start = time.perf_counter()
                jax.block_until_ready(fn(params))
                times[name][kind].append(time.perf_counter() - start)
    out = {}
    for name, (*_, memory) in compiled.items():
        forward, gradient = (1e3 * float(np.median(times[name][k])) for k in times[name])
        out[name] = {
            "forward_ms": forward,
            "backward_ms": gradient - forward,
            "memory_mib": memory / 2**20,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="2 runs of 8 steps (smoke test)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--jacobian-weight", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_data(args.seed)
    variants = [VARIANTS[2], VARIANTS[3]] if args.short else VARIANTS
    options = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        weight=args.jacobian_weight,
        seed=args.seed,
        max_steps=8 if args.short else None,
    )
    results = [train(variant, data, **options) for variant in variants]
    for result in results:
        print(
            f"{result.variant.name}: test accuracy: {result.accuracy:.2%}, forward steps "
            f"{result.forward_steps[0]} → {result.forward_steps[-1]}, backward steps "
            f"{result.backward_steps[-1]}"
        )


if __name__ == "__main__":
    main()
