"""The failed-authentication limiter and the address it keys on (``protocols.bruteforce``)."""

from __future__ import annotations

import re
import threading

import pytest

from protocols.bruteforce import (
    FailureLimiter,
    LockedOutError,
    Lockout,
    LockoutPolicy,
    client_address,
    parse_networks,
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _fail(limiter: FailureLimiter, key: str, times: int = 1) -> list[Lockout | None]:
    results = []
    for _ in range(times):
        with limiter.attempt(key) as attempt:
            results.append(attempt.failed())
    return results


def _succeed(limiter: FailureLimiter, key: str) -> None:
    with limiter.attempt(key) as attempt:
        attempt.succeeded()


POLICY = LockoutPolicy(max_failures=3, window_s=60, lockout_s=100, max_lockout_s=350)


def test_the_kth_failure_in_the_window_locks_the_key_out_once() -> None:
    # Prepare
    clock = Clock()
    limiter = FailureLimiter(POLICY, clock)

    # Execute
    results = _fail(limiter, "a", 3)

    # Assert
    assert results[:2] == [None, None]
    assert results[2] == Lockout("a", 100, 3, 1)
    with pytest.raises(LockedOutError) as refused:
        limiter.attempt("a")
    assert refused.value.retry_after == 100
    assert limiter.locked_for("a") == 100


def test_a_locked_out_key_is_refused_even_before_its_secret_is_checked() -> None:
    # Prepare: locked out
    clock = Clock()
    limiter = FailureLimiter(POLICY, clock)
    _fail(limiter, "a", 3)

    # Execute / Assert: no attempt is handed out, so no secret (right or wrong) is checked
    clock.now += 99
    with pytest.raises(LockedOutError) as refused:
        limiter.attempt("a")
    assert refused.value.retry_after == 1
    clock.now += 1
    _succeed(limiter, "a")


def test_failures_outside_the_window_are_forgotten() -> None:
    # Prepare
    clock = Clock()
    limiter = FailureLimiter(POLICY, clock)
    _fail(limiter, "a", 2)

    # Execute: the third failure comes after the first two left the window
    clock.now += 61
    results = _fail(limiter, "a", 2)

    # Assert
    assert results == [None, None]
    assert limiter.locked_for("a") == 0


def test_repeated_lockouts_double_up_to_the_maximum_and_reset_after_a_quiet_spell() -> None:
    # Prepare
    clock = Clock()
    limiter = FailureLimiter(POLICY, clock)
    seconds = []

    # Execute: four lockouts in a row, then one after a long quiet spell
    for _ in range(4):
        lockout = _fail(limiter, "a", 3)[-1]
        assert lockout is not None
        seconds.append(lockout.seconds)
        clock.now += lockout.seconds
    clock.now += 351
    fresh = _fail(limiter, "a", 3)[-1]

    # Assert
    assert seconds == [100, 200, 350, 350]
    assert fresh is not None and (fresh.seconds, fresh.strike) == (100, 1)


def test_success_forgets_nothing_and_keys_are_independent() -> None:
    # Prepare: two failures of "a"
    clock = Clock()
    limiter = FailureLimiter(POLICY, clock)
    _fail(limiter, "a", 2)

    # Execute: successes by "a" (a valid token of its own) and by "b"; then "a" fails again
    _succeed(limiter, "a")
    _succeed(limiter, "b")
    third = _fail(limiter, "a", 1)[0]

    # Assert: "a" is locked out; "b" is not, and its successes left nothing behind
    assert third is not None and third.failures == 3
    assert limiter.locked_for("b") == 0
    _succeed(limiter, "b")
    assert len(limiter) == 1


def test_parallel_attempts_of_a_failing_key_cannot_exceed_the_limit() -> None:
    # Prepare: one failure; then as many attempts in flight as may still fail
    clock = Clock()
    limiter = FailureLimiter(POLICY, clock)
    _fail(limiter, "a", 1)
    in_flight = [limiter.attempt("a"), limiter.attempt("a")]

    # Execute / Assert: the next one waits for them
    with pytest.raises(LockedOutError) as refused:
        limiter.attempt("a")
    assert refused.value.retry_after == 1
    in_flight[0].succeeded()
    limiter.attempt("a").release()


def test_an_attempt_begun_before_a_lockout_fails_into_it_without_another() -> None:
    # Prepare: a first burst of four parallel attempts (no failure counted yet)
    limiter = FailureLimiter(POLICY, Clock())
    burst = [limiter.attempt("a") for _ in range(4)]

    # Execute: three fail (a lockout), then the fourth
    results = [attempt.failed() for attempt in burst]

    # Assert: one lockout, audited once
    assert [r is not None for r in results] == [False, False, True, False]


def test_a_client_that_never_failed_is_not_held_up_however_busy() -> None:
    # Prepare
    limiter = FailureLimiter(POLICY, Clock())

    # Execute
    attempts = [limiter.attempt("a") for _ in range(50)]

    # Assert
    assert len(attempts) == 50
    for attempt in attempts:
        attempt.succeeded()
    assert len(limiter) == 0


def test_an_attempt_left_unjudged_counts_for_nothing() -> None:
    # Prepare
    limiter = FailureLimiter(POLICY, Clock())

    # Execute: attempts that end in an exception before their secret was judged
    for _ in range(5):
        with pytest.raises(RuntimeError), limiter.attempt("a"):
            raise RuntimeError("the registry is away")

    # Assert
    assert limiter.locked_for("a") == 0 and len(limiter) == 0


def test_memory_is_bounded() -> None:
    # Prepare: room for 3 clients
    limiter = FailureLimiter(LockoutPolicy(max_failures=5, max_clients=3), Clock())

    # Execute: a thousand clients with one failure each, the last one with five
    for i in range(1000):
        _fail(limiter, f"c{i}", 1)
    _fail(limiter, "c999", 4)

    # Assert
    assert len(limiter) == 3
    assert limiter.locked_for("c999") > 0


def test_an_unlocked_key_is_evicted_before_a_locked_one() -> None:
    # Prepare: room for 2: "locked" (oldest, locked out) and "failing" (one failure)
    clock = Clock()
    limiter = FailureLimiter(
        LockoutPolicy(max_failures=2, window_s=60, lockout_s=100, max_clients=2), clock
    )
    _fail(limiter, "locked", 2)
    _fail(limiter, "failing", 1)

    # Execute: a third client arrives
    _fail(limiter, "new", 1)

    # Assert
    assert limiter.locked_for("locked") > 0
    assert len(limiter) == 2


def test_the_limiter_is_thread_safe() -> None:
    # Prepare: 8 threads failing the same key 50 times each, far past the limit
    limiter = FailureLimiter(LockoutPolicy(max_failures=100, lockout_s=900))
    locked: list[int] = []
    lockouts: list[Lockout] = []

    def hammer() -> None:
        for _ in range(50):
            try:
                attempt = limiter.attempt("a")
            except LockedOutError:
                locked.append(1)
                continue
            lockout = attempt.failed()
            if lockout is not None:
                lockouts.append(lockout)

    # Execute
    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert: exactly one lockout, after exactly 100 failures; the rest were refused
    assert len(lockouts) == 1 and lockouts[0].failures == 100
    assert len(locked) == 400 - 100


@pytest.mark.parametrize(
    ("policy", "argument"),
    [
        ({"max_failures": 0}, "max_failures"),
        ({"lockout_s": 0}, "lockout_s"),
        ({"lockout_s": 10, "max_lockout_s": 5}, "max_lockout_s"),
        ({"max_clients": 0}, "max_clients"),
    ],
)
def test_a_bad_policy_names_its_argument(policy: dict[str, float], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        LockoutPolicy(**policy)  # type: ignore[arg-type]


# -- the client address ------------------------------------------------------------------

PROXIES = parse_networks(["10.0.0.0/8", "2001:db8:ffff::/48"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # not a trusted proxy: the header is the client's own word, ignored
        ("192.0.2.7", ["203.0.113.9"], "192.0.2.7"),
        ("127.0.0.1", ["203.0.113.9"], "127.0.0.1"),
        # a trusted proxy: the right-most address that is not one of ours
        ("10.0.0.5", ["203.0.113.9"], "203.0.113.9"),
        ("10.0.0.5", ["198.51.100.1, 203.0.113.9, 10.0.0.6"], "203.0.113.9"),
        ("10.0.0.5", ["198.51.100.1", "203.0.113.9"], "203.0.113.9"),
        # a trusted proxy without the header (a health check): the proxy itself
        ("10.0.0.5", [], "10.0.0.5"),
        # garbage where the client should be: the last hop a proxy vouched for
        ("10.0.0.5", ["203.0.113.9, not-an-address"], "10.0.0.5"),
        # ports and brackets as some proxies write them
        ("10.0.0.5", ["203.0.113.9:4711"], "203.0.113.9"),
        ("10.0.0.5", ["[2001:db8:1:2::9]:443"], "2001:db8:1:2::/64"),
        # IPv6 clients count by their /64; IPv4-mapped ones as IPv4
        ("2001:db8:1:2:aaaa::1", [], "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", [], "192.0.2.7"),
        ("2001:db8:ffff:1::1", ["2001:db8:5::1"], "2001:db8:5::/64"),
        # not an IP at all
        ("testclient", ["203.0.113.9"], "testclient"),
        (None, [], "unknown"),
    ],
)
def test_the_client_address_trusts_forwarded_for_only_from_trusted_proxies(
    peer: str | None, forwarded: list[str], expected: str
) -> None:
    assert client_address(peer, forwarded, PROXIES) == expected


def test_without_trusted_proxies_forwarded_for_is_never_read() -> None:
    assert client_address("10.0.0.5", ["203.0.113.9"]) == "10.0.0.5"


def test_a_bad_proxy_entry_names_itself() -> None:
    with pytest.raises(ValueError, match=re.escape("'10.0.0.300'")):
        parse_networks(["10.0.0.0/8", "10.0.0.300"])
