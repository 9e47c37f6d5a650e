"""The vetting policy: what the machine may approve, what a person must see, and its file."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.errors import NodeError
from node.vetting.policy import Decision, InstanceFacts, VettingPolicy, decide
from protocols.phi.findings import Severity

CT = InstanceFacts("CT", burned_in_risk=False)
CR = InstanceFacts("CR", burned_in_risk=False)


@pytest.mark.parametrize(
    ("instances", "findings", "expected"),
    [
        ([CT, CT, CR], [], Decision(True, "scan clean, low-risk modalities, nothing flagged")),
        (
            [CT, CT],
            [Severity.INFO],
            Decision(True, "scan clean, low-risk modalities, nothing flagged"),
        ),
        ([CT, CT], [Severity.LOW, Severity.HIGH], Decision(False, "2 finding(s), worst high")),
        (
            [CT, InstanceFacts("CT", True)],
            [],
            Decision(False, "1 instance(s) at risk of burned-in text"),
        ),
        ([CT, InstanceFacts("US", False)], [], Decision(False, "modality US is always reviewed")),
        ([InstanceFacts("SC", False)], [], Decision(False, "modality SC is always reviewed")),
        (
            [CT, InstanceFacts("SR", False)],
            [],
            Decision(False, "modality SR is not on the auto-approve list"),
        ),
        (
            [InstanceFacts("", False)],
            [],
            Decision(False, "modality ? is not on the auto-approve list"),
        ),
        ([], [], Decision(False, "no instances")),
    ],
)
def test_the_default_policy_holds_whatever_is_uncertain(
    instances: list[InstanceFacts], findings: list[Severity], expected: Decision
) -> None:
    assert decide(VettingPolicy(), instances, findings) == expected


def test_a_site_policy_changes_the_lists_and_the_threshold() -> None:
    policy = VettingPolicy.model_validate(
        {
            "auto_approve": {"modalities": ["ct", " MR "]},
            "hold": {"modalities": ["US"], "findings_at_or_above": "HIGH"},
        }
    )

    assert policy.auto_approve.modalities == ["CT", "MR"]
    assert policy.hold.findings_at_or_above == "high"
    assert decide(policy, [CT], [Severity.MEDIUM]).approve
    assert not decide(policy, [CT], [Severity.HIGH]).approve
    assert decide(policy, [CR], []) == Decision(
        False, "modality CR is not on the auto-approve list"
    )
    off = VettingPolicy.model_validate({"auto_approve": {"enabled": False}})
    assert decide(off, [CT], []) == Decision(False, "auto-approval is off: a reviewer decides")


def test_the_policy_file_round_trips_and_a_missing_file_means_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    policy = VettingPolicy.model_validate(
        {
            "auto_approve": {"enabled": False, "modalities": ["CR", "DX"]},
            "hold": {"modalities": ["US", "SC", "XA"], "findings_at_or_above": "medium"},
            "review": {"two_person": True},
        }
    )

    assert VettingPolicy.load(path) == VettingPolicy()
    policy.save(path)

    assert VettingPolicy.load(path) == policy
    assert [p.name for p in tmp_path.iterdir()] == ["policy.toml"]  # no temporary left


@pytest.mark.parametrize(
    "text",
    [
        "[auto_approve]\nmodalities = ['C T!']\n",
        "[hold]\nfindings_at_or_above = 'sometimes'\n",
        "[review]\ntwo_persons = true\n",
        "[review\n",
    ],
)
def test_a_broken_policy_file_is_refused_with_its_reason(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)

    with pytest.raises(NodeError) as caught:
        VettingPolicy.load(path)

    assert caught.value.code == "bad_policy"
    assert str(path) in caught.value.message


def test_outbox_backoff_grows_with_jitter_and_is_capped() -> None:
    from node.share.outbox import MAX_BACKOFF_S, backoff

    waits = {attempt: [backoff(attempt) for _ in range(200)] for attempt in (1, 2, 3, 12)}

    assert all(2.5 <= w <= 5 for w in waits[1])
    assert all(5 <= w <= 10 for w in waits[2])
    assert all(10 <= w <= 20 for w in waits[3])
    assert all(MAX_BACKOFF_S / 2 <= w <= MAX_BACKOFF_S for w in waits[12])
    assert len({round(w, 3) for w in waits[2]}) > 50  # jittered, not one value


def test_the_upload_rate_limiter_keeps_the_average(monkeypatch: pytest.MonkeyPatch) -> None:
    from node.share import upload

    clock = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(upload.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(upload.time, "sleep", sleep)
    limiter = upload.RateLimiter(1_000_000)  # 1 MB/s

    for _ in range(10):
        limiter.take(500_000)  # 5 MB in all

    # The first second's allowance is free; the other 4 MB take 4 s.
    assert sum(slept) == pytest.approx(4.0)
