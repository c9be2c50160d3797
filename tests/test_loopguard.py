"""The loop guard's pure parts: which mail is automatic, and the per-sender firing cap."""

from __future__ import annotations

import pytest

from aimx.mail.loopguard import FiringCap, automatic_reason


def reason(auto_submitted=None, precedence=None, list_id=None, mail_from="bob@example.org"):
    return automatic_reason(auto_submitted=auto_submitted, precedence=precedence,
                            list_id=list_id, mail_from=mail_from)


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, None),
    ({"auto_submitted": "no"}, None),
    ({"auto_submitted": "No ; comment=x"}, None),
    ({"auto_submitted": "NO (a person wrote this)"}, None),
    ({"auto_submitted": "auto-replied"}, "auto_submitted"),
    ({"auto_submitted": "Auto-Generated; owner-email=x@y"}, "auto_submitted"),
    ({"auto_submitted": "auto-notified"}, "auto_submitted"),
    ({"precedence": "bulk"}, "precedence"),
    ({"precedence": "JUNK"}, "precedence"),
    ({"precedence": "list"}, "precedence"),
    ({"precedence": "first-class"}, None),
    ({"list_id": "<team.lists.example.org>"}, "list_id"),
    ({"mail_from": ""}, "null_sender"),
    ({"mail_from": None}, None),  # no envelope at all (aimx ingest)
    ({"auto_submitted": "auto-replied", "mail_from": ""}, "auto_submitted"),
])
def test_automatic_markers(headers, expected):
    assert reason(**headers) == expected


def test_cap_admits_limit_firings_per_window_then_refuses():
    cap = FiringCap()
    key = ("alice", "bob@example.org")
    assert [cap.admit(key, 3, 600, now) for now in (0, 1, 2, 3)] == [True, True, True, False]
    assert cap.admit(("alice", "carol@example.org"), 3, 600, 3)  # another sender
    assert cap.admit(("other", "bob@example.org"), 3, 600, 3)  # another mailbox
    assert not cap.admit(key, 3, 600, 599)
    assert cap.admit(key, 3, 600, 600.5)  # the first firing left the window


def test_refused_firings_do_not_extend_the_window():
    cap = FiringCap()
    key = ("alice", "bob@example.org")
    assert cap.admit(key, 1, 10, 0)
    for now in range(1, 10):
        assert not cap.admit(key, 1, 10, now)
    assert cap.admit(key, 1, 10, 10.5)


def test_zero_limit_means_no_cap():
    cap = FiringCap()
    assert all(cap.admit(("a", "b"), 0, 600, 0) for _ in range(100))


def test_stale_senders_are_swept():
    cap = FiringCap(sweep_above=5)
    for n in range(10):
        cap.admit(("alice", f"s{n}@example.org"), 10, 60, 0)
    cap.admit(("alice", "late@example.org"), 10, 60, 100)
    assert not cap.admit(("alice", "late@example.org"), 1, 60, 100)  # still counted
    assert all(cap.admit(("alice", f"s{n}@example.org"), 1, 60, 100) for n in range(10))
