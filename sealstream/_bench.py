"""``sealstream bench``: placeholder replaced by the load-test tool."""

from __future__ import annotations

import argparse
import sys

__all__ = ["bench_main"]


def bench_main(args: argparse.Namespace) -> int:
    print("error: sealstream bench is not built yet", file=sys.stderr)
    return 2
