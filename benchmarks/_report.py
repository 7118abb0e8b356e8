"""Markdown tables, target checks and the PNG figure."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from _harness import Result


@dataclasses.dataclass
class Section:
    key: str  # "a", "a-64", "b", "c"
    title: str
    description: str
    results: list[Result]
    reference: str
    vg_label: str = "value_and_grad (ms)"
    memory_steps: tuple[int, ...] = ()
    residual_label: str = "max abs(f(z) − z)"
    short: str = ""


def _fmt(value: Any, spec: str = ".3g", none: str = "—") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def _ms(median: float | None, best: float | None) -> str:
    if median is None:
        return "—"
    return f"{median:.2f} ({best:.2f})" if best is not None else f"{median:.2f}"


def section_markdown(section: Section) -> str:
    lines = [f"### {section.title}", "", section.description, ""]
    lines.append(
        f"| Method | compile (s) | forward (ms) | {section.vg_label} | grad rel. error | "
        f"fwd steps | bwd matvecs | {section.residual_label} |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in section.results:
        if r.error:
            lines.append(f"| {r.name} | failed: {r.error} | | | | | | |")
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    r.name + (" ¹" if r.note else ""),
                    _fmt(r.compile_s if r.compile_s is not None else r.forward_compile_s, ".2f"),
                    _ms(r.forward_ms, r.forward_ms_min),
                    _ms(r.vg_ms, r.vg_ms_min),
                    _fmt(r.grad_error, ".2e"),
                    _fmt(r.forward_steps, "d"),
                    _fmt(r.backward_steps, "d"),
                    _fmt(r.residual, ".2e"),
                ]
            )
            + " |"
        )
    lines.append("")
    notes = [f"¹ {r.name}: {r.note}" for r in section.results if r.note]
    if notes:
        lines += notes + [""]
    lines.append(f"Gradient reference: {section.reference}.")
    lines.append("")
    lines.append("<details><summary>Settings of each row</summary>")
    lines.append("")
    for r in section.results:
        lines.append(f"- **{r.name}**: {r.settings}")
    lines += ["", "</details>", ""]
    if section.memory_steps:
        with_memory = [r for r in section.results if r.memory]
        if with_memory:
            lines.append(
                "Memory: XLA temp buffers of the compiled "
                + ("training step" if section.key == "c" else "value_and_grad")
                + " (MiB) for an iteration budget of (max_steps, or the unroll length):"
            )
            lines.append("")
            lines.append("| Method | " + " | ".join(str(k) for k in section.memory_steps) + " |")
            lines.append("|---|" + "---:|" * len(section.memory_steps))
            for r in with_memory:
                cells = [
                    _fmt(r.memory.get(k, None) and r.memory[k] / 2**20, ".3f")
                    for k in section.memory_steps
                ]
                lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def find(results: list[Result], name: str) -> Result | None:
    for r in results:
        if r.name == name and not r.error:
            return r
    return None


def targets(results: list[Result], implicax_names: list[str], sweep: list[str]) -> list[dict]:
    """The issue's targets, evaluated on one table (same process, same inputs).

    `sweep`: rows of one implicax configuration at several tolerances; the fastest of them
    whose gradient error is at most the fastest anchor's is checked against that anchor too.
    """
    plain = next((r for r in results if r.family == "plain" and r.forward_ms), None)
    anchors = [
        r for r in results if r.family in ("jaxopt", "optimistix") and r.vg_ms and not r.error
    ]
    optx = [r for r in anchors if r.family == "optimistix" and r.compile_s]
    checks = []
    for name in implicax_names:
        imp = find(results, name)
        if imp is None:
            continue

        def add(what, ratio, limit, holds=None, detail="", name=name):
            if ratio is None:
                checks.append(
                    dict(row=name, what=what, value="n/a", limit=limit, holds=None, detail=detail)
                )
                return
            ok = ratio <= limit if holds is None else holds
            checks.append(
                dict(
                    row=name,
                    what=what,
                    value=_ratio(ratio, limit),
                    limit=f"≤ {limit}x",
                    holds=ok,
                    detail=detail,
                )
            )

        if plain and imp.forward_ms:
            add(
                "forward / plain while_loop forward",
                imp.forward_ms / plain.forward_ms,
                1.1,
                detail=f"{imp.forward_ms:.2f} vs {plain.forward_ms:.2f} ms (minima: "
                f"×{imp.forward_ms_min / plain.forward_ms_min:.2f}); steps {imp.forward_steps} vs "
                f"{plain.forward_steps}",
            )
        if plain and imp.vg_ms:
            add(
                "value_and_grad / plain while_loop forward",
                imp.vg_ms / plain.forward_ms,
                2.3,
                detail=f"{imp.vg_ms:.2f} vs {plain.forward_ms:.2f} ms (minima: "
                f"×{imp.vg_ms_min / plain.forward_ms_min:.2f})",
            )
        if anchors and imp.vg_ms:
            fastest = min(anchors, key=lambda r: r.vg_ms)
            ratio = imp.vg_ms / fastest.vg_ms
            accurate = (
                imp.grad_error is not None
                and fastest.grad_error is not None
                and imp.grad_error <= 1.25 * fastest.grad_error
            )
            add(
                "value_and_grad / fastest anchor's, at equal or better gradient error",
                ratio,
                0.5,
                holds=ratio <= 0.5 and accurate,
                detail=f"{fastest.name}: {fastest.vg_ms:.2f} ms (minima: ×{imp.vg_ms_min / fastest.vg_ms_min:.2f}), "
                f"grad error {_fmt(fastest.grad_error, '.2e')} vs "
                f"{_fmt(imp.grad_error, '.2e')} ({'equal or better' if accurate else 'WORSE'}; equal = within 25%)",
            )
        elif not anchors:
            add("value_and_grad / fastest anchor's", None, "0.5", detail="anchors not installed")
        if optx and imp.compile_s:
            o = min(optx, key=lambda r: r.compile_s)
            add(
                "compile (value_and_grad) / optimistix's",
                imp.compile_s / o.compile_s,
                0.5,
                detail=f"{imp.compile_s:.2f} vs {o.compile_s:.2f} s ({o.name})",
            )
        if len(imp.memory) >= 2:
            low, high = min(imp.memory), max(imp.memory)
            growth = imp.memory[high] / max(imp.memory[low], 1)
            add(
                f"temp memory at {high} / at {low} steps",
                growth,
                1.0,
                holds=growth <= 1.0 + 1e-9,
                detail=f"{imp.memory[low] / 2**20:.3f} → {imp.memory[high] / 2**20:.3f} MiB",
            )
    if anchors:
        fastest = min(anchors, key=lambda r: r.vg_ms)
        swept = [find(results, name) for name in sweep]
        accurate = [
            r
            for r in swept
            if r
            and r.vg_ms
            and r.grad_error is not None
            and fastest.grad_error is not None
            and r.grad_error <= fastest.grad_error
        ]
        if accurate:
            best = min(accurate, key=lambda r: r.vg_ms)
            ratio = best.vg_ms / fastest.vg_ms
            checks.append(
                dict(
                    row=f"{best.name} (fastest of {len(sweep)} tolerances with error ≤ the anchor's)",
                    what="value_and_grad / fastest anchor's, at equal or better gradient error",
                    value=_ratio(ratio, 0.5),
                    limit="≤ 0.5x",
                    holds=ratio <= 0.5,
                    detail=f"{fastest.name}: {fastest.vg_ms:.2f} vs {best.vg_ms:.2f} ms (minima: "
                    f"×{best.vg_ms_min / fastest.vg_ms_min:.2f}), grad error "
                    f"{fastest.grad_error:.2e} vs {best.grad_error:.2e}",
                )
            )
    return checks


def _ratio(ratio: float, limit: float) -> str:
    """Two decimals, or three where two would round onto the limit."""
    return f"{ratio:.3f}x" if abs(ratio - limit) < 0.01 else f"{ratio:.2f}x"


def targets_markdown(checks: list[dict]) -> str:
    lines = [
        "| implicax row | ratio | value | target | holds | detail |",
        "|---|---|---:|---|---|---|",
    ]
    for c in checks:
        holds = {True: "yes", False: "**no**", None: "n/a"}[c["holds"]]
        lines.append(
            f"| {c['row']} | {c['what']} | {c['value']} | {c['limit']} | {holds} | {c['detail']} |"
        )
    return "\n".join(lines)


def comparisons(results: list[Result]) -> list[str]:
    """Ablations within one table: on_failure, forward and backward solvers, defaults."""
    out = []

    def ms(r, field):
        return f"{getattr(r, field):.2f} ms"

    for base in ("FPI + GMRES", "Anderson + GMRES", "FPI + BiCGStab", "FPI + Neumann"):
        warn, ignore = find(results, f"implicax {base}"), find(results, f"implicax {base}, ignore")
        if not (warn and ignore and warn.vg_ms and ignore.vg_ms):
            continue
        out.append(
            f"on_failure='warn' vs 'ignore' ({base}): forward {ms(warn, 'forward_ms')} vs "
            f"{ms(ignore, 'forward_ms')} (×{warn.forward_ms / ignore.forward_ms:.2f}), "
            f"value_and_grad {ms(warn, 'vg_ms')} vs {ms(ignore, 'vg_ms')} "
            f"(×{warn.vg_ms / ignore.vg_ms:.2f})"
        )
    anderson, fpi = (
        find(results, "implicax Anderson + GMRES, ignore"),
        find(results, "implicax FPI + GMRES, ignore"),
    )
    if anderson and fpi and anderson.forward_ms and fpi.forward_ms:
        out.append(
            f"Anderson(history=5) vs FixedPointIteration forward (on_failure='ignore'): "
            f"{ms(anderson, 'forward_ms')} in {anderson.forward_steps} steps vs "
            f"{ms(fpi, 'forward_ms')} in {fpi.forward_steps} steps "
            f"(×{anderson.forward_ms / fpi.forward_ms:.2f}); per step "
            f"{anderson.forward_ms / max(anderson.forward_steps or 1, 1) * 1e3:.0f} vs "
            f"{fpi.forward_ms / max(fpi.forward_steps or 1, 1) * 1e3:.0f} µs; compile (value_and_grad) "
            f"{_fmt(anderson.compile_s, '.2f')} vs {_fmt(fpi.compile_s, '.2f')} s"
        )
    plain = next((r for r in results if r.family == "plain" and r.forward_ms), None)
    if plain and fpi and fpi.forward_ms and plain.forward_steps and fpi.forward_steps:
        out.append(
            f"Per forward step: plain while_loop {plain.forward_ms / plain.forward_steps * 1e3:.0f} µs, "
            f"{fpi.name} {fpi.forward_ms / fpi.forward_steps * 1e3:.0f} µs "
            f"(min-based: {plain.forward_ms_min / plain.forward_steps * 1e3:.0f} vs "
            f"{fpi.forward_ms_min / fpi.forward_steps * 1e3:.0f} µs)"
        )
    backward = [
        r
        for r in results
        if r.name.startswith("implicax FPI + ") and r.name.endswith(", ignore") and r.vg_ms
    ]
    if len(backward) > 1:
        parts = [
            f"{r.name.removeprefix('implicax FPI + ').removesuffix(', ignore')} "
            f"{r.vg_ms:.2f} ms ({r.backward_steps} matvecs, error {_fmt(r.grad_error, '.2e')}, "
            f"compile {_fmt(r.compile_s, '.2f')} s)"
            for r in backward
        ]
        out.append(
            "Backward solvers (FPI forward, on_failure='ignore'), value_and_grad: "
            + "; ".join(parts)
        )
    defaults = find(results, "implicax defaults")
    rows = [r for r in results if r.family == "implicax" and r.vg_ms and r.grad_error is not None]
    if defaults and defaults.grad_error is not None and rows:
        accurate = [r for r in rows if r.grad_error <= 1.25 * defaults.grad_error]
        best = min(accurate, key=lambda r: r.vg_ms)
        out.append(
            f"Fastest implicax value_and_grad at the defaults' accuracy or better: {best.name} "
            f"({best.vg_ms:.2f} ms, error {best.grad_error:.2e}) vs defaults "
            f"({defaults.vg_ms:.2f} ms, error {defaults.grad_error:.2e}): ×{defaults.vg_ms / best.vg_ms:.2f}"
        )
    return out


def plot(sections: list[Section], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    main = [s for s in sections if s.key in ("a", "b", "c")]
    fig, axes = plt.subplots(2, len(main), figsize=(6.2 * len(main), 10), squeeze=False)
    colors = {
        "plain": "#777777",
        "unrolled": "#d62728",
        "direct": "#8c564b",
        "implicax": "#1f77b4",
        "jaxopt": "#2ca02c",
        "optimistix": "#ff7f0e",
    }
    for col, section in enumerate(main):
        ax = axes[0][col]
        rows = [r for r in section.results if not r.error and (r.forward_ms or r.vg_ms)]
        names = [r.name for r in rows]
        y = list(range(len(rows)))
        fwd = [r.forward_ms or 0 for r in rows]
        vg = [r.vg_ms or 0 for r in rows]
        ax.barh(
            [i - 0.2 for i in y],
            fwd,
            height=0.4,
            color=[colors[r.family] for r in rows],
            alpha=0.45,
            label="forward",
        )
        ax.barh(
            [i + 0.2 for i in y],
            vg,
            height=0.4,
            color=[colors[r.family] for r in rows],
            label=section.vg_label.replace(" (ms)", ""),
        )
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms (median, warm)")
        ax.set_title(section.short or section.title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
        ax = axes[1][col]
        markers = "osD^vP*X"
        styles = ["-", "--", ":", "-."]
        for i, r in enumerate(r for r in section.results if r.memory and not r.error):
            ks = sorted(r.memory)
            ax.plot(
                ks,
                [max(r.memory[k], 1) / 2**20 for k in ks],
                marker=markers[i % len(markers)],
                linestyle=styles[i % len(styles)],
                label=r.name,
                color=colors[r.family],
                alpha=0.85,
            )
        if not any(r.memory for r in section.results):
            ax.text(0.5, 0.5, "no memory sweep in this run", ha="center", va="center")
            ax.set_axis_off()
            continue
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(list(section.memory_steps), [str(k) for k in section.memory_steps])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("iteration budget (max_steps / unroll length)")
        ax.set_ylabel("XLA temp memory (MiB)")
        ax.set_title("memory vs iterations: " + (section.short or section.title), fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
