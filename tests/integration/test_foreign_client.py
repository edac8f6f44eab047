"""A participant written from docs/protocol.md alone, with another MQTT API.

No khod module is used on the client side: plain paho-mqtt (its synchronous
client and network thread), JSON by hand, and a fragment compiled by ``dtc``
from source, as the protocol document's worked session does. If this test
breaks while the SDK tests pass, the SDK relies on something the documents
do not say.
"""

from __future__ import annotations

import hashlib
import json
import queue
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.daemonproc import DaemonFactory, DaemonProc

pytestmark = pytest.mark.integration

DTS = """/dts-v1/;
/ {
	compatible = "linux-kho,example,vm-v1";
	instance = <7>;
	vcpus = <4>;
	memory {
		base = /bits/ 64 <0x100000000>;
		size = /bits/ 64 <0x40000000>;
	};
};
"""


class ForeignClient:
    """One MQTT v5 connection, requests with Response Topic + Correlation Data."""

    def __init__(self, url: str, client_id: str, will_topic: str | None = None) -> None:
        self.replies: queue.Queue[tuple[bytes, bytes, str | None]] = queue.Queue()
        self.retained: dict[str, bytes] = {}
        self.reply_topic = ""
        assert url.startswith("unix://"), "the suite's broker listens on a Unix socket"
        self._path = url.removeprefix("unix://")
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            transport="unix",
        )
        if will_topic:
            self.c.will_set(will_topic, b"", qos=1, retain=False)
        self.c.on_message = self._on_message

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        if m.topic == self.reply_topic:
            props = m.properties
            self.replies.put(
                (
                    getattr(props, "CorrelationData", b""),
                    bytes(m.payload),
                    getattr(props, "ContentType", None),
                )
            )
        else:
            self.retained[m.topic] = bytes(m.payload)

    def connect(self, *topics: str) -> None:
        self.c.connect(self._path, 1883, keepalive=10)
        self.c.loop_start()
        for t in topics:
            self.c.subscribe(t, qos=1)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def request(self, topic: str, body: bytes, content_type: str) -> tuple[bytes, str | None]:
        corr = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        props.ContentType = content_type
        self.c.publish(topic, body, qos=1, properties=props).wait_for_publish(10)
        while True:
            got, payload, ctype = self.replies.get(timeout=15)
            if got == corr:
                return payload, ctype

    def wait_retained(self, topic: str, pred: Any, timeout: float = 15) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            body = self.retained.get(topic)
            if body:
                data = json.loads(body)
                if pred(data):
                    return data  # type: ignore[no-any-return]
            time.sleep(0.02)
        raise AssertionError(f"{topic}: condition not met; last {self.retained.get(topic)!r}")


def ok(payload: bytes) -> dict[str, Any]:
    reply = json.loads(payload)
    assert reply["ok"], reply
    return reply["data"]  # type: ignore[no-any-return]


def test_a_participant_from_the_docs_alone(
    daemon: DaemonProc, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    url, host = daemon.broker.url, daemon.host_id
    root = f"khod/v1/{host}"
    dts = tmp_path / "vm-7.dts"
    dts.write_text(DTS)
    subprocess.run(
        ["dtc", "-I", "dts", "-O", "dtb", "-o", str(tmp_path / "vm-7.dtb"), str(dts)], check=True
    )
    blob = (tmp_path / "vm-7.dtb").read_bytes()

    vm = ForeignClient(url, f"khod-{host}-p-vm-7", will_topic=f"{root}/p/vm-7/req/gone")
    vm.reply_topic = f"{root}/p/vm-7/reply"
    vm.connect(vm.reply_topic, f"{root}/handover", f"{root}/p/vm-7/state")
    op = ForeignClient(url, "alice")
    op.reply_topic = f"{root}/ctl/reply/alice"
    op.connect(op.reply_topic)
    try:
        data = ok(
            vm.request(
                f"{root}/p/vm-7/req/register",
                b'{"compatible": "example,vm-v1", "instance": 7}',
                "application/json",
            )[0]
        )
        assert data["participant"]["state"] == "registered"
        ok(op.request(f"{root}/ctl/req/begin", b'{"deadline": 600}', "application/json")[0])
        # Its own state names the handover; the broadcast says it is preparing.
        state = vm.wait_retained(f"{root}/p/vm-7/state", lambda s: s["handover_id"] is not None)
        hid = state["handover_id"]
        vm.wait_retained(f"{root}/handover", lambda h: h["state"] == "preparing" and h["id"] == hid)
        data = ok(vm.request(f"{root}/p/vm-7/req/fragment", blob, "application/x-dtb")[0])
        assert data["sha256"] == hashlib.sha256(blob).hexdigest()
        # No freeze_after: the broadcast alone is the freeze signal.
        vm.wait_retained(f"{root}/handover", lambda h: h["state"] == "freezing" and h["id"] == hid)
        ok(vm.request(f"{root}/p/vm-7/req/frozen", b"", "application/json")[0])
        vm.wait_retained(f"{root}/handover", lambda h: h["state"] == "committed")
    finally:
        vm.close()
        op.close()
    daemon.stop()

    # After the "kexec": the next boot's daemon, the same client, its fragment back.
    incoming = daemon_factory("incoming")
    incoming.start(restore=daemon.state_dir / "payload.kho")
    vm = ForeignClient(url, f"khod-{host}-p-vm-7", will_topic=f"{root}/p/vm-7/req/gone")
    vm.reply_topic = f"{root}/p/vm-7/reply"
    vm.connect(vm.reply_topic, f"{root}/handover", f"{root}/p/vm-7/state")
    try:
        vm.wait_retained(
            f"{root}/handover", lambda h: h["side"] == "incoming" and h["state"] == "restoring"
        )
        vm.wait_retained(f"{root}/p/vm-7/state", lambda s: s["state"] == "available")
        payload, ctype = vm.request(f"{root}/p/vm-7/req/retrieve", b"", "application/json")
        assert ctype == "application/x-dtb"
        assert payload == blob
        ok(vm.request(f"{root}/p/vm-7/req/finish", b"", "application/json")[0])
        vm.wait_retained(f"{root}/handover", lambda h: h["state"] == "released")
    finally:
        vm.close()
