"""implicax vs jaxopt vs optimistix vs unrolled backprop vs a plain lax.while_loop, side by side.

    python benchmarks/run.py                 # full run (a few minutes on 2 CPU cores)
    python benchmarks/run.py --quick --no-write   # smoke run, prints the tables only
    python benchmarks/run.py --out-dir docs --stem benchmarks-gpu --precision highest   # on a GPU

Problems: (a) the DEQ-style fixed point z = tanh(zW + xU + b) at several sizes, (b) the ridge
regression optimality condition differentiated w.r.t. λ, (c) a Flax DEQ classifier's training
step. Everything runs in one process on the same inputs; the ratios it prints compare timings
taken interleaved in that one run. Writes ``<out-dir>/<stem>.md`` and ``<out-dir>/<stem>.png``
unless --no-write. jaxopt and optimistix are optional: their rows are skipped, with a note,
when they are not installed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
# Benchmark this checkout's implicax (and its Flax adapter), installed or not.
for _path in (os.path.join(ROOT, "integrations"), os.path.join(ROOT, "src")):
    if os.path.isdir(_path):
        sys.path.insert(0, _path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (smoke)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs"), help="where to write")
    parser.add_argument("--stem", default="benchmarks", help="file names: <stem>.md, <stem>.png")
    parser.add_argument(
        "--precision",
        choices=("default", "high", "highest"),
        default="default",
        help="jax_default_matmul_precision (on GPUs 'default' lets float32 matmuls use TF32)",
    )
    parser.add_argument(
        "--problems", default="abc", help="which problems to run, e.g. 'a' or 'bc' (default abc)"
    )
    parser.add_argument(
        "--no-anchors", action="store_true", help="run as if jaxopt/optimistix were missing"
    )
    return parser.parse_args(argv)


ARGS = parse_args()
if ARGS.quick:
    # A smoke run is compile-bound: skip LLVM's optimisations (its timings mean nothing anyway).
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402

if ARGS.precision != "default":
    jax.config.update("jax_default_matmul_precision", ARGS.precision)

import _anchors  # noqa: E402

if ARGS.no_anchors:
    _anchors.jaxopt = _anchors.optimistix = _anchors.lineax = None
    _anchors.MISSING = ["jaxopt", "optimistix"]

import numpy as np  # noqa: E402
import problem_deq  # noqa: E402
import problem_flax  # noqa: E402
import problem_ridge  # noqa: E402
from _harness import max_residual, run_candidates  # noqa: E402
from _report import (  # noqa: E402
    Section,
    comparisons,
    plot,
    section_markdown,
    targets,
    targets_markdown,
)

TOL = 1e-5
PROFILE = "quick" if ARGS.quick else "full"


def log(message: str) -> None:
    print(message, flush=True)


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    device = jax.devices()[0]
    precision = jax.config.jax_default_matmul_precision
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} ({platform.platform()})",
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores visible",
        "device": f"{device.platform}: {device.device_kind} (x{jax.device_count()})",
        "matmul precision": (
            f"{precision}"
            if precision
            else "default (backend's choice: TF32 for float32 on NVIDIA GPUs)"
        ),
        "python": platform.python_version(),
        "versions": ", ".join(
            f"{n} {version(n)}"
            for n in ("jax", "jaxlib", "jaxopt", "optimistix", "lineax", "equinox", "flax", "optax")
        ),
        "command": " ".join(["python benchmarks/run.py", *sys.argv[1:]]),
    }


def settings_for(quick: bool) -> dict:
    if quick:
        return dict(
            deq_sizes=[(32, 32, True)],
            deq_memory=(10, 40),
            ridge=(256, 32),
            ridge_memory=(),
            flax=(16, 16, 16),
            flax_memory=(),
            rounds=2,
            reps=2,
            compile_repeats=0,
        )
    return dict(
        deq_sizes=[(128, 128, True), (128, 64, False), (128, 256, False)],
        deq_memory=(25, 100, 400),
        ridge=(2048, 512),
        ridge_memory=(25, 100, 400),
        flax=(128, 64, 128),
        flax_memory=(25, 100, 400),
        # Many short rounds: a burst of load from elsewhere hits every candidate alike.
        rounds=20,
        reps=2,
        compile_repeats=2,
    )


def warm_up() -> None:
    """Compile something small first, so no candidate pays JAX's one-time start-up costs."""
    prob = problem_deq.make_problem(8, 8)
    f = jax.value_and_grad(lambda p: prob.loss(problem_deq.unrolled(prob.fn, prob.z0, p, 3)))
    jax.block_until_ready(jax.jit(f)(prob.params))


