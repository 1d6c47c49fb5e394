"""An agent that runs jobs, spoken for over raw HTTP (the real agent's job runner is built
elsewhere): it enrolls, exchanges, reports ``job-step`` messages and results, and keeps
every server message it got, so a test can read a ``terminate`` order and check its
signature with the server's public key, as the real agent must.

Works on any ``httpx.AsyncClient``: the in-process server's (``tests/inproc.py``), a
real server's, or a real relay's (the relay serves the same agent paths).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from taskfleet.protocol.jobs import job_step
from taskfleet.protocol.orders import TERMINATE, open_order
from taskfleet.protocol.signing import Verifier

ENROLL = "/agent/v1/enroll"
EXCHANGE = "/agent/v1/exchange"
POLICY = {"scripts": True, "users": ["root", "nobody"], "types": ["execute-script", "job"]}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def items(hashes: list[str], n: int = 2, timeout: float = 600) -> list[dict[str, Any]]:
    """``n`` items, each detecting with ``true``, needing ``hashes`` (size and name left
    for the server to fill) and installing with ``true``."""
    return [
        {
            "name": f"pkg-{i}",
            "detect": {"argv": ["true"], "timeout": 30},
            "content": [{"sha256": h} for h in hashes],
            "install": {"argv": ["true"], "timeout": timeout},
        }
        for i in range(n)
    ]


@dataclass
class JobAgent:
    client: httpx.AsyncClient
    computer_id: int
    secret: str
    generation: int
    public_key: str
    acked: int = 0  # last server seq received
    seq: int = 0  # last message seq sent
    got: list[dict[str, Any]] = field(default_factory=list)  # every server message

    @classmethod
    async def enroll(
        cls, client: httpx.AsyncClient, token: str, name: str | None = None, **extra: Any
    ) -> JobAgent:
        body = {
            "token": token,
            "hostname": name or f"job-pc-{uuid.uuid4().hex[:6]}",
            "machine_id": uuid.uuid4().hex,
            "policy": POLICY,
            **extra,
        }
        r = await client.post(ENROLL, json=body)
        assert r.status_code == 201, r.text
        d = r.json()
        return cls(client, d["computer_id"], d["secret"], d["generation"], d["server_public_key"])

    async def post(self, body: dict[str, Any]) -> httpx.Response:
        return await self.client.post(
            EXCHANGE,
            json=body,
            headers={
                "x-taskfleet-computer": str(self.computer_id),
                "authorization": f"Bearer {self.secret}",
            },
        )

    async def exchange(self, messages: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """One exchange that must succeed; the server messages it brought."""
        r = await self.post({"ack": self.acked, "messages": messages or []})
        assert r.status_code == 200, r.text
        new = list(r.json()["messages"])
        for m in new:
            self.acked = max(self.acked, m["seq"])
        self.got += new
        return new

    def numbered(self, message: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        return {**message, "seq": self.seq}

    async def ops(self) -> list[dict[str, Any]]:
        """Exchange; the operations handed out."""
        return [m for m in await self.exchange() if m["type"] == "operation"]

    async def steps(self, op: int, *reports: tuple[str, int, str], at: float = 0.0) -> None:
        """Report (phase, item, status) steps of ``op`` in one exchange."""
        await self.exchange(
            [
                self.numbered(job_step(op, phase, item, status, f"{phase} {item} {status}", at))
                for phase, item, status in reports
            ]
        )

    def result(self, op: int, status: str, line: str = "") -> dict[str, Any]:
        return self.numbered(
            {
                "type": "operation-result",
                "op": op,
                "status": status,
                "exit_code": None,
                "stdout": "",
                "stderr": "",
                "result_line": line or f"Stage: Completed, Status: {status.title()}",
            }
        )

    def terminates(self) -> list[dict[str, Any]]:
        """The terminate orders received, each checked as the agent must: signed by the
        server, of kind terminate, for this computer, generation and operation."""
        out = []
        for m in self.got:
            if m["type"] == "terminate":
                open_order(
                    Verifier(self.public_key),
                    m["body"],
                    m["sig"],
                    kind=TERMINATE,
                    op=m["op"],
                    computer=self.computer_id,
                    generation=self.generation,
                )
                out.append(m)
        return out
