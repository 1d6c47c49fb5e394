"""Inventory parsing on real output captured from this machine (tests/data/inventory/).

Captured on a Debian 12 VM: ``dpkg-query -W -f=...``, ``apt-get -s -o
Debug::NoLocking=1 dist-upgrade`` (129 upgrades, some from bookworm-security),
``ip -j addr``, /etc/os-release, /proc/cpuinfo, /proc/meminfo, /proc/mounts,
/proc/net/if_inet6 and fib_trie, /etc/passwd and /etc/group (password fields are
``x``: the hashes live in /etc/shadow, never read).
"""

from __future__ import annotations

import json
from pathlib import Path

from taskfleet.agent import inventory as ai
from taskfleet.domain.versions import valid_version

DATA = Path(__file__).resolve().parents[1] / "data" / "inventory"


def text(name: str) -> str:
    return (DATA / name).read_text()


def test_dpkg_query_installed_packages() -> None:
    pkgs = ai.parse_dpkg_query(text("dpkg-query.txt"))
    lines = [line for line in text("dpkg-query.txt").splitlines() if line]
    assert len(pkgs) == len(lines) == 759  # every one is "install ok installed" here
    assert pkgs["openssl:amd64"]["version"].startswith("3.0.")
    assert pkgs["bash:amd64"] == {"version": "5.2.15-2+b8"}
    assert all(valid_version(p["version"]) for p in pkgs.values())
    assert any(k.endswith(":all") for k in pkgs)


def test_dpkg_query_status_rules() -> None:
    out = ai.parse_dpkg_query(
        "a\t1.0\tamd64\tinstall ok installed\n"
        "b\t2.0\tall\tdeinstall ok config-files\n"
        "c\t3:1.2~rc1-0\tamd64\thold ok installed\n"
        "d\t1\tamd64\tinstall ok half-configured\n"
        "garbage line\n"
    )
    assert out == {
        "a:amd64": {"version": "1.0"},
        "c:amd64": {"version": "3:1.2~rc1-0", "held": True},
    }


def test_apt_simulation_upgrades_and_security() -> None:
    ups = ai.parse_apt_simulation(text("apt-get-s-dist-upgrade.txt"))
    assert len(ups) == 129  # "129 upgraded" says the same output
    assert "129 upgraded" in text("apt-get-s-dist-upgrade.txt")
    assert ups["libgcrypt20:amd64"] == {"version": "1.10.1-3+deb12u1", "security": True}
    assert ups["base-files:amd64"] == {"version": "12.4+deb12u15", "security": False}
    security = {k for k, v in ups.items() if v["security"]}
    inst = [x for x in text("apt-get-s-dist-upgrade.txt").splitlines() if x.startswith("Inst ")]
    assert len(security) == sum("-Security:" in x for x in inst) > 0
    installed = ai.parse_dpkg_query(text("dpkg-query.txt"))
    assert set(ups) <= set(installed)  # upgrades of installed packages, same keys


def test_apt_simulation_new_package_and_multiarch() -> None:
    out = ai.parse_apt_simulation(
        "Inst libfoo2 (2.0-1 Debian:12/stable [amd64])\n"
        "Inst libc6:i386 [2.36-9] (2.36-9+deb12u4 Debian-Security:12/stable-security [i386])\n"
        "Conf libfoo2 (2.0-1 Debian:12/stable [amd64])\n"
        "Inst ubu [1] (2 Ubuntu:22.04/jammy-security [amd64]) []\n"
    )
    assert out == {
        "libfoo2:amd64": {"version": "2.0-1", "security": False},
        "libc6:i386": {"version": "2.36-9+deb12u4", "security": True},
        "ubu:amd64": {"version": "2", "security": True},
    }


def test_os_release_cpu_memory() -> None:
    assert ai.parse_os_release(text("os-release")) == {
        "id": "debian",
        "version_id": "12",
        "pretty_name": "Debian GNU/Linux 12 (bookworm)",
    }
    cpu = ai.parse_cpuinfo(text("cpuinfo"))
    assert cpu == {"model": "Intel(R) Xeon(R) Processor", "count": 2}
    mem = ai.parse_meminfo(text("meminfo"))
    assert mem["total_kb"] == 24684092 and mem["swap_kb"] == 0


def test_mounts_keep_real_filesystems_only() -> None:
    mounts = ai.parse_mounts(text("mounts"))
    assert mounts == [{"device": "/dev/vda", "mount": "/", "fs": "ext4"}]  # no proc, tmpfs, cgroup
    spaced = ai.parse_mounts("/dev/sdb1 /mnt/my\\040disk xfs rw 0 0\n/dev/sdb1 /bind xfs rw 0 0\n")
    assert spaced == [{"device": "/dev/sdb1", "mount": "/mnt/my disk", "fs": "xfs"}]


def test_network_from_ip_and_from_proc() -> None:
    links = ai.parse_ip_addr(text("ip-j-addr.json"))
    eth0 = next(n for n in links if n["interface"] == "eth0")
    assert eth0 == {
        "interface": "eth0",
        "mac": "02:fc:00:00:00:01",
        "addresses": ["192.0.2.2/24", "fd00::2/64", "fe80::fc:ff:fe00:1/64"],
    }
    assert "lo" not in {n["interface"] for n in links}
    fallback = ai.parse_proc_net(text("if_inet6"), text("fib_trie"))
    assert {
        "interface": "eth0",
        "mac": "",
        "addresses": ["fe80::fc:ff:fe00:1/64", "fd00::2/64"],
    } in fallback
    assert {"interface": "", "mac": "", "addresses": ["192.0.2.2"]} in fallback


def test_users_and_groups_never_keep_passwords() -> None:
    users = ai.parse_passwd(text("passwd"))
    assert users["root"] == {
        "uid": 0,
        "gid": 0,
        "name": "root",
        "home": "/root",
        "shell": "/bin/bash",
    }
    assert len(users) == 30
    assert all("x" not in u.values() for u in users.values())
    groups = ai.parse_group(text("group"))
    assert len(groups) == 53 and groups["root"]["gid"] == 0
    assert all(isinstance(g["members"], list) for g in groups.values())
    assert ai.parse_passwd("alice:$6$hash:1000:1000::/home/alice:/bin/sh\n")["alice"]["uid"] == 1000
    assert "$6$hash" not in json.dumps(
        ai.parse_passwd("alice:$6$hash:1000:1000::/home/alice:/bin/sh")
    )


def test_fit_drops_the_largest_section_over_the_limit() -> None:
    snap = {"os": {"id": "x"}, "packages": {f"p{i}:amd64": {"version": "1.0"} for i in range(2000)}}
    snap["users"] = {"root": {"uid": 0}}
    fitted = ai.fit(snap, limit=20_000)
    assert "packages" not in fitted and fitted["users"] == {"root": {"uid": 0}}
    assert "2000 entries" in fitted["missing"]["packages"]
