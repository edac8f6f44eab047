"""khod_wire.identity: what a participant's name, compatible and instance may look like.

The rules are restated here character by character (not with the module's
regular expressions): a name is an MQTT topic level and an FDT node name.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from khod_wire.errors import LifecycleError, RegistrationError
from khod_wire.identity import (
    MAX_INSTANCE_INT,
    check_compatible,
    check_host,
    check_instance,
    check_name,
)

ALNUM = set(string.ascii_letters + string.digits)
NAME_CHARS = ALNUM | set("._-")
COMPATIBLE_CHARS = ALNUM | set(",._+-")
PRINTABLE_NO_SPACE = {chr(c) for c in range(0x21, 0x7F)}


def name_ok(v: object) -> bool:
    return (
        isinstance(v, str)
        and 1 <= len(v) <= 63
        and v[0] in ALNUM
        and all(c in NAME_CHARS for c in v)
    )


def compatible_ok(v: object) -> bool:
    return (
        isinstance(v, str)
        and 1 <= len(v) <= 128
        and v[0] in ALNUM
        and all(c in COMPATIBLE_CHARS for c in v)
        # khod adds the prefix in the fragment: a compatible that has it is a mistake.
        and not v.startswith("linux-kho,")
    )


def instance_ok(v: object) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return 0 <= v <= 2**32 - 1
    return isinstance(v, str) and 1 <= len(v) <= 64 and all(c in PRINTABLE_NO_SPACE for c in v)


CHECKS: list[tuple[Callable[[object], object], Callable[[object], bool]]] = [
    (check_name, name_ok),
    (check_host, name_ok),  # a host id is a topic level too: same rule
    (check_compatible, compatible_ok),
    (check_instance, instance_ok),
]
CHECK_IDS = ["name", "host", "compatible", "instance"]

ANY_OBJECT = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=sorted(COMPATIBLE_CHARS | {"/", "#", " ", "\n", "\x00"}), max_size=140),
    st.binary(max_size=10),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=3), max_size=3),
    st.tuples(st.integers()),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.builds(object),
)


# -- names -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "vm0", "0vm", "cloud-hypervisor.vm_1", "A" * 63, "x-y.z_0"],
)
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a/b",
        "/",
        "a+b",
        "+",
        "a#b",
        "#",
        "a\x00b",
        "a b",
        " a",
        "a ",
        "a\tb",
        "A" * 64,
        "-a",
        ".a",
        "_a",
        "a,b",  # legal in a compatible, not in a name
        "a@1",
        "vm\u00e9",
        "ﬁ",
    ],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(RegistrationError) as info:
        check_name(name)
    assert repr(name) in str(info.value)
    assert info.value.code == "bad-registration"
    assert isinstance(info.value, LifecycleError)


@pytest.mark.parametrize("name", [None, 1, b"vm", ["vm"], True])
def test_non_string_names(name: object) -> None:
    with pytest.raises(RegistrationError):
        check_name(name)


# -- compatible ----------------------------------------------------------------


@pytest.mark.parametrize("compatible", ["cloud-hypervisor,vm-v1", "a", "x+y,z.1_2", "c" * 128])
def test_good_compatibles(compatible: str) -> None:
    assert check_compatible(compatible) == compatible


@pytest.mark.parametrize(
    "compatible", ["", ",a", "a b", "a/b", "a#b", "a\x00", "c" * 129, "\u00e9", 42, None]
)
def test_bad_compatibles(compatible: object) -> None:
    with pytest.raises(RegistrationError, match="invalid compatible"):
        check_compatible(compatible)


# -- instance ------------------------------------------------------------------


@pytest.mark.parametrize("instance", [0, 1, MAX_INSTANCE_INT, "0", "eth0:1", "~" * 64, "!"])
def test_good_instances(instance: object) -> None:
    got = check_instance(instance)
    assert got == instance
    assert type(got) is type(instance)


def test_max_instance_is_u32() -> None:
    assert MAX_INSTANCE_INT == 2**32 - 1


@pytest.mark.parametrize(
    "instance",
    [
        True,
        False,
        -1,
        MAX_INSTANCE_INT + 1,
        2**64,
        1.0,
        0.5,
        "",
        "a b",
        "\x7f",
        "é",
        "x" * 65,
        None,
        b"x",
        [1],
    ],
)
def test_bad_instances(instance: object) -> None:
    with pytest.raises(RegistrationError, match="invalid instance"):
        check_instance(instance)


def test_bools_are_refused_as_instances_even_though_they_are_ints() -> None:
    for b in (True, False):
        with pytest.raises(RegistrationError):
            check_instance(b)


# -- host ------------------------------------------------------------------------


def test_host() -> None:
    assert check_host("hv-0042.dc1") == "hv-0042.dc1"
    for bad in ("", "a/b", "+", "#", "a b", "h" * 64):
        with pytest.raises(RegistrationError, match="invalid host id"):
            check_host(bad)


# -- properties ------------------------------------------------------------------


@pytest.mark.parametrize(("check", "ok"), CHECKS, ids=CHECK_IDS)
@settings(max_examples=300, deadline=None)
@given(value=ANY_OBJECT)
def test_check_returns_the_value_or_raises_registration_error(
    check: Callable[[object], object], ok: Callable[[object], bool], value: object
) -> None:
    try:
        got = check(value)
    except RegistrationError:
        accepted = False
    else:
        accepted = True
        assert got is value
    assert accepted == ok(value), f"{check.__name__}({value!r})"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=sorted(NAME_CHARS), min_size=1, max_size=63))
def test_accepted_names_are_topic_and_node_safe(name: str) -> None:
    try:
        check_name(name)
    except RegistrationError:
        assert name[0] not in ALNUM
        return
    assert not set(name) & set("/+#\x00 ")
    assert 1 <= len(name) <= 63


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (check_name, "vm0\n"),
        (check_compatible, "cloud-hypervisor,vm-v1\n"),
        (check_instance, "eth0\n"),
        (check_host, "hv1\n"),
    ],
    ids=["name", "compatible", "instance", "host"],
)
def test_trailing_newline_is_refused(check: Callable[[object], object], value: str) -> None:
    # Regression: the patterns end in '$', which also matches before a final
    # newline; the checks must match the whole string.
    with pytest.raises(RegistrationError):
        check(value)
