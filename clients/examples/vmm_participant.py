#!/usr/bin/env python3
"""A small VMM taking part in a khod live update: copy it and replace the VM.

Outgoing side (default): register, wait for a handover to begin, serialize
the VM state into a fragment and submit it; the "state changes" once (a
device is hot-plugged), so it serializes again and submits the new fragment,
which replaces the first; then wait for the freeze signal, pause the VM and
report frozen. If the handover is cancelled instead, resume the VM.

Incoming side (``--restore``, after the kexec): retrieve the fragment, decode
it, print the VM state it holds as JSON, and finish.

The fragment (``compatible = "linux-kho,khod-example,vmm-v1"``)::

    / {
        compatible = "linux-kho,khod-example,vmm-v1";
        instance = <N>;
        vm-name = "guest-N";
        vcpus = <4>;                        /* u32 */
        memory {
            region0 { base = /bits/ 64 <0x0>; size = /bits/ 64 <...>; };  /* u64 */
            ...
        };
        devices {
            virtio-net0 { type = "virtio-net"; mac = [52 54 00 ...]; };
            virtio-blk1 { type = "virtio-blk"; };
            ...
        };
    };

Exit status: 0 done, 3 cancelled, 1 error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from khod_client import (
    HandoverCancelled,
    KhodError,
    Participant,
    default_host_id,
)
from khod_wire import fdt

COMPATIBLE = "khod-example,vmm-v1"
EXIT_CANCELLED = 3


@dataclass
class Device:
    kind: str
    mac: bytes = b""


@dataclass
class VM:
    """The made-up state a VMM would hand over."""

    name: str
    vcpus: int
    regions: list[tuple[int, int]]
    devices: list[Device] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vcpus": self.vcpus,
            "memory": [{"base": hex(b), "size": hex(s)} for b, s in self.regions],
            "devices": [{"type": d.kind, "mac": d.mac.hex(":")} for d in self.devices],
        }


def make_vm(instance: int) -> VM:
    gib = 1 << 30
    return VM(
        name=f"guest-{instance}",
        vcpus=4,
        regions=[(0, 2 * gib), (4 * gib, 2 * gib)],
        devices=[Device("virtio-net", bytes([0x52, 0x54, 0, 0x12, 0x34, instance & 0xFF]))],
    )


def serialize(p: Participant, vm: VM) -> bytes:
    """The VM as this participant's fragment."""
    b = p.start_storage()
    b.property_string("vm-name", vm.name)
    b.property_u32("vcpus", vm.vcpus)
    with b.node("memory"):
        for i, (base, size) in enumerate(vm.regions):
            with b.node(f"region{i}"):
                b.property_u64("base", base)
                b.property_u64("size", size)
    with b.node("devices"):
        for i, dev in enumerate(vm.devices):
            with b.node(f"{dev.kind}{i}"):
                b.property_string("type", dev.kind)
                if dev.mac:
                    b.property_bytes("mac", dev.mac)
    return b.finish_storage()


def _u32(raw: bytes | None) -> int:
    return int(struct.unpack(">I", raw or b"\0\0\0\0")[0])


def _u64(raw: bytes | None) -> int:
    return int(struct.unpack(">Q", raw or bytes(8))[0])


def _text(raw: bytes | None) -> str:
    return (raw or b"\0")[:-1].decode()


def deserialize(blob: bytes) -> VM:
    """The VM a fragment holds (``fdt.read_tree`` runs libfdt's full check first)."""
    root = fdt.read_tree(blob)
    children = {c.name: c for c in root.children}
    regions = [(_u64(r.get("base")), _u64(r.get("size"))) for r in children["memory"].children]
    devices = [
        Device(_text(d.get("type")), d.get("mac") or b"") for d in children["devices"].children
    ]
    return VM(_text(root.get("vm-name")), _u32(root.get("vcpus")), regions, devices)


def say(what: str, **details: Any) -> None:
    print(json.dumps({"event": what, **details}), flush=True)


async def hand_over(p: Participant, vm: VM) -> int:
    await p.register()
    say("registered", name=p.name)
    status = await p.wait_for_begin()
    say("begin", handover=status.id)
    receipt = await p.submit(serialize(p, vm))
    say("submitted", size=receipt.size, sha256=receipt.sha256)

    # The VM keeps running while others serialize: its state changes, so the
    # fragment is made again. The new one replaces the old, until the freeze.
    vm.devices.append(Device("virtio-blk"))
    receipt = await p.submit(serialize(p, vm))
    say("resubmitted", size=receipt.size, sha256=receipt.sha256)

    try:
        await p.wait_for_freeze()
    except HandoverCancelled as exc:
        say("cancelled", reason=exc.reason)  # a real VMM resumes its VM here
        return EXIT_CANCELLED
    # A real VMM pauses its vCPUs and quiesces devices here; the state is final.
    await p.frozen()
    say("frozen", handover=p.handover_id)
    return 0


async def restore(p: Participant) -> int:
    blob = await p.retrieve()
    vm = deserialize(blob)
    say("restored", size=len(blob), vm=vm.to_json())
    # A real VMM recreates the VM from ``vm`` here, then lets khod release the payload.
    await p.finish()
    say("finished")
    return 0


async def run(args: argparse.Namespace) -> int:
    instance: int = args.instance
    async with Participant(
        args.name or f"vm-{instance}",
        compatible=COMPATIBLE,
        instance=instance,
        broker=args.broker,
        host_id=args.host_id,
        request_timeout=args.timeout,
        username=args.broker_username,
        password_file=args.broker_password_file,
        keepalive=args.keepalive,
    ) as p:
        if args.restore:
            return await restore(p)
        return await hand_over(p, make_vm(instance))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="An example VMM taking part in a khod live update.")
    ap.add_argument("--name", help="participant name (default: vm-<instance>)")
    ap.add_argument(
        "--broker",
        default=os.environ.get("KHOD_BROKER", "mqtt://127.0.0.1:1883"),
        help="broker URL, mqtt://host:port or unix:///path (default: $KHOD_BROKER or local)",
    )
    ap.add_argument(
        "--broker-username",
        default=os.environ.get("KHOD_BROKER_USERNAME"),
        help="broker user (default: $KHOD_BROKER_USERNAME; the shipped ACL wants the name)",
    )
    ap.add_argument(
        "--broker-password-file",
        default=os.environ.get("KHOD_BROKER_PASSWORD_FILE"),
        help="file holding the broker password (default: $KHOD_BROKER_PASSWORD_FILE)",
    )
    ap.add_argument(
        "--host-id",
        default=os.environ.get("KHOD_HOST_ID") or default_host_id(),
        help="host id in the topic tree (default: $KHOD_HOST_ID or the hostname)",
    )
    ap.add_argument("--instance", type=int, default=0, help="VM instance number")
    ap.add_argument("--restore", action="store_true", help="after a kexec: retrieve and finish")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    ap.add_argument(
        "--keepalive",
        type=int,
        default=10,
        help="MQTT keepalive, seconds: a hung VMM is declared gone after 1.5 times this",
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (KhodError, ValueError) as exc:
        print(f"vmm_participant: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
