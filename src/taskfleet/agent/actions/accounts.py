"""Accounts: the agent handlers of its typed activities (filled in by its own change)."""

from __future__ import annotations

from taskfleet.agent.actions.context import AgentAction

HANDLERS: dict[str, AgentAction] = {}
