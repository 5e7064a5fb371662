"""JAX's persistent compilation cache for the command-line tools, and a clock that separates compile from run time.

Every CLI that runs the model (``eval.py``, ``python -m sammed3d_jax.predict``, ``train.py``, ``python -m
sammed3d_jax.cvpr25``) turns the cache on by default under a user cache folder: ``$SAMMED3D_JAX_CACHE`` if set,
else ``$XDG_CACHE_HOME/sammed3d_jax/jax``, else ``~/.cache/sammed3d_jax/jax``. A second run of the same model on the
same machine then loads its programs instead of compiling them (on two CPU cores the demo model's evaluation
compiles in tens of seconds and loads in a few). Each tool has a flag to choose the folder and one to turn the cache
off. Every compiled program is cached (no minimum compile time or size), so the small click step is cached too.

``CompileClock`` listens to JAX's own monitoring events (tracing, lowering and backend compilation, or the cache
read that replaces it) so a tool can report compile time and run time separately without compiling anything twice.

Imports jax only (inside functions); never the model, data or training code.
"""

import dataclasses
import os
import threading
import time
from typing import Any

CACHE_ENV = "SAMMED3D_JAX_CACHE"
# JAX's monitoring events whose durations add up to the time spent producing executables (0.10 and later).
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_cache_dir() -> str:
    """``$SAMMED3D_JAX_CACHE``, else ``$XDG_CACHE_HOME/sammed3d_jax/jax``, else ``~/.cache/sammed3d_jax/jax``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sammed3d_jax", "jax")


def enable(cache_dir: str | None = None) -> str:
    """Points JAX's persistent compilation cache at ``cache_dir`` (default ``default_cache_dir()``) and caches every
    compiled program; returns the folder used. Call before the first compilation."""
    import jax

    folder = cache_dir or default_cache_dir()
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def configure(enabled: bool, cache_dir: str | None = None) -> str | None:
    """``enable(cache_dir)`` when ``enabled``; returns the folder in use, or None when the cache is off."""
    return enable(cache_dir) if enabled else None


def define_absl_flags() -> tuple:
    """``--[no]compilation_cache`` and ``--cache_dir`` for an absl command; returns their holders for ``from_absl``."""
    from absl import flags

    return (flags.DEFINE_bool("compilation_cache", True, "Use JAX's persistent compilation cache: a second run "
                              "loads its compiled programs (--nocompilation_cache: off)."),
            flags.DEFINE_string("cache_dir", "", f"Persistent compilation cache folder, local or gs://... (default "
                                f"${CACHE_ENV} or ~/.cache/sammed3d_jax/jax)."))


def from_absl(holders: tuple) -> str | None:
    """Applies the flags of ``define_absl_flags``; returns the cache folder, or None when it is off."""
    enabled, folder = holders
    return configure(enabled.value, folder.value or None)


def add_argparse_flags(parser) -> None:
    """``--cache-dir DIR`` and ``--no-compilation-cache`` for an argparse command."""
    parser.add_argument("--cache-dir", default="", help=f"persistent compilation cache folder (default ${CACHE_ENV} "
                                                        "or ~/.cache/sammed3d_jax/jax)")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="do not read or write the persistent compilation cache")


def from_argparse(args) -> str | None:
    """Applies the flags of ``add_argparse_flags``; returns the cache folder, or None when it is off."""
    return configure(not args.no_compilation_cache, args.cache_dir or None)


@dataclasses.dataclass
class CompileClock:
    """Sums JAX's compile-time events while active (a context manager; nesting and threads are fine).

    ``compile_s`` is the time spent tracing, lowering and compiling (or loading from the persistent cache).

    Attributes:
        cache_hits: programs loaded from the persistent cache.
        wall_s: wall time inside the ``with`` block.
    """

    cache_hits: int = 0
    wall_s: float = 0.0

    def __post_init__(self):
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._active = False
        self._spans: list[tuple[float, float]] = []

    @property
    def compile_s(self) -> float:
        """Seconds covered by compile events (their union: a jit traced inside another one is counted once)."""
        with self._lock:
            spans = sorted(self._spans)
        total, end = 0.0, float("-inf")
        for a, b in spans:
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    @property
    def elapsed_s(self) -> float:
        """Wall time so far: inside the block, since it began; after it, its whole duration."""
        return self.wall_s + (time.perf_counter() - self._t0 if self._active else 0.0)

    @property
    def run_s(self) -> float:
        """Wall time not spent compiling (so far)."""
        return max(self.elapsed_s - self.compile_s, 0.0)

    def _on_span(self, event: str, start: float, end: float, **kwargs: Any) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                self._spans.append((float(start), float(end)))

    def _on_event(self, event: str, **kwargs: Any) -> None:
        if event == CACHE_HIT_EVENT:
            with self._lock:
                self.cache_hits += 1

    def __enter__(self) -> "CompileClock":
        from jax import monitoring

        monitoring.register_event_time_span_listener(self._on_span)
        monitoring.register_event_listener(self._on_event)
        self._t0 = time.perf_counter()
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        from jax import monitoring

        self.wall_s += time.perf_counter() - self._t0
        self._active = False
        monitoring.unregister_event_time_span_listener(self._on_span)
        monitoring.unregister_event_listener(self._on_event)

    def describe(self) -> str:
        """E.g. ``compile 12.3 s (4 programs from the cache), run 4.5 s``."""
        hits = f" ({self.cache_hits} programs from the cache)" if self.cache_hits else ""
        return f"compile {self.compile_s:.1f} s{hits}, run {self.run_s:.1f} s"