def run_deq(cfg, sections) -> None:
    for batch, width, main in cfg["deq_sizes"]:
        prob = problem_deq.make_problem(batch, width, TOL)
        log(f"(a) DEQ fixed point, {prob.label}")
        _, ref_grads, ref_steps = problem_deq.reference(prob)
        plain = jax.jit(
            lambda p, prob=prob: problem_deq.plain_while_loop(
                prob.fn, prob.z0, p, TOL, TOL, prob.max_steps
            )
        )
        plain_steps = int(plain(prob.params)[1])
        profile = "quick" if ARGS.quick else ("main" if main else "size")
        cands = problem_deq.build_candidates(prob, plain_steps, profile)
        results = run_candidates(
            cands,
            (prob.params,),
            reference_grads=ref_grads,
            residual_of=max_residual(prob.fn, prob.params, TOL, TOL),
            rounds=cfg["rounds"],
            reps=cfg["reps"],
            compile_repeats=cfg["compile_repeats"],
            memory_steps=cfg["deq_memory"] if main else (),
            log=log,
        )
        sections.append(
            Section(
                "a" if main else f"a-{width}",
                f"(a) DEQ fixed point, {prob.label}" + ("" if main else " (main rows only)"),
                f"z = tanh(z W + x U + b), W Gaussian scaled to spectral radius {problem_deq.RADIUS}, "
                f"injection scale {problem_deq.INPUT_SCALE}; float32; tolerance {TOL:g}; loss "
                "½‖z* − y‖²; gradient w.r.t. (W, U, b).",
                results,
                f"NumPy float64, Picard iteration to 1e-14 ({ref_steps} steps) and the adjoint "
                "iteration likewise, from the same float32 inputs",
                memory_steps=cfg["deq_memory"] if main else (),
                short=f"(a) DEQ fixed point, {batch}x{width}",
            )
        )


def run_ridge(cfg, sections) -> None:
    n, d = cfg["ridge"]
    prob = problem_ridge.make_problem(n, d, TOL)
    log(f"(b) ridge regression root, {prob.label}")
    _, ref_grad = problem_ridge.reference(prob)
    plain = jax.jit(
        lambda lam: problem_ridge.plain_cg(
            lambda w: prob.matvec(w, lam), prob.rhs, TOL, prob.max_steps
        )
    )
    plain_steps = int(plain(prob.lam)[1])
    cands = problem_ridge.build_candidates(prob, plain_steps, PROFILE)
    results = run_candidates(
        cands,
        (prob.lam,),
        reference_grads=np.asarray(ref_grad),
        residual_of=problem_ridge.residual_of(prob),
        rounds=cfg["rounds"],
        reps=cfg["reps"],
        compile_repeats=cfg["compile_repeats"],
        memory_steps=cfg["ridge_memory"],
        log=log,
    )
    sections.append(
        Section(
            "b",
            f"(b) Ridge regression root, {prob.label}",
            "F(w, λ) = (XᵀX + λI)w − Xᵀy = 0, matrix-free; gradient of the validation loss "
            f"½‖X_val w − y_val‖² w.r.t. λ = {float(prob.lam):g}; float32; tolerance {TOL:g}.",
            results,
            "NumPy float64 closed form, dL/dλ = −∇_w Lᵀ (XᵀX + λI)⁻¹ w",
            memory_steps=cfg["ridge_memory"],
            residual_label="‖F(w)‖₂ / ‖Xᵀy‖₂",
            short=f"(b) ridge root, {n}x{d}",
        )
    )


def run_flax(cfg, sections) -> None:
    batch, features, width = cfg["flax"]
    prob = problem_flax.make_problem(batch, features, width, tol=TOL)
    log(f"(c) Flax DEQ training step, {prob.label}")
    ref_steps = problem_flax.reference_steps(prob) + 50
    _, ref_grads = problem_flax.reference(prob, ref_steps)
    cands = problem_flax.build_candidates(prob, 1, PROFILE)
    opt_state = problem_flax.OPTIMIZER.init(prob.params)
    args = (prob.params, opt_state, prob.x, prob.labels)
    plain_steps = int(jax.jit(cands[0].forward)(*args)[1])
    cands = problem_flax.build_candidates(prob, plain_steps, PROFILE)

    def residual_of(_logits):
        return None, None

    results = run_candidates(
        cands,
        args,
        reference_grads=ref_grads,
        grads_of=lambda out: out[1],
        residual_of=residual_of,
        rounds=cfg["rounds"],
        reps=cfg["reps"],
        compile_repeats=cfg["compile_repeats"],
        memory_steps=cfg["flax_memory"],
        log=log,
    )
    sections.append(
        Section(
            "c",
            f"(c) Flax DEQ training step, {prob.label}",
            "linen: logits = Dense(z*), z* = tanh(z* W + Dense(x)), W orthogonal × "
            f"{problem_flax.RECURRENT_SCALE}; softmax cross-entropy (batch mean); one step = "
            "value_and_grad + optax.adam update, jitted; forward = model.apply (logits); "
            f"float32; tolerance {TOL:g}.",
            results,
            f"float64 (jax.enable_x64), the same model unrolled {ref_steps} steps "
            "(plain iteration reaches 1e-14 50 steps earlier)",
            vg_label="training step (ms)",
            memory_steps=cfg["flax_memory"],
            residual_label="residual",
            short=f"(c) Flax DEQ train step, {batch}x{width}",
        )
    )


