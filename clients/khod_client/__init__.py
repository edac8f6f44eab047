"""khod_client: the SDK a component uses to take part in a khod live update.

A component (a VMM, a device manager, an iommufd owner...) is one
:class:`Participant`: it registers, waits for a handover to begin,
serializes its state into a small FDT fragment (:meth:`Participant.start_storage`)
and submits it as often as its state changes, freezes when told, and after
the kexec retrieves its fragment and finishes::

    async with Participant("vm-7", compatible="cloud-hypervisor,vm-v1", instance=7,
                           broker="unix:///run/mosquitto/khod.sock") as p:
        await p.register()
        await p.wait_for_begin()
        b = p.start_storage()
        b.property_u32("vcpus", 4)
        await p.submit(b.finish_storage())
        await p.wait_for_freeze()          # HandoverCancelled if the handover aborts
        await p.frozen()

``Participant.handover`` is the host's latest broadcast (a
:class:`HandoverSignal`: id, state, no per-participant lists);
``Participant.status`` its own state (:class:`ParticipantStatus`).

Only the wire contract (``khod_wire.protocol``), the transport, the FDT helpers
and the errors come from the daemon's package.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from khod_client._events import FragmentReceipt
from khod_client._participant import Participant
from khod_wire.errors import (
    BrokerRefused,
    HandoverCancelled,
    KhodError,
    NotAuthorized,
    PayloadError,
    ProtocolError,
    RemoteError,
    RequestTimeout,
)
from khod_wire.fragment import FragmentBuilder, start_storage
from khod_wire.identity import default_host_id
from khod_wire.protocol import HandoverSignal, HandoverStatus, ParticipantStatus

try:
    __version__ = version("khod")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BrokerRefused",
    "FragmentBuilder",
    "FragmentReceipt",
    "HandoverCancelled",
    "HandoverSignal",
    "HandoverStatus",
    "KhodError",
    "NotAuthorized",
    "Participant",
    "ParticipantStatus",
    "PayloadError",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "__version__",
    "default_host_id",
    "start_storage",
]
