"""The asyncua client of the ``opcua`` source: a reconnect that costs a blip, and says why.

asyncua 2.1 reconnects by itself, but its backoff starts at 1 s and doubles, and every
attempt may hang for the full request timeout when the link is down behind a router (the
TCP connect to the far side of a relay succeeds, nothing answers): measured behind a relay
that cut the link for 4 s, the source came back only 7–23 s after the link did. And it
logs the reason of a failed attempt only as a warning that the source filters out.

``GatewayClient`` replaces only the reconnect loop (``_reconnect_with_backoff``):

- attempts follow ``reconnect_delays``: 0.1 s, doubling, at most 1 s apart during the
  first minute of an outage (a blip costs a blip), then up to ``reconnect_max_s``;
  with jitter (half to full delay) so a fleet does not reconnect in lock step after a
  switch reboot;
- each attempt (socket, hello, secure channel, session) is bounded by ``attempt_timeout_s``
  — a link that is down is tried again soon instead of waited for;
- every failed attempt is handed to ``on_attempt_failed(exc)`` (the source logs the reason
  once per change and shows it in ``/status``).

Everything else (session re-activation, subscription transfer or re-creation) is asyncua's
own code. The parts of asyncua this relies on are checked by ``check_internals`` at start
and by a test, and asyncua is pinned exactly in ``pyproject.toml``.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncua
from asyncua import Client, ua
from asyncua.client import client as _client_module
from asyncua.client.ua_session import UaSession
from asyncua.common.subscription import Subscription
from asyncua.ua.uaerrors import (
    BadCertificateInvalid,
    BadCertificateUntrusted,
    BadMessageNotAvailable,
    BadSecurityChecksFailed,
    BadSecurityPolicyRejected,
)

from edge.plugin import FatalStartupError

__all__ = ["ASYNCUA_VERSION", "GatewayClient", "bound_republish", "check_internals",
           "describe_failure", "reconnect_delays"]

ASYNCUA_VERSION = "2.1.0"

# The asyncua functions whose behaviour this module was written against (source digests):
# ``_reconnect_with_backoff`` is replaced (its body is mirrored below), the others are
# called from the replacement or relied on by the alarms (``alarms.py``). A different
# digest means asyncua changed under us.
_INTERNALS: dict[str, str] = {
    "Client._reconnect_with_backoff": "05d6af6a5dcb17fb",
    "Client._teardown_transport_only": "abd8f733ed5beb54",
    "Client._try_reactivate_existing_session": "8ff8edbd080c4825",
    "Client._finalize_reconnect": "3ec803e14360fd67",
    "Client._refresh_endpoints_quiet": "83be0104f620eed8",
    "Subscription._deliver": "1a45bd5c40c7f710",
    "Subscription.restore": "5de70c7ed4897873",
    "Subscription._republish_gaps": "28db7477c7fd88af",
    # alarms: an event's select clauses are the filter's own list (it names the entry),
    # and a re-created subscription keeps each item's filter object
    "Subscription._explode_events": "b38a7126e49baa51",
    "Subscription.recreate": "60794938ee0adc22",
}


def reconnect_delays(max_delay_s: float, *, first_s: float = 0.1, blip_s: float = 60.0,
                     blip_cap_s: float = 1.0, rng: random.Random | None = None,
                     clock: Callable[[], float] = time.monotonic) -> Iterator[float]:
    """Pauses between reconnect attempts.

    ``first_s`` doubling, each drawn between half and all of its step (jitter). During the
    first ``blip_s`` of an outage a step never exceeds ``blip_cap_s``, so a link that comes
    back is found within about a second; after that steps double up to ``max_delay_s``."""
    rand = rng or random.Random()
    started = clock()
    step = min(first_s, max_delay_s)
    while True:
        cap = min(blip_cap_s, max_delay_s) if clock() - started < blip_s else max_delay_s
        step = min(step, cap)
        yield step * (0.5 + 0.5 * rand.random())
        step = min(step * 2, max_delay_s)


_LOGIN = {"BadUserAccessDenied", "BadIdentityTokenRejected", "BadIdentityTokenInvalid"}
_CERT_TIME = {"BadCertificateTimeInvalid", "BadCertificateIssuerTimeInvalid"}
_SECURITY = {"BadCertificateInvalid", "BadCertificateUntrusted", "BadSecurityChecksFailed",
             "BadSecurityPolicyRejected", "BadCertificateUriInvalid",
             "BadCertificateRevoked", "BadCertificateIssuerRevoked",
             "BadCertificateRevocationUnknown", "BadCertificateUseNotAllowed"}


def describe_failure(exc: BaseException, cfg: Any) -> tuple[str, str]:
    """Why a (re)connect attempt failed, for an operator: ``(reason, severity)``.

    ``critical`` where waiting will not help (a refused login, a certificate problem, no
    free session on the server), ``warning`` for a link or server that is down."""
    name = type(exc).__name__
    if name in _LOGIN:
        return (f"the server refused the login of {cfg.username or 'anonymous'} ({name}): "
                "check the user on the server and password_file"), "critical"
    if name in _CERT_TIME:
        return (f"a certificate is outside its validity period ({name}): check both "
                "machines' clocks and renew the expired certificate"), "critical"
    if name == "BadTooManySessions":
        return (f"the server has no free session ({name}): close unused clients or raise "
                "the server's session limit"), "critical"
    if name in _SECURITY or name == "InvalidSignature":
        return (f"the secure channel was refused ({name}): if the station's certificate "
                "was renewed, check its thumbprint with its owner and update "
                "security.server_cert_file or trust_dir"), "critical"
    if isinstance(exc, TimeoutError):
        waited = min(cfg.connect_timeout_s, cfg.timeout_s)  # the attempt's bound
        return (f"no answer within {waited:g} s (link down, or the server "
                "is hung)"), "warning"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (the server is down or not listening)", "warning"
    if isinstance(exc, (ConnectionError, OSError)):
        return f"connection failed ({name}: {exc})", "warning"
    if name.startswith("Bad"):
        return f"the server answered {name}", "warning"
    return f"{name}: {exc}", "warning"


def _digest(obj: Any) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def internals_digests() -> dict[str, str]:
    """The current digests of the asyncua functions in ``_INTERNALS``."""
    owners = {"Client": Client, "Subscription": Subscription}
    out = {}
    for name in _INTERNALS:
        owner, _, attr = name.partition(".")
        fn = getattr(owners[owner], attr, None)
        out[name] = _digest(fn) if fn is not None else "missing"
    return out


def check_internals() -> None:
    """Raise ``FatalStartupError`` if asyncua is not the version this source was written
    against or a private part it uses is gone (the subscription's event queue, the
    reconnect pieces, the supervisor's request flag)."""
    problems = []
    installed = getattr(asyncua, "__version__", "unknown")
    if installed != ASYNCUA_VERSION:
        problems.append(f"asyncua {installed} is installed, {ASYNCUA_VERSION} expected")
    if not hasattr(_client_module, "_supervisor_owns_requests"):
        problems.append("asyncua.client.client._supervisor_owns_requests is gone")
    for name, digest in internals_digests().items():
        if digest != _INTERNALS[name]:
            problems.append(f"asyncua {name} is {'gone' if digest == 'missing' else 'changed'}")
    if problems:
        raise FatalStartupError(
            "the opcua source needs asyncua " + ASYNCUA_VERSION + " (install the gateway "
            "with its pinned dependencies): " + "; ".join(problems))


class GatewayClient(Client):
    """``asyncua.Client`` with a short, jittered, bounded reconnect (see module doc)."""

    def __init__(self, *args: Any, attempt_timeout_s: float,
                 on_attempt_failed: Callable[[BaseException], None] | None = None,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.attempt_timeout_s = attempt_timeout_s
        self.on_attempt_failed = on_attempt_failed or (lambda exc: None)

    async def _reconnect_with_backoff(self) -> bool:
        """asyncua's loop (same steps, same security-error handling), with our delays and
        a bound per attempt. Returns True once reconnected, False when disconnecting."""
        token = _client_module._supervisor_owns_requests.set(True)
        try:
            delays = reconnect_delays(self._reconnect_max_delay)
            while not self.uaclient.is_disconnect_requested:
                await self._teardown_transport_only()
                try:
                    async with asyncio.timeout(self.attempt_timeout_s):
                        reused = await self._try_reactivate_existing_session()
                except (BadCertificateInvalid, BadCertificateUntrusted, BadSecurityChecksFailed,
                        BadSecurityPolicyRejected) as exc:
                    self.on_attempt_failed(exc)
                    await self._refresh_endpoints_quiet()
                except Exception as exc:  # noqa: BLE001 - any failure: try again soon
                    if isinstance(exc, TimeoutError):
                        self.disconnect_socket()  # the attempt was cut off mid-handshake
                    self.on_attempt_failed(exc)
                else:
                    await self._finalize_reconnect(reused)
                    return True
                self.uaclient.enter_reconnecting()
                await asyncio.sleep(next(delays))
            return False
        finally:
            _client_module._supervisor_owns_requests.reset(token)


def bound_republish(sub: Subscription) -> None:
    """Replace ``sub._republish_gaps`` (after a subscription transfer) by a bounded one.

    asyncua asks for sequence numbers one after the other until the server answers
    BadMessageNotAvailable. asyncua's own server answers an unknown number with an EMPTY
    message instead, so that loop never ends: the reconnect never finishes and the health
    probe never runs again (a second outage went unnoticed for as long as we watched).
    Here only the numbers the server listed as available are asked for, each once; an
    empty answer counts as not available. If not everything could be replayed, asyncua
    re-creates the subscription, which the source treats as a gap (backfill)."""

    async def republish_gaps(available: list[int]) -> bool:
        if not isinstance(sub.server, UaSession) or sub.subscription_id is None:
            return True
        start = sub.last_sequence_number or 0
        wanted = sorted(n for n in set(available) if n > start)
        sub._replaying = True
        try:
            for seq in wanted:
                try:
                    msg = await sub.server.republish(sub.subscription_id, seq)
                except BadMessageNotAvailable:
                    continue
                except Exception:  # noqa: BLE001 - as asyncua: give up, re-create
                    return False
                if not msg.NotificationData:
                    continue
                await sub.publish_callback(
                    ua.PublishResult(sub.subscription_id, NotificationMessage=msg))
        finally:
            sub._replaying = False
        return not wanted or (sub.last_sequence_number or 0) >= wanted[-1]

    sub._republish_gaps = republish_gaps  # type: ignore[method-assign]
