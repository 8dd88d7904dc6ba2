"""`edge certs` (work in progress)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("certs", help="(in progress)")
    p.set_defaults(handler=lambda args: 2)
    _ = argparse
