"""A throw-away system root for the accounts tests: the real useradd, usermod, userdel,
groupadd, groupdel and gpasswd run against it with ``--root``, never against this
machine's own /etc (the tests run as root: ``host_accounts`` is compared before and
after)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

HOST_FILES = ("passwd", "group", "shadow", "gshadow")

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
toor:x:0:0:another superuser:/root:/bin/sh
agent:x:990:990:the agent's own user:/var/lib/agent:/usr/sbin/nologin
svc:x:991:990:a service:/srv:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = """\
root:x:0:
daemon:x:1:
sudo:x:27:
users:x:100:
agent:x:990:
nogroup:x:65534:
"""


def make_root(root: Path) -> Path:
    """A minimal managed system under ``root`` (created): its accounts files, and this
    machine's login.defs and useradd defaults when it has them."""
    etc = root / "etc"
    (etc / "default").mkdir(parents=True)
    (etc / "passwd").write_text(PASSWD)
    (etc / "group").write_text(GROUP)
    shadow = "".join(f"{ln.split(':')[0]}:*:20000:0:99999:7:::\n" for ln in PASSWD.splitlines())
    gshadow = "".join(f"{ln.split(':')[0]}:*::\n" for ln in GROUP.splitlines())
    for name, text in (("shadow", shadow), ("gshadow", gshadow)):
        (etc / name).write_text(text)
        (etc / name).chmod(0o600)
    for rel in ("login.defs", "default/useradd"):
        if Path("/etc", rel).is_file():
            shutil.copyfile(Path("/etc", rel), etc / rel)
    (root / "home").mkdir()
    return root


def host_accounts() -> dict[str, str]:
    """This machine's own accounts files, by digest."""
    out = {}
    for name in HOST_FILES:
        path = Path("/etc", name)
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""
    return out


def line_of(root: Path, file: str, name: str) -> str | None:
    """``name``'s line in ROOT/etc/FILE, or None."""
    for line in (root / "etc" / file).read_text().splitlines():
        if line.split(":")[0] == name:
            return line
    return None
