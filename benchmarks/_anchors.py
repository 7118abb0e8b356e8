"""The optional anchors (``pip install implicax[bench]``): jaxopt and optimistix, or None."""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # jaxopt is no longer developed and says so with a DeprecationWarning on import.
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import jaxopt
    except ImportError:  # pragma: no cover - depends on the environment
        jaxopt = None
    try:
        import lineax
        import optimistix
    except ImportError:  # pragma: no cover - depends on the environment
        lineax = optimistix = None

# Deprecation warnings that jaxopt emits while tracing are not ours to act on.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jaxopt(\..*)?")
warnings.filterwarnings("ignore", message=r".*jaxopt.*", category=DeprecationWarning)

MISSING = [name for name, mod in (("jaxopt", jaxopt), ("optimistix", optimistix)) if mod is None]