def main() -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jaxopt(\..*)?")
    cfg = settings_for(ARGS.quick)
    env = environment()
    log("Environment: " + "; ".join(f"{k}: {v}" for k, v in env.items()))
    if _anchors.MISSING:
        log(f"Note: {', '.join(_anchors.MISSING)} not available: those anchor rows are skipped.")
    start = time.perf_counter()
    warm_up()
    sections: list[Section] = []
    if "a" in ARGS.problems:
        run_deq(cfg, sections)
    if "b" in ARGS.problems:
        run_ridge(cfg, sections)
    if "c" in ARGS.problems:
        run_flax(cfg, sections)
    elapsed = time.perf_counter() - start

    main_a = next((s for s in sections if s.key == "a"), None)
    checks = (
        targets(
            main_a.results,
            ["implicax defaults", "implicax FPI + BiCGStab", problem_deq.TUNED],
            sweep=["implicax FPI + BiCGStab"]
            + [problem_deq.loose_name(t) for t in problem_deq.LOOSER_TOLERANCES],
        )
        if main_a
        else []
    )
    ablations = comparisons(main_a.results) if main_a else []

    md = markdown(env, sections, checks, ablations, elapsed)
    log("")
    log(md)
    if not ARGS.no_write:
        os.makedirs(ARGS.out_dir, exist_ok=True)
        md_path = os.path.join(ARGS.out_dir, f"{ARGS.stem}.md")
        png_path = os.path.join(ARGS.out_dir, f"{ARGS.stem}.png")
        with open(md_path, "w") as f:
            f.write(md)
        plot(sections, png_path, f"implicax benchmarks — {env['device']}, {env['date']}")
        log(f"Wrote {md_path} and {png_path}")
    return 0


def markdown(env, sections, checks, ablations, elapsed) -> str:
    lines = ["# Benchmarks", ""]
    lines.append(
        "implicax against jaxopt and optimistix (implicit differentiation), plain unrolled "
        "backprop, and a bare `lax.while_loop` forward (the floor), in one process on the same "
        "inputs. Regenerate with the command below."
    )
    lines.append("")
    lines += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in env.items()]
    lines.append(f"- **run time**: {elapsed:.0f} s")
    if _anchors.MISSING:
        lines.append(
            f"- **skipped**: {', '.join(_anchors.MISSING)} not installed: no rows for them"
        )
    lines += [
        "",
        "How it is measured: each candidate is `jax.jit`-compiled once per function "
        "(`compile` = tracing + lowering + XLA compilation of the value_and_grad function, the "
        "fastest of the repeats, each from cleared caches); the jitted functions are then called "
        "warm (JAX's usual dispatch path, as in a user's code), round-robin over all candidates, each call ended by `block_until_ready`; times "
        "are medians (minimum in parentheses) per call. Same tolerance for all, 1e-5, in each "
        "library's own stopping test (stated per row under 'Settings'), except the implicax "
        "rows marked 'tol …': the default solvers at looser tolerances, for the comparison at "
        "equal gradient accuracy (the anchors' stopping tests are looser than ours); same starting point "
        "(zeros); linear solves limited to 1000 matrix-vector products. "
        "grad rel. error = ‖g − g_ref‖₂ / ‖g_ref‖₂ against a float64 reference. "
        "fwd steps = iterations of the forward solve (Newton steps for Newton); bwd matvecs = "
        "matrix-vector products of implicax's adjoint solve, counted by running that solve on "
        "its own. Memory = `jax.jit(f).lower(...).compile().memory_analysis()."
        "temp_size_in_bytes` (live intermediates besides arguments and outputs) for growing "
        "iteration budgets. '—': not applicable or not reported by that library.",
        "",
    ]
    if checks:
        lines += ["## Targets (problem (a), batch 128 x width 128 in the full run)", ""]
        lines.append(targets_markdown(checks))
        lines.append("")
    if ablations:
        lines += ["## implicax settings compared (problem (a))", ""]
        lines += [f"- {a}" for a in ablations]
        lines.append("")
    lines += ["## Results", ""]
    for s in sections:
        lines.append(section_markdown(s))
    lines.append(f"![benchmarks]({ARGS.stem}.png)")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
