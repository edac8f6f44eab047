"""dts-like text for a checked FDT, decoded in Python: no dtc needed at runtime.

Meant for people (``khod inspect --dts``) and close enough to ``dtc -O dts``
to be compared with it in the tests; reading and checking the blob is
:mod:`khod_wire.fdt`'s job.
"""

from __future__ import annotations

import struct

from khod_wire.fdt import Node, memreserve, read_tree

_PRINTABLE = frozenset(range(0x20, 0x7F))


def _show_name(name: str) -> str:
    return "".join(c if 0x20 < ord(c) < 0x7F else f"\\x{ord(c):02x}" for c in name)


def _dts_value(value: bytes) -> str:
    parts = value[:-1].split(b"\0")
    if value.endswith(b"\0") and all(p and all(b in _PRINTABLE for b in p) for p in parts):
        quoted = (p.decode("ascii").replace("\\", "\\\\").replace('"', '\\"') for p in parts)
        return ", ".join(f'"{q}"' for q in quoted)
    if len(value) % 4 == 0:
        cells = struct.unpack(f">{len(value) // 4}I", value)
        return "<" + " ".join(f"0x{c:02x}" for c in cells) + ">"
    return "[" + value.hex(" ") + "]"


def to_dts(data: bytes) -> str:
    """dts-like text for a checked blob, decoded in Python (no dtc needed at runtime)."""
    root = read_tree(data)
    lines = ["/dts-v1/;", ""]
    for addr, size in memreserve(data):
        lines.append(f"/memreserve/ 0x{addr:016x} 0x{size:016x};")
    if lines[-1]:
        lines.append("")
    # (node, depth, blank line before it); None closes the node at that depth.
    todo: list[tuple[Node | None, int, bool]] = [(root, 0, False)]
    while todo:
        node, depth, blank = todo.pop()
        tab = "\t" * depth
        if node is None:
            lines.append(f"{tab}}};")
            continue
        lines.extend([""] * blank + [f"{tab}{_show_name(node.name) or '/'} {{"])
        for name, value in node.properties:
            shown = f" = {_dts_value(value)}" if value else ""
            lines.append(f"{tab}\t{_show_name(name)}{shown};")
        todo.append((None, depth, False))
        todo.extend(
            (child, depth + 1, bool(node.properties) or i > 0)
            for i, child in reversed(list(enumerate(node.children)))
        )
    return "\n".join(lines) + "\n"
