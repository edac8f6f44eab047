"""The import rules of the layers (issue 7), read from the source with ast.

- aiomqtt is imported by exactly one module, ``khod_wire._mqtt``, and paho
  by it and ``khod_wire._paho`` (the client layer): everything else sees
  khod's own Message, Will and Reason;
- ``khod_wire`` imports neither the daemon (``khod``) nor the SDK
  (``khod_client``), and the SDK does not import the daemon.

Every import counts: at module level, inside a function, under
``TYPE_CHECKING``, relative, or ``importlib.import_module("...")`` with a
literal name. A grep would miss ``from . import x`` and find commented-out
lines; the tests at the end check that the rules do fail on sources that
break them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MQTT_MODULE = "khod_wire._mqtt"
#: library -> the modules that may import it (the client layer)
CLIENT_LAYER = {"aiomqtt": (MQTT_MODULE,), "paho": (MQTT_MODULE, "khod_wire._paho")}
#: package -> top-level packages it must not import.
FORBIDDEN = {
    "khod_wire": frozenset({"khod", "khod_client"}),
    "khod_client": frozenset({"khod"}),
}


def module_name(path: Path) -> str:
    """``khod/daemon.py`` -> ``khod.daemon``; ``clients/khod_wire/x.py`` -> ``khod_wire.x``."""
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "clients":  # clients/ is on the path: its packages are top-level
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> dict[str, str]:
    """Every module of khod/ and clients/, by its dotted name."""
    files = [*ROOT.joinpath("khod").rglob("*.py"), *ROOT.joinpath("clients").rglob("*.py")]
    return {module_name(p): p.read_text(encoding="utf-8") for p in sorted(files)}


def imports(module: str, source: str, *, is_package: bool = False) -> Iterator[str]:
    """The absolute names of every module ``source`` imports."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
                if node.module is None:  # from . import a, b: each may be a module
                    yield from (f"{base}.{alias.name}" for alias in node.names)
                    continue
                yield target
            else:
                assert node.module is not None
                yield node.module
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (
                    isinstance(node.func, ast.Name)
                    and node.func.id in ("import_module", "__import__")
                )
            )
        ):
            yield node.args[0].value


def violations(modules: Mapping[str, str], packages: frozenset[str] = frozenset()) -> list[str]:
    """What breaks the rules among ``modules`` (name -> source); [] when nothing does.

    ``packages``: the names in ``modules`` that are packages (``__init__``);
    by default any name that is a prefix of another one.
    """
    packages = packages or frozenset(
        m for m in modules if any(o.startswith(m + ".") for o in modules)
    )
    found: list[str] = []
    users: dict[str, list[str]] = {lib: [] for lib in CLIENT_LAYER}
    for module, source in modules.items():
        top = module.split(".")[0]
        names = set(imports(module, source, is_package=module in packages))
        for lib, who in users.items():
            if any(n.split(".")[0] == lib for n in names):
                who.append(module)
        for name in sorted(names):
            if name.split(".")[0] in FORBIDDEN.get(top, ()):
                found.append(f"{module} imports {name}")
    for lib, allowed in CLIENT_LAYER.items():
        # aiomqtt must be found where it belongs, or the walk proves nothing.
        stray = [m for m in users[lib] if m not in allowed]
        if stray or (lib == "aiomqtt" and users[lib] != list(allowed)):
            found.append(f"aiomqtt/paho imported by {users[lib]}, expected {list(allowed)} ({lib})")
    return found


def test_the_tree_keeps_the_rules() -> None:
    modules = sources()
    # The walk sees the packages it judges (a path mistake would make it vacuous).
    assert {MQTT_MODULE, "khod_wire.transport", "khod.service", "khod_client"} <= set(modules)
    assert violations(modules) == []


GOOD = {
    "khod_wire": '"""wire"""',
    "khod_wire._mqtt": "import aiomqtt\nfrom paho.mqtt.properties import Properties",
    "khod_wire._paho": "import paho.mqtt.client as mqtt",
    "khod_wire.transport": "from khod_wire import _mqtt\nfrom . import message",
    "khod_client": "from khod_wire.transport import Connection",
    "khod.service": "import khod_client\nfrom khod_wire import transport",
}


def test_the_rules_pass_a_layered_tree() -> None:
    assert violations(GOOD) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("khod.service", "import aiomqtt", "aiomqtt/paho imported by"),
        ("khod.service", "from paho.mqtt import client", "aiomqtt/paho imported by"),
        (
            "khod_client",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import aiomqtt.types",
            "aiomqtt/paho imported by",
        ),
        ("khod_wire._mqtt", "import socket", "aiomqtt/paho imported by []"),
        ("khod_wire._paho", "import aiomqtt", "aiomqtt/paho imported by"),
        ("khod_wire._packets", "from paho.mqtt import client", "aiomqtt/paho imported by"),
        ("khod_wire.transport", "def f():\n    from khod.daemon import Daemon", "imports khod."),
        ("khod_wire.transport", "from khod_client import Participant", "imports khod_client"),
        (
            "khod_wire.transport",
            "import importlib\nimportlib.import_module('khod')",
            "imports khod",
        ),
        ("khod_client", "from khod import daemon", "khod_client imports khod"),
        ("khod_client._participant", "import khod.daemon as d", "imports khod.daemon"),
    ],
)
def test_the_rules_fail_a_tree_that_breaks_them(module: str, source: str, expected: str) -> None:
    broken = {**GOOD, module: source}
    found = violations(broken)
    assert found, f"{module}: {source!r} passed"
    assert any(expected in f for f in found), found


def test_relative_imports_resolve_against_the_package() -> None:
    assert set(imports("khod_wire.transport", "from . import _mqtt\nfrom .urls import X")) == {
        "khod_wire._mqtt",
        "khod_wire.urls",
    }
    assert set(imports("khod_wire", "from . import _mqtt", is_package=True)) == {"khod_wire._mqtt"}


def cycle(modules: Mapping[str, str]) -> list[str]:
    """One chain of modules that imports its own start back, or [] when there is none.

    ``from khod import x`` names the module ``khod.x`` when there is one.
    """
    packages = {m for m in modules if any(o.startswith(m + ".") for o in modules)}
    graph: dict[str, set[str]] = {}
    for module, source in modules.items():
        names = imports(module, source, is_package=module in packages)
        graph[module] = {n for n in names if n in modules and n != module}
    # from pkg import mod: ImportFrom gives "pkg"; the names it takes may be modules.
    for module, source in modules.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in modules and sub != module:
                        graph[module].add(sub)
                        graph[module].discard(node.module)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_no_module_imports_itself_back() -> None:
    # The request path goes one way: no module is reached again by what it imports.
    assert cycle(sources()) == []


def test_a_cycle_is_found() -> None:
    tree = {
        "khod.router": "from khod import ops",
        "khod.ops": "from khod.commit import Committer",
        "khod.commit": "import khod.router",
        "khod.store": "",
    }
    assert cycle(tree) == ["khod.commit", "khod.router", "khod.ops", "khod.commit"]
    assert cycle({**tree, "khod.commit": "from khod import store"}) == []
