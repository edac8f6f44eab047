"""``khod inspect IMAGE [--json] [--dts]``: verify a payload image and show it.

Meant for a rescue shell as much as for scripts: it needs no broker and no
dtc. Exit status: 0 the image is valid, 1 it is not (the reason goes to
stderr, and with ``--json`` also to stdout as ``{"valid": false, ...}``),
2 the file cannot be read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from khod.payload import PayloadImage
from khod_wire.dts import to_dts
from khod_wire.errors import PayloadError


def _human(path: Path, image: PayloadImage, manifest: dict[str, Any], dts: bool) -> None:
    # Text objects, not markup strings: names and ids must never be read as rich markup.
    console = Console(highlight=False, soft_wrap=True)
    count = len(image.entries)
    tree = Tree(
        Text.assemble(
            ("handover ", "bold"),
            (image.handover_id, "bold cyan"),
            f"  {count} participant{'s' * (count != 1)}, {image.size} bytes,"
            f" sha256 {manifest['sha256'][:16]}",
        )
    )
    for ref in image.entries:
        tree.add(
            Text.assemble(
                (ref.name, "bold"),
                f"  {ref.compatible}  instance {ref.instance!r}",
                f"  @0x{ref.offset:x}  {ref.size} B  sha256 {ref.sha256_hex[:12]}",
            )
        )
    console.print(Text(f"{path}: valid payload image", style="green"))
    console.print(tree)
    if dts:
        for ref in image.entries:
            console.rule(Text(f"{ref.name} @0x{ref.offset:x}"))
            console.print(Text(to_dts(image.fragment(ref))), end="")


def main(image: Path, *, as_json: bool = False, dts: bool = False, base: int = 0) -> int:
    """Verify and show ``image``; return the exit status."""
    try:
        data = Path(image).read_bytes()
    except OSError as e:
        print(f"khod inspect: cannot read {image}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        payload = PayloadImage.parse(data, base=base)
    except PayloadError as e:
        print(f"invalid payload image: {e}", file=sys.stderr)
        if as_json:
            print(json.dumps({"valid": False, "image": str(image), "error": str(e)}, indent=2))
        return 1
    manifest = payload.manifest()
    if as_json:
        if dts:
            for entry, ref in zip(manifest["participants"], payload.entries, strict=True):
                entry["dts"] = to_dts(payload.fragment(ref))
        print(json.dumps({"valid": True, "image": str(image), **manifest}, indent=2))
    else:
        _human(Path(image), payload, manifest, dts)
    return 0
