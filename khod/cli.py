"""The ``khod`` command: daemon, operator commands, inspect and demo.

Each sub-command imports its module lazily so that ``khod inspect`` on a
rescue shell does not pay for (or need) the MQTT stack.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_bus_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="khod.toml (default: $KHOD_CONFIG)")
    p.add_argument("--broker", help="broker URL: mqtt://host:port or unix:///path")
    p.add_argument("--broker-username", metavar="USER", help="broker user (e.g. operator)")
    p.add_argument(
        "--broker-password-file",
        type=Path,
        metavar="FILE",
        help="file holding the broker password (or set $KHOD_BROKER_PASSWORD)",
    )
    p.add_argument("--host-id", help="host id in the topic prefix (default: hostname)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="khod", description="Userspace orchestrator for Linux live update (KHO/LUO)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon")
    p.add_argument("--config", "-c", type=Path, help="khod.toml (default: $KHOD_CONFIG)")
    p.add_argument(
        "--restore", type=Path, metavar="IMAGE", help="start on this incoming payload image"
    )

    p = sub.add_parser("begin", help="begin a handover")
    _add_bus_options(p)
    p.add_argument("--deadline", type=float, help="seconds until the handover aborts")
    p.add_argument("--expect", nargs="+", metavar="NAME", help="participants to wait for")
    p.add_argument("--no-auto-freeze", action="store_true", help="wait for `khod freeze`")

    p = sub.add_parser("freeze", help="start the freeze (blackout) now")
    _add_bus_options(p)
    p.add_argument("--force", action="store_true", help="leave out who is not serialized")

    p = sub.add_parser("abort", help="abort the handover; every participant cancels")
    _add_bus_options(p)
    p.add_argument("--reason", default="operator abort")

    p = sub.add_parser("status", help="the handover and its participants")
    _add_bus_options(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("monitor", help="live progress of the handover")
    _add_bus_options(p)
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--exit-when-done", action="store_true", help="exit on commit/abort/release")

    p = sub.add_parser("inspect", help="verify and show a payload image")
    p.add_argument("image", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--dts", action="store_true", help="decode every fragment")
    p.add_argument(
        "--base", type=lambda v: int(v, 0), default=0, help="physical base it was built for"
    )

    p = sub.add_parser("demo", help="a whole handover and restore on a private broker")
    p.add_argument("--participants", "-n", type=int, default=16)
    p.add_argument("--output", "-o", type=Path, help="directory for payload.kho (default: new)")
    p.add_argument("--quiet", "-q", action="store_true", help="no live progress")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd: str = args.command
    if cmd == "inspect":
        from khod.inspect import main as inspect_main

        return inspect_main(args.image, as_json=args.json, dts=args.dts, base=args.base)
    if cmd == "run":
        from khod.service import main as run_main

        return run_main(args.config, restore=args.restore)
    if cmd == "demo":
        from khod.demo import main as demo_main

        return demo_main(args.participants, args.output, quiet=args.quiet)
    from khod.operator_cli import main as operator_main

    return operator_main(args)


if __name__ == "__main__":
    sys.exit(main())
