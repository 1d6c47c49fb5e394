"""The agent's own policy: a schema at the server's door, exact user names."""

from __future__ import annotations

import pytest

from taskfleet.domain.policy import validate_agent_policy
from taskfleet.domain.scripts import policy_refusal


def test_a_valid_policy_is_normalised_and_missing_fields_allow_nothing():
    assert validate_agent_policy({}) == {
        "scripts": False,
        "users": [],
        "types": [],
        "unsupported": {},
    }
    assert validate_agent_policy(
        {
            "scripts": True,
            "users": ["root", "deploy", "root"],
            "types": ["execute-script"],
            "unsupported": {"snap-install": "snapd is not installed"},
        }
    ) == {
        "scripts": True,
        "users": ["deploy", "root"],
        "types": ["execute-script"],
        "unsupported": {"snap-install": "snapd is not installed"},
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "policy must be an object"),
        ({"users": 5}, "'users' must be a list"),
        ({"users": "root"}, "'users' must be a list"),
        ({"users": [None]}, "'users' must hold names"),
        ({"users": ["x" * 65]}, "'users' must hold names"),
        ({"users": ["a\x1bb"]}, "control characters"),
        ({"types": ["a b"]}, "control characters"),
        ({"users": ["u"] * 257}, "at most 256"),
        ({"scripts": 1}, "'scripts' must be true or false"),
        ({"scripts": True, "root": True}, "unknown policy field(s): root"),
        ({"unsupported": ["snap-install"]}, "'unsupported' must map"),
        ({"unsupported": {"snap-install": 5}}, "reasons must be printable"),
        ({"unsupported": {"snap-install": "a\x1bb"}}, "reasons must be printable"),
        ({"unsupported": {"snap-install": "x" * 201}}, "at most 200"),
        ({"unsupported": {"a b": "why"}}, "control characters"),
    ],
)
def test_a_malformed_policy_is_refused_with_what_is_wrong(raw, message):
    with pytest.raises(ValueError) as info:
        validate_agent_policy(raw)
    assert message in str(info.value)


def test_script_users_match_exactly_whatever_was_stored():
    ok = {"scripts": True, "users": ["root"]}
    assert policy_refusal(ok, {"user": "root"}) is None
    assert policy_refusal(ok, {"user": None}) is None
    for stored in (ok, {"scripts": True, "users": "root"}, {"scripts": True, "users": 5}):
        assert (
            policy_refusal(stored, {"user": "oo"}) == "user 'oo' is not in its allowed script users"
        )
    for disabled in (None, [], {"scripts": "yes", "users": ["root"]}, {"users": ["root"]}):
        assert (
            policy_refusal(disabled, {"user": "root"})
            == "scripts are disabled in its configuration"
        )
