"""Failed-authentication limits: a client that keeps presenting wrong secrets is locked out.

Both services check secrets a caller presents (API tokens, the web UIs'
sign-in, enrollment tokens, node-signed request tokens). ``FailureLimiter``
counts the failures of each *key* (a service builds it from what is checked
and the client's address, ``client_address``):

* ``max_failures`` failures within ``window_s`` seconds lock the key out for
  ``lockout_s``; each further lockout of the same key doubles that, up to
  ``max_lockout_s`` (set both equal for fixed lockouts). A key that stays out of
  trouble for ``max_lockout_s`` after its last lockout starts again at
  ``lockout_s``.
* While a key is locked out every attempt is refused before any secret is
  checked, a correct one too: otherwise guessing fast would go on regardless.
* An attempt is reserved when it begins (``attempt``): once a key has failed,
  its failures plus its attempts still in flight never exceed ``max_failures``,
  so parallel guesses gain at most the one burst sent before the first failure
  was counted. A key that never failed is not held up however busy it is.
* A success forgets nothing: failures age out of the window. (Otherwise one
  valid token, a researcher's say, would buy unlimited guesses at others.)
  Keys are independent: one client's success or failure never touches another's.
* Memory is bounded: at most ``max_clients`` keys are tracked, least recently
  used first out, keys that are locked out last. A key with nothing to remember
  is dropped at once, so callers that succeed cost no memory.

The limiter knows nothing of HTTP: ``attempt`` raises ``LockedOutError`` with
the seconds to wait, and ``Attempt.failed`` returns the ``Lockout`` its failure
started, once, for the service to audit and count. The clock is injectable.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

#: Address networks: one IPv6 client commonly holds a whole /64.
IPV6_CLIENT_PREFIX = 64
#: How many least-recently-used keys ``_evict`` looks through for one not locked out.
_EVICTION_SCAN = 64


@dataclass(frozen=True)
class LockoutPolicy:
    """When a key is locked out and for how long (seconds)."""

    max_failures: int = 10
    window_s: float = 300.0
    lockout_s: float = 900.0
    max_lockout_s: float = 14400.0
    max_clients: int = 10_000

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError('Argument "max_failures" must be at least 1.')
        if self.window_s <= 0 or self.lockout_s <= 0:
            raise ValueError('Arguments "window_s" and "lockout_s" must be positive.')
        if self.max_lockout_s < self.lockout_s:
            raise ValueError('Argument "max_lockout_s" must be at least "lockout_s".')
        if self.max_clients < 1:
            raise ValueError('Argument "max_clients" must be at least 1.')


@dataclass(frozen=True)
class Lockout:
    """A lockout a failure started: ``key`` is refused for ``seconds`` (its ``strike``-th)."""

    key: str
    seconds: float
    failures: int
    strike: int


class LockedOutError(Exception):
    """The key is locked out (or has as many attempts in flight as it may still fail)."""

    def __init__(self, key: str, retry_after_s: float) -> None:
        super().__init__(f"{key} is locked out for {retry_after_s:.0f} s")
        self.key = key
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> int:
        """Whole seconds for a ``Retry-After`` header (at least 1)."""
        return max(1, math.ceil(self.retry_after_s))


@dataclass
class _State:
    failures: deque[float] = field(default_factory=deque)
    pending: int = 0
    locked_until: float = 0.0
    strikes: int = 0

    def idle(self) -> bool:
        return not self.failures and not self.pending and not self.strikes


class Attempt:
    """One reserved attempt: call ``failed`` or ``succeeded`` (else it is released unjudged)."""

    def __init__(self, limiter: FailureLimiter, key: str, state: _State) -> None:
        self._limiter = limiter
        self.key = key
        self._state = state
        self._open = True

    def failed(self) -> Lockout | None:
        """Count a wrong secret; the lockout it started, if it started one."""
        if not self._open:
            return None
        self._open = False
        return self._limiter._failed(self.key, self._state)

    def succeeded(self) -> None:
        """The secret was right (nothing is forgotten: see the module docstring)."""
        self.release()

    def release(self) -> None:
        if self._open:
            self._open = False
            self._limiter._release(self.key, self._state)

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class FailureLimiter:
    """Counts failed authentications per key and locks keys out (thread-safe, bounded)."""

    def __init__(
        self, policy: LockoutPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or LockoutPolicy()
        self._clock = clock
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def attempt(self, key: str) -> Attempt:
        """Reserve an attempt for ``key``, or raise ``LockedOutError`` with the wait."""
        policy = self.policy
        with self._lock:
            now = self._clock()
            state = self._states.get(key)
            if state is None:
                self._evict(now)
                state = self._states[key] = _State()
            else:
                self._states.move_to_end(key)
            if state.locked_until > now:
                raise LockedOutError(key, state.locked_until - now)
            self._expire(state, now)
            if state.failures and len(state.failures) + state.pending >= policy.max_failures:
                # A client that failed already has as many attempts in flight as it may
                # still fail: it waits for them (a client that never failed is not held up).
                raise LockedOutError(key, 1.0)
            state.pending += 1
            return Attempt(self, key, state)

    def locked_for(self, key: str) -> float:
        """Seconds ``key`` stays locked out (0 when it is not)."""
        with self._lock:
            state = self._states.get(key)
            return 0.0 if state is None else max(0.0, state.locked_until - self._clock())

    def _failed(self, key: str, state: _State) -> Lockout | None:
        policy = self.policy
        with self._lock:
            now = self._clock()
            state.pending = max(0, state.pending - 1)
            if self._states.get(key) is not state:  # evicted meanwhile: track it again
                self._evict(now)
                self._states[key] = state
            self._expire(state, now)
            state.failures.append(now)
            if len(state.failures) < policy.max_failures or state.locked_until > now:
                return None  # not yet; or an attempt begun before the lockout it is in
            state.strikes += 1
            seconds = min(policy.lockout_s * 2 ** (state.strikes - 1), policy.max_lockout_s)
            state.locked_until = now + seconds
            failures = len(state.failures)
            state.failures.clear()
            return Lockout(key, seconds, failures, state.strikes)

    def _release(self, key: str, state: _State) -> None:
        with self._lock:
            state.pending = max(0, state.pending - 1)
            now = self._clock()
            self._expire(state, now)
            if state.idle() and self._states.get(key) is state:
                del self._states[key]

    def _expire(self, state: _State, now: float) -> None:
        horizon = now - self.policy.window_s
        while state.failures and state.failures[0] <= horizon:
            state.failures.popleft()
        if state.strikes and state.locked_until <= now - self.policy.max_lockout_s:
            state.strikes = 0  # long enough out of trouble: the next lockout is a first again

    def _evict(self, now: float) -> None:
        """Make room for one more key (with the lock held)."""
        if len(self._states) < self.policy.max_clients:
            return
        victim = None
        for i, (key, state) in enumerate(self._states.items()):
            if i >= _EVICTION_SCAN:
                break
            if state.locked_until <= now and not state.pending:
                victim = key
                break
        if victim is None:
            victim = next(iter(self._states))
        del self._states[victim]


def parse_networks(entries: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Addresses or networks (``10.0.0.5``, ``10.0.0.0/8``, ``::1``); a bad one names itself."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{entry!r} is not an IP address or network") from exc
    return networks


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> bool:
    return any(address.version == net.version and address in net for net in proxies)


def client_address(
    peer: str | None,
    forwarded_for: Iterable[str] = (),
    trusted_proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> str:
    """The address a request counts against: the socket peer, unless a trusted proxy says.

    ``X-Forwarded-For`` (``forwarded_for``: the header's values) is read only when
    the peer is one of ``trusted_proxies``, right to left: the first address that is
    not itself a trusted proxy is the client (anything left of it, the client wrote
    itself). IPv6 clients count by their /64, IPv4-mapped ones as IPv4.
    """
    if not peer:
        return "unknown"
    address = _ip(peer)
    if address is None:
        return peer[:64]  # not an IP (a test client, a Unix socket): as it is
    if trusted_proxies and _trusted(address, trusted_proxies):
        hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
        for hop in reversed(hops):
            forwarded = _ip(hop)
            if forwarded is None:
                break  # garbage a trusted proxy would not write: stop at the last good hop
            address = forwarded
            if not _trusted(forwarded, trusted_proxies):
                break
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)
