"""Documentation checks: the API reference covers every public symbol, the code in README.md
and docs/ runs, and (when mkdocs is installed) the site builds with `mkdocs build --strict`.

Conventions for code blocks in README.md and docs/**/*.md
---------------------------------------------------------
* Every fenced block opened with ```python (also inside admonitions and list items) is
  executed. The blocks of one file run in order, in one namespace of their own, in a
  Python subprocess (`sys.executable`, one for all files, so JAX is imported once) with
  default JAX settings: float32 (this suite's conftest.py enables float64 in-process),
  XLA_FLAGS forcing 4 CPU devices so that pmap and shard_map examples run, and
  RuntimeWarning as an error, so an example whose solve does not converge fails (catch the
  warning explicitly where a page demonstrates one). Settings a page changes (float64,
  matmul precision, warning filters) are restored before the next file.
* A block that is not meant to run (pseudo-code with placeholders such as ``fn`` and
  ``x0``, code that needs several hosts or a package the docs do not install) is marked by
  the HTML comment ``<!-- skip -->`` on the line directly before its opening fence.
  Markdown renders nothing for the comment.
* Tracebacks point at the Markdown file and line, so a failing example is found directly.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP_MARKER = "<!-- skip -->"
# Modules whose __all__ must be documented; the adapters only where their framework is installed.
CORE_MODULES = ("implicax", "implicax.testing", "implicax.compat")
ADAPTER_MODULES = {  # module: the framework it needs
    "implicax_flax": "flax",
    "implicax_flax.nnx": "flax",
    "implicax_haiku": "haiku",
}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
_DIRECTIVE = re.compile(r"^[ \t]*:::[ \t]+(?P<name>[\w.]+)", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # 1-based line number of the block's first code line
    code: str
    skip: bool


def code_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, dedented to their fence's indentation."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        body_start = i + 1
        j = body_start
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (
                closing
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            j += 1
        language = info.split()[0].lstrip("{.").rstrip("}") if info else ""
        if language == "python":
            body = [
                line[len(indent) :] if line.startswith(indent) else line
                for line in lines[body_start:j]
            ]
            skip = i > 0 and lines[i - 1].strip() == SKIP_MARKER
            blocks.append(Block(body_start + 1, textwrap.dedent("\n".join(body)), skip))
        i = j + 1
    return blocks


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# Runs in the subprocess. Reads [[path, [[line, code], ...]], ...] from stdin; for each file,
# executes its blocks in order in a fresh namespace and records the traceback of the first
# failure; writes {path: {"error": str | None, "seconds": float}} as JSON to argv[1]. Each
# block is padded with blank lines so that its line numbers are those of the Markdown file,
# and compiled under the file's name, so tracebacks show the Markdown source. One process
# for all files pays JAX's import once; the settings a page may change (float64, matmul
# precision, warning filters) are restored after each file.
_RUNNER = """
import json, sys, time, traceback, warnings
import jax

results = {}
for path, blocks in json.load(sys.stdin):
    start, error = time.perf_counter(), None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        namespace = {"__name__": "__main__"}
        try:
            for line, code in blocks:
                exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
        except BaseException:
            error = traceback.format_exc()
    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_default_matmul_precision", None)
    results[path] = {"error": error, "seconds": time.perf_counter() - start}
    print(f"{path}: {results[path]['seconds']:.1f} s", file=sys.stderr, flush=True)
with open(sys.argv[1], "w") as file:
    json.dump(results, file)
"""


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    # Doc examples are tiny: compile time dominates, and XLA's backend optimisations are
    # not worth it (they change speed, not results).
    flags += " --xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _runnable(path: Path) -> list[Block]:
    return [b for b in code_blocks(path.read_text(encoding="utf-8")) if not b.skip]


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory) -> dict:
    """Run every file's blocks (one subprocess for all files); the results by path."""
    files = [(str(path), [[b.line, b.code] for b in _runnable(path)]) for path in markdown_files()]
    files = [(path, blocks) for path, blocks in files if blocks]
    output = tmp_path_factory.mktemp("docs") / "results.json"
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(output)],
        input=json.dumps(files),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_subprocess_env(),
        timeout=900,
    )
    assert result.returncode == 0 and output.exists(), (
        f"the docs runner failed:\n{result.stderr[-6000:]}"
    )
    return json.loads(output.read_text())


def test_code_block_parser():
    text = "\n".join(
        [
            "```python",
            "a = 1",
            "```",
            SKIP_MARKER,
            "```python",
            "fn(x0)",
            "```",
            "```bash",
            "make test",
            "```",
            "!!! note",
            "    ```python",
            "    if a:",
            "        b = 2",
            "    ```",
        ]
    )
    blocks = code_blocks(text)
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (2, "a = 1", False),
        (6, "fn(x0)", True),
        (13, "if a:\n    b = 2", False),
    ]


@pytest.mark.parametrize("path", [p for p in markdown_files() if _runnable(p)], ids=_id)
def test_code_blocks_run(path: Path, doc_runs: dict):
    run = doc_runs[str(path)]
    assert run["error"] is None, (
        f"a code block in {_id(path)} failed (mark blocks that are not meant to run with "
        f"{SKIP_MARKER} on the line before the fence):\n{run['error'][-6000:]}"
    )


def _documented_names() -> set[str]:
    return {
        m["name"]
        for path in DOCS.rglob("*.md")
        for m in _DIRECTIVE.finditer(path.read_text(encoding="utf-8"))
    }


def _undocumented(module_name: str) -> tuple[list[str], list[str]]:
    """Names in module.__all__ without a docstring, and those without a `:::` entry."""
    module = importlib.import_module(module_name)
    assert module.__all__, f"{module_name}.__all__ is empty"
    reference = _documented_names()
    no_docstring, no_entry = [], []
    for name in module.__all__:
        obj = getattr(module, name)
        doc = (obj.__doc__ or "").strip()
        # A dataclass without a docstring gets its signature as __doc__: that does not count.
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            doc = ""
        if not doc:
            no_docstring.append(name)
        if f"{module_name}.{name}" not in reference:
            no_entry.append(f"::: {module_name}.{name}")
    return no_docstring, no_entry


def _check_module(module_name: str) -> None:
    no_docstring, no_entry = _undocumented(module_name)
    assert not no_docstring, f"{module_name}: public names without a docstring: {no_docstring}"
    assert not no_entry, (
        f"{module_name}: public names missing from the API reference (docs/api/*.md): {no_entry}"
    )


@pytest.mark.parametrize("module_name", CORE_MODULES)
def test_core_api_documented(module_name: str):
    _check_module(module_name)


@pytest.mark.parametrize("module_name", sorted(ADAPTER_MODULES))
def test_adapter_api_documented(module_name: str):
    if importlib.util.find_spec(module_name.split(".")[0]) is None:
        pytest.skip(f"{module_name} is not installed")
    pytest.importorskip(ADAPTER_MODULES[module_name])
    module = importlib.import_module(module_name)
    if not hasattr(module, "__all__"):
        pytest.skip(f"{module_name} defines no __all__")
    _check_module(module_name)


def test_mkdocs_build_strict(tmp_path: Path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
