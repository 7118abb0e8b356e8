"""The DEQ training benchmark: examples/deq_training.py's eight runs (exact implicit,
PhantomGradient, JacobianFree and unrolled gradients, each with and without Jacobian
regularisation), then their step times, memory and solver iteration counts, with the targets
of the training toolkit checked.

    python benchmarks/deq_training.py             # updates docs/training-deqs.md, writes the plot
    python benchmarks/deq_training.py --no-write  # prints the tables only

The tables go between the markers of docs/training-deqs.md's "Benchmark" section; the plot
to docs/benchmarks-deq-training.png.

The times are medians of calls interleaved over the eight trained models on one batch, in one
process: forward = the loss alone, backward = a gradient call minus the forward.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (os.path.join(ROOT, "integrations"), os.path.join(ROOT, "src"), ROOT + "/examples"):
    sys.path.insert(0, _path)

import deq_training  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    parser.add_argument("--guide", default=os.path.join(ROOT, "docs", "training-deqs.md"))
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "benchmarks-deq-training.png"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--jacobian-weight", type=float, default=5.0)
    return parser.parse_args(argv)


def epoch_mean(values, steps_per_epoch, epoch):
    chunk = np.asarray(values[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch], float)
    return float(np.mean(chunk))


def table(results, timings) -> list[str]:
    lines = [
        "| Variant | test accuracy | forward (ms) | backward (ms) | temp memory (MiB) | fwd steps, epoch 1 → last | bwd steps, last epoch | penalty, last epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        t = timings[r.variant.name]
        spe, last = r.steps_per_epoch, len(r.forward_steps) // r.steps_per_epoch - 1
        bwd = epoch_mean(r.backward_steps, spe, last)
        penalty = epoch_mean(r.penalty, spe, last)
        lines.append(
            f"| {r.variant.name} | {r.accuracy:.1%} | {t['forward_ms']:.1f} | "
            f"{t['backward_ms']:.1f} | {t['memory_mib']:.2f} | "
            f"{epoch_mean(r.forward_steps, spe, 0):.1f} → {epoch_mean(r.forward_steps, spe, last):.1f} | "
            f"{'—' if bwd < 0 else f'{bwd:.1f}'} | {'—' if np.isnan(penalty) else f'{penalty:.4f}'} |"
        )
    return lines


def targets(results, timings) -> list[str]:
    by = {r.variant.name: r for r in results}
    exact, phantom = timings["implicit"], timings["phantom"]
    speedup = exact["backward_ms"] / phantom["backward_ms"]
    loss_pp = 100 * (by["implicit"].accuracy - by["phantom"].accuracy)
    lines = [
        "| Target | value | target | holds |",
        "|---|---:|---:|---|",
        f"| PhantomGradient backward speed-up over the exact implicit backward | {speedup:.2f}× | ≥ 1.5× | {'yes' if speedup >= 1.5 else '**no**'} |",
        f"| PhantomGradient accuracy loss vs exact | {loss_pp:+.1f} pp | ≤ 1 pp | {'yes' if loss_pp <= 1 else '**no**'} |",
    ]
    for gradient in ("implicit", "phantom", "jacobian-free"):
        plain, regularised = by[gradient], by[f"{gradient}, regularised"]
        spe = plain.steps_per_epoch
        last = len(plain.forward_steps) // spe - 1
        growth = epoch_mean(regularised.forward_steps, spe, last) / epoch_mean(
            regularised.forward_steps, spe, 0
        )
        below = epoch_mean(regularised.forward_steps, spe, last) < epoch_mean(
            plain.forward_steps, spe, last
        )
        lines.append(
            f"| {gradient}, regularised: forward steps last epoch / first epoch | {growth:.2f}× | ≤ 1.2× | {'yes' if growth <= 1.2 else '**no**'} |"
        )
        lines.append(
            f"| {gradient}, regularised: forward steps last epoch below the unregularised run's | {'below' if below else 'not below'} | below | {'yes' if below else '**no**'} |"
        )
    return lines


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (forward, backward) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        style = "-" if r.variant.regularised else "--"
        steps = np.arange(1, len(r.forward_steps) + 1) / r.steps_per_epoch
        window = max(1, r.steps_per_epoch // 4)
        smooth = np.convolve(r.forward_steps, np.ones(window) / window, mode="valid")
        forward.plot(steps[window - 1 :], smooth, style, label=r.variant.name)
        if r.variant.gradient != "unrolled":
            smooth = np.convolve(r.backward_steps, np.ones(window) / window, mode="valid")
            backward.plot(steps[window - 1 :], smooth, style, label=r.variant.name)
    forward.set(xlabel="epoch", ylabel="forward solver steps", title="Forward (Anderson) steps")
    backward.set(xlabel="epoch", ylabel="matrix-vector products", title="Backward solve")
    forward.legend(fontsize=7)
    backward.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    data = deq_training.load_data(0)
    results = [
        deq_training.train(
            variant, data, epochs=args.epochs, batch_size=64, weight=args.jacobian_weight, seed=0
        )
        for variant in deq_training.VARIANTS
    ]
    timings = deq_training.measure(results)
    device = jax.devices()[0]
    header = [
        f"Written by `python benchmarks/deq_training.py` on {datetime.date.today()}: "
        f"{device.platform.upper()} ({device.device_kind}), {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, jax {jax.__version__}.",
        "",
        f"examples/deq_training.py, {args.epochs} epochs of scikit-learn's digits (batch 64), "
        f"Jacobian weight {args.jacobian_weight}. Forward: Anderson at tolerance 1e-3; "
        "backward: BiCGStab at its default tolerance (implicit), PhantomGradient(5, 0.8), "
        f"JacobianFree, or backpropagation through {deq_training.UNROLL} unrolled steps.",
        "",
    ]
    body = [*header, *table(results, timings), "", *targets(results, timings), ""]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        plot(results, args.plot)
        name = os.path.basename(args.plot)
        with open(args.guide) as f:
            guide = f.read()
        before, rest = guide.split(START, 1)
        after = rest.split(END, 1)[1]
        text += f"\n![Solver steps over training]({name})\n"
        with open(args.guide, "w") as f:
            f.write(f"{before}{START}\n{text}{END}{after}")


START = "<!-- benchmarks/deq_training.py: start -->"
END = "<!-- benchmarks/deq_training.py: end -->"


if __name__ == "__main__":
    main()
