"""Running a command's async main: signals, clean Ctrl-C, one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any

from sealstream.errors import SealstreamError

__all__ = [
    "add_service_options",
    "glue_values",
    "keep",
    "quiet_broken_pipe",
    "read_option_file",
    "run",
    "suppress",
]


def keep(value: object) -> object:
    """An option's default on the command itself (see :func:`suppress`)."""
    return value


def suppress(value: object) -> object:
    """An option's default on the ``run`` subcommand, for options a command takes before or
    after ``run``: none, so that an option given before ``run`` is not overwritten by the
    subcommand's default."""
    return argparse.SUPPRESS


def add_service_options(parser: argparse.ArgumentParser, d: Callable[[object], object]) -> None:
    """The options every long-running service takes: NATS URL, subject prefix, logging.
    ``d`` is :func:`keep` on the command, :func:`suppress` on its ``run`` subcommand."""
    parser.add_argument(
        "--nats-url",
        default=d(None),
        help="NATS server (env NATS_URL); its NATS user, if it has users: env "
        "SEALSTREAM_NATS_USER with SEALSTREAM_NATS_PASSWORD_FILE (or SEALSTREAM_NATS_PASSWORD)",
    )
    parser.add_argument("--prefix", default=d(None), help="subject prefix (env SEALSTREAM_PREFIX)")
    parser.add_argument(
        "--log-level", default=d("info"), help="debug, info, warning or error (default info)"
    )
    parser.add_argument(
        "--log-json", action="store_true", default=d(False), help="log JSON lines, not text"
    )


def glue_values(argv: Sequence[str], options: Iterable[str]) -> list[str]:
    """``argv`` with each of ``options`` joined to the value after it (``--thumbprint -Ab``
    becomes ``--thumbprint=-Ab``), as getopt reads an option that takes a value: argparse
    would take a value beginning with ``-`` for an option. Ids (thumbprints, session ids,
    kids) are base64url, and one in 64 begins with ``-``."""
    wanted = frozenset(options)
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            out += [arg, *it]
            break
        value = next(it, None) if arg in wanted else None
        out.append(arg if value is None else f"{arg}={value}")
    return out


def read_option_file(flag: str, path: Path) -> str:
    """The text of the file an option names; a ValueError naming the option if it cannot be
    read (``--jwk-file me.jwk: no such file``)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{flag} {path}: {reason}") from None


async def _until_signalled(main: Coroutine[Any, Any, int], interrupted: int) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        return await main
    except asyncio.CancelledError:
        if stopping:
            return interrupted  # asked to stop
        raise


def quiet_broken_pipe() -> int:
    """After stdout's reader went away (``| head``): exit 0 quietly, as a filter does; stdout
    goes to /dev/null so the interpreter's last flush does not complain either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def run(main: Callable[[], Coroutine[Any, Any, int]], *, interrupted: int = 0) -> int:
    """Run ``main()``; SIGINT/SIGTERM stop it cleanly (exit ``interrupted``: 0, as every
    command ends on Ctrl-C; a service's normal end), a reader of stdout that went away ends
    it quietly (exit 0), a SealstreamError or a misconfiguration prints one ``error:`` line
    (exit 1), never a traceback."""
    try:
        return asyncio.run(_until_signalled(main(), interrupted))
    except KeyboardInterrupt:  # before the handlers are in place, or after
        return interrupted
    except BrokenPipeError:
        return quiet_broken_pipe()
    except SealstreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
