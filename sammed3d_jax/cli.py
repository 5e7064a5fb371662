"""What every command-line entry point shares: quiet library logs, one-line errors with exit codes, output checks.

A user's mistake (a missing file, a bad flag value, an existing output) ends a command with one line on stderr,
``error: <what, naming the file or argument>``, and exit status 2, never a traceback; Ctrl-C ends it with status 130.
``SAMMED3D_TRACEBACK=1`` re-raises instead, for debugging. ``run_absl_app`` does the same for absl/ml_collections
entry points, whose flags and config files are read before ``main`` runs (a misspelt ``--config.key`` lists the
keys next to it). Must not import jax, flax, the model or training/.
"""

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn, TypeVar

from etils import epath

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
TRACEBACK_ENV = "SAMMED3D_TRACEBACK"
# Errors that describe the user's input or environment, not a bug: reported as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError, EOFError)
# Library loggers that talk at INFO about every file operation (Orbax through absl) or backend probe (jax).
NOISY_LOGGERS = ("absl", "jax._src.xla_bridge", "jax._src.distributed")

F = TypeVar("F", bound=Callable)


class UsageError(ValueError):
    """A bad command-line argument or config value; the message names it."""


def quiet_library_logs() -> None:
    """Keeps our INFO lines and the libraries' warnings, drops the libraries' INFO chatter."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def one_line(err: BaseException) -> str:
    """``err`` as one line: its message (or its type when it has none), newlines folded."""
    text = " ".join(str(err).split())
    if isinstance(err, MemoryError):
        return f"out of memory{': ' + text if text else ''}"
    if not text:
        return type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    """Prints ``error: message`` on stderr and exits with ``status``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def guarded(main: F) -> F:
    """Wraps an entry point so user errors end it with one line and exit 2, Ctrl-C with exit 130.

    ``SystemExit`` (argparse, absl) passes through untouched; ``SAMMED3D_TRACEBACK=1`` re-raises everything.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            if os.environ.get(TRACEBACK_ENV):
                raise
            fail("interrupted", EXIT_INTERRUPTED)
        except USER_ERRORS as err:
            if os.environ.get(TRACEBACK_ENV):
                raise
            fail(one_line(err))

    return wrapper  # type: ignore[return-value]


def _same_file(a: epath.Path, b: epath.Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError, ValueError, NotImplementedError):
        return os.fspath(a) == os.fspath(b)


def check_output_path(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                      name: str = "--out", is_dir: bool = False) -> epath.Path:
    """Refuses an output path before any work is done; returns it as an ``epath.Path``.

    Refused: an output that is one of ``inputs`` (never overwrite a user's input), an existing output without
    ``overwrite``, an output of the wrong kind (a file where a folder is wanted, or the reverse), and a missing or
    unwritable parent folder (local paths only: object stores are checked by the write itself).

    Args:
      path: the output file or folder.
      inputs: the command's input files or folders.
      overwrite: whether an existing output may be replaced.
      name: the argument's name, for the message.
      is_dir: the output is a folder.

    Raises:
      UsageError: naming ``name`` and the path.
    """
    out = epath.Path(path)
    for src in inputs:
        if src is not None and _same_file(out, epath.Path(src)):
            raise UsageError(f"{name} {out} is an input of this command; refusing to overwrite it")
    remote = "://" in os.fspath(out)
    try:
        exists = out.exists()
    except ImportError:  # An object store whose client library is missing: the write itself will say so.
        exists = False
    if exists:
        if is_dir != out.is_dir():
            kind = "a folder" if out.is_dir() else "a file"
            raise UsageError(f"{name} {out} is {kind}; expected {'a folder' if is_dir else 'a file'}")
        if not overwrite and not (is_dir and not any(out.iterdir())):
            raise UsageError(f"{name} {out} already exists; pass --overwrite to replace it")
    if not remote:
        # A folder may be created with its missing parents; a file needs its folder. Either way the nearest existing
        # ancestor must be a writable folder.
        anchor = out.parent if os.fspath(out.parent) else epath.Path(".")
        if is_dir:
            while not anchor.exists() and anchor != anchor.parent:
                anchor = anchor.parent
        if not anchor.exists():
            raise UsageError(f"{name} {out}: folder {anchor} does not exist")
        if not anchor.is_dir():
            raise UsageError(f"{name} {out}: {anchor} is not a folder")
        if not os.access(anchor, os.W_OK | os.X_OK):
            raise UsageError(f"{name} {out}: folder {anchor} is not writable")
    return out


def _config_key_message(flag: str, config) -> str:
    """``--config.a.b``: which part of the dotted key is wrong, the close matches and the keys at that level."""
    import difflib

    parts = flag.split("=", 1)[0].removeprefix("--").split(".")[1:]
    node, path = config, []
    for part in parts:
        if not hasattr(node, "keys"):
            return f"--config.{'.'.join(parts)}: {'.'.join(path)} is a value, not a group of keys"
        if part not in node.keys():
            keys = sorted(node.keys())
            close = difflib.get_close_matches(part, keys, n=3)
            where = f" under --config.{'.'.join(path)}" if path else ""
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            return f"--config.{'.'.join(parts)}: no config key {part!r}{where}{hint} (keys: {', '.join(keys)})"
        node, path = node[part], path + [part]
    return ""


def _flag_error(err: BaseException, argv: list[str], default_config: Callable | None) -> str:
    """One line for an error raised while absl defines or parses flags (including ml_collections config files)."""
    text = str(err).strip()
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    config_file = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    if config_file is None and "--config" in argv[1:-1]:
        config_file = argv[argv.index("--config") + 1]
    if isinstance(err, (AttributeError, KeyError, TypeError)) and overrides and default_config is not None:
        config = default_config()
        for flag in overrides:
            message = _config_key_message(flag, config)
            if message:
                return message
    if isinstance(err, (SyntaxError, NameError, ImportError)) and config_file:
        return (f"--config {config_file}: not a Python config file with get_config() "
                f"({type(err).__name__}: {one_line(err)})")
    if isinstance(err, OSError) and config_file and ("No such file" in text or "not available" in text):
        return f"--config {config_file}: does not exist" if "No such file" in text else (
            f"--config {config_file}: cannot be loaded ({' '.join(text.split())[-200:]})")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback" in text and lines:  # ml_collections wraps a config file's own error with its traceback
        return f"{lines[0].removeprefix('flag ').split(': Error whilst', 1)[0]}: {lines[-1]}"
    return one_line(err).removeprefix("flag ")


def run_absl_app(main: Callable[[list[str]], int | None], define_flags: Callable[[], None], *,
                 default_config: Callable | None = None, validate: Callable[[], object] | None = None,
                 argv: list[str] | None = None) -> NoReturn:
    """``absl.app.run`` with one-line errors for flags, config files and ``--config.`` overrides, then ``main``.

    ml_collections reads ``--config`` and its overrides while the flags are defined and again while they are
    parsed; both happen here, under the same error handling, and a typo'd ``--config.key`` names the keys near it.

    Args:
      main: the absl main, called with the remaining arguments (wrapped with :func:`guarded`).
      define_flags: defines the absl flags (module-level ``DEFINE_*`` calls moved into a function).
      default_config: returns the default ConfigDict, used to list the valid keys near a typo.
      validate: called after parsing, under the same handling (e.g. ``lambda: CONFIG.value``: a config file given
        on the command line is only loaded when its value is first read).
      argv: the command line (default ``sys.argv``).
    """
    from absl import app, flags

    argv = list(sys.argv if argv is None else argv)

    def attempt(step: Callable[[], object]) -> object:
        try:
            return step()
        except flags.Error as err:
            fail(_flag_error(err, argv, default_config))
        except Exception as err:  # noqa: BLE001  (config files raise anything: all of it is the user's input)
            if os.environ.get(TRACEBACK_ENV):
                raise
            fail(_flag_error(err, argv, default_config))

    def parse(args: list[str]) -> object:
        rest = flags.FLAGS(args)
        if validate is not None:
            validate()
        return rest

    attempt(define_flags)
    app.run(guarded(main), argv=argv, flags_parser=lambda args: attempt(lambda: parse(args)))
    raise SystemExit(0)  # app.run exits itself; this line only states the contract
