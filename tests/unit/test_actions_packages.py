"""The packages types' parameters (domain/actions/packages.py): what is taken, how it is
normalised, and every class of bad input refused with the field named."""

from __future__ import annotations

from typing import Any

import pytest

from taskfleet.domain.actions import ACTION_TYPES, allowed_types, validate_action
from taskfleet.domain.actions.base import MAX_ITEMS

BAD_NAMES = [
    "hello;rm -rf /",
    "hello|cat",
    "$(reboot)",
    "`id`",
    "hello world",
    " hello",
    "-oDir=/",
    "-o",
    "--force-yes",
    "--allow-unauthenticated",
    "Hello",  # upper case
    "h",  # one character
    "",
    "héllo",
    "hello\n",
    "hello\x00",
    "hello-",  # apt-get would read it as "remove hello"
    "hello:nosucharch",
    "hello:amd64:i386",
    "a" * 129,
    "../etc/passwd",
    "hello=1.0",
    "hello*",
    "hello>x",
]
BAD_VERSIONS = [
    "",
    "1.0;reboot",
    "1.0 -1",
    "-1.0",
    "--force",
    "-oDir=/",
    "a1.0",  # starts with a letter
    "1.0\n",
    "1.0$(id)",
    "1:",
    "x:1.0",
    "1.0_1",
    "1" * 257,
    "1.0é",
]


def change(**params: Any) -> dict[str, Any]:
    return validate_action("change-packages", params)


def refused(type_: str, params: Any, says: str) -> None:
    with pytest.raises(ValueError) as err:
        validate_action(type_, params)
    assert says in str(err.value), str(err.value)


def test_the_four_types_are_registered_in_the_packages_family() -> None:
    for name in ("change-packages", "upgrade-packages", "upgrade-kernel", "downgrade-kernel"):
        assert name in ACTION_TYPES
        assert ACTION_TYPES[name].changes_system
        assert ACTION_TYPES[name].schema["additionalProperties"] is False
    assert allowed_types(["packages"]) == [
        "change-packages",
        "downgrade-kernel",
        "resync",
        "upgrade-kernel",
        "upgrade-packages",
    ]


def test_change_packages_is_normalised() -> None:
    assert change(install=["tf-hello", {"name": "libc6:amd64", "version": "1:2.36-9+deb12u3"}]) == {
        "install": [
            {"name": "tf-hello", "version": None},
            {"name": "libc6:amd64", "version": "1:2.36-9+deb12u3"},
        ],
        "remove": [],
        "hold": [],
        "unhold": [],
        "purge": False,
    }
    out = change(remove=["g++", "libstdc++6", "a.b+c"], purge=True, hold=["x1"], unhold=["y2"])
    assert out["remove"] == ["g++", "libstdc++6", "a.b+c"] and out["purge"] is True
    assert change(install=["ab", "ab", {"name": "ab"}])["install"] == [
        {"name": "ab", "version": None}
    ]
    assert change(install=[{"name": "ab", "version": "1.0~rc1-0ubuntu1"}])["install"][0][
        "version"
    ] == ("1.0~rc1-0ubuntu1")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_package_names_are_refused_in_every_list(name: str) -> None:
    for key in ("install", "remove", "hold", "unhold"):
        refused("change-packages", {key: [name]}, f"{key}: ")
    refused("change-packages", {"install": [{"name": name}]}, "install: ")


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_bad_versions_are_refused(version: str) -> None:
    refused("change-packages", {"install": [{"name": "ab", "version": version}]}, "ab")
    refused("change-packages", {"install": [{"name": "ab", "version": version}]}, "Debian version")
    refused("downgrade-kernel", {"package": "linux-image-x", "version": version}, "version")
    refused("upgrade-kernel", {"package": "linux-image-x", "version": version}, "version")


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({}, "give at least one package"),
        (None, "give at least one package"),
        ({"install": [], "remove": []}, "give at least one package"),
        ({"install": ["ab"], "remove": ["ab"]}, "ab is in both install and remove"),
        ({"hold": ["ab"], "unhold": ["ab:amd64"]}, "ab is in both hold and unhold"),
        ({"install": [{"name": "ab", "version": "1"}], "hold": ["ab"]}, "both install and hold"),
        ({"install": ["ab", {"name": "ab", "version": "1"}]}, "ab is given twice"),
        ({"install": "ab"}, "install must be a list"),
        ({"remove": "ab"}, "remove must be a list"),
        ({"hold": {"ab": 1}}, "hold must be a list"),
        ({"install": [1]}, "install: 1 is not a valid package name"),
        ({"install": [None]}, "is not a valid package name"),
        ({"install": [True]}, "is not a valid package name"),
        ({"install": [["ab"]]}, "is not a valid package name"),
        ({"install": [{"version": "1"}]}, "missing parameter(s): name"),
        ({"install": [{"name": "ab", "arch": "x"}]}, "unknown parameter(s): arch"),
        ({"install": [{"name": "ab", "version": 1}]}, "is not a Debian version"),
        ({"install": ["ab"] * 0 + [f"p{i}x" for i in range(MAX_ITEMS + 1)]}, "at most 1000"),
        ({"remove": [f"p{i}x" for i in range(MAX_ITEMS + 1)]}, "at most 1000"),
        ({"install": ["ab"], "purge": 1}, "purge must be true or false"),
        ({"install": ["ab"], "purge": "yes"}, "purge must be true or false"),
        ({"install": ["ab"], "force": True}, "unknown parameter(s): force"),
        ("install ab", "params must be an object"),
        (["ab"], "params must be an object"),
    ],
)
def test_change_packages_refusals(params: Any, says: str) -> None:
    refused("change-packages", params, says)


