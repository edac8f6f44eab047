"""Every error khod raises on purpose, one small family per failure domain.

Each class carries a stable ``code`` that travels on the bus in error
replies, so that a client in any language can branch on it without parsing
the message. Messages are written for the operator who reads a log line:
they name the thing, the value and what was expected.

Errors from third-party libraries (libfdt, sqlite3, aiomqtt) are translated
into these at the edge of the module that uses the library.
"""

from __future__ import annotations


class KhodError(Exception):
    """Base of every error khod raises on purpose."""

    code = "error"


# -- configuration -----------------------------------------------------------


class ConfigError(KhodError):
    """The daemon's configuration is invalid."""

    code = "bad-config"


# -- lifecycles --------------------------------------------------------------


class LifecycleError(KhodError):
    """A request does not fit the current lifecycle state."""

    code = "illegal-transition"


class IllegalTransition(LifecycleError):
    """An event the transition table does not allow in the current state."""

    def __init__(self, machine: str, state: str, event: str, detail: str = "") -> None:
        self.machine = machine
        self.state = state
        self.event = event
        msg = f"{machine}: event {event!r} is not allowed in state {state!r}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class OrderingError(LifecycleError):
    """The freeze/restore ordering is inconsistent (a cycle or an unknown name)."""

    code = "bad-ordering"


class RegistrationError(LifecycleError):
    """A registration is refused: bad or duplicate name, bad fields."""

    code = "bad-registration"


class UnknownParticipant(LifecycleError):
    """A request names a participant khod does not know."""

    code = "unknown-participant"


class NotReady(LifecycleError):
    """Freezing was asked for while expected participants are not serialized."""

    code = "not-ready"


class NothingToHandOver(LifecycleError):
    """A handover would have no participant."""

    code = "no-participants"


class Busy(LifecycleError):
    """The request would change something that is already final (like -EBUSY in KHO)."""

    code = "busy"


# -- fragments and payload ---------------------------------------------------


class FragmentError(KhodError):
    """A fragment is refused."""

    code = "bad-fragment"


class FragmentTooLarge(FragmentError):
    """A fragment is larger than ``max_fragment_size``."""

    code = "fragment-too-large"


class FragmentMismatch(FragmentError):
    """A fragment's root compatible or instance does not match its registration."""

    code = "fragment-mismatch"


class PayloadError(KhodError):
    """A payload image is corrupt, truncated or inconsistent."""

    code = "bad-payload"


# -- durable state -----------------------------------------------------------


class StoreError(KhodError):
    """The durable store cannot be read or written."""

    code = "store"


# -- wire --------------------------------------------------------------------


class ProtocolError(KhodError):
    """A message on the bus is malformed or of an unsupported version."""

    code = "bad-request"


class RequestTimeout(KhodError):
    """No reply arrived for a request in time."""

    code = "timeout"


class BrokerRefused(KhodError):
    """The broker refused a connection, a publish or a subscription (a reason code >= 0x80).

    Not retried into a timeout: a refusal is reported at once, as such.
    """

    code = "broker-refused"

    def __init__(self, message: str, reason_code: int) -> None:
        self.reason_code = reason_code
        super().__init__(message)


class NotAuthorized(BrokerRefused):
    """The broker refused a login (0x86 bad user name or password) or an ACL refused (0x87)."""

    code = "not-authorized"


class RemoteError(KhodError):
    """The daemon answered a request with an error; ``code`` is the daemon's."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


# -- committing the payload ------------------------------------------------------


class CommitError(KhodError):
    """The payload could not be committed; the handover aborts."""

    code = "commit-failed"


class WithdrawError(KhodError):
    """A committed payload could not be withdrawn; it stays committed."""

    code = "withdraw-failed"


# -- participants (client side) ------------------------------------------------


class HandoverCancelled(KhodError):
    """The handover this participant takes part in was cancelled; it must resume running.

    Raised by the SDK from the daemon's signals (abort, withdraw, left out);
    never sent in a reply.
    """

    code = "cancelled"

    def __init__(self, reason: str, handover_id: str | None = None) -> None:
        self.reason = reason
        self.handover_id = handover_id
        super().__init__(f"handover {handover_id} cancelled: {reason}")