def test_upgrade_packages() -> None:
    assert validate_action("upgrade-packages", {}) == {
        "security_only": False,
        "dist_upgrade": False,
    }
    assert validate_action("upgrade-packages", {"security_only": True})["security_only"] is True
    refused("upgrade-packages", {"security_only": 1}, "security_only must be true or false")
    refused("upgrade-packages", {"security_only": "true"}, "security_only must be true or false")
    refused("upgrade-packages", {"dist_upgrade": None}, "dist_upgrade must be true or false")
    refused("upgrade-packages", {"all": True}, "unknown parameter(s): all")


def test_kernel_types() -> None:
    assert validate_action("upgrade-kernel", {}) == {"package": None, "version": None}
    assert validate_action("upgrade-kernel", {"package": "linux-image-amd64"}) == {
        "package": "linux-image-amd64",
        "version": None,
    }
    params = {"package": "linux-image-6.1.0-13-amd64", "version": "6.1.55-1"}
    assert validate_action("downgrade-kernel", params) == params
    refused("upgrade-kernel", {"version": "1.0"}, "version needs package")
    refused("upgrade-kernel", {"package": "openssl"}, "is not a valid kernel package")
    refused("upgrade-kernel", {"package": "linux-image-"}, "is not a valid kernel package")
    refused("upgrade-kernel", {"package": "linux-image-x;id"}, "is not a valid kernel package")
    refused("downgrade-kernel", {"package": "linux-image-x"}, "missing parameter(s): version")
    refused("downgrade-kernel", {"version": "1.0"}, "missing parameter(s): package")
    refused("downgrade-kernel", {"package": 5, "version": "1"}, "is not a valid kernel package")
    refused("downgrade-kernel", {"package": "linux-image-x", "version": 1.0}, "Debian version")
    refused(
        "downgrade-kernel", {"package": "linux-image-x", "version": "1", "x": 1}, "unknown param"
    )


def test_the_schemas_patterns_are_plain_ecma_regexes() -> None:
    """JSON Schema patterns are ECMA-262: no Python-only syntax such as ``\\Z``."""
    import json

    names = ("change-packages", "upgrade-packages", "upgrade-kernel", "downgrade-kernel")
    text = json.dumps([ACTION_TYPES[t].schema for t in names])
    assert "\\\\Z" not in text and "(?P<" not in text
