"""Packages activities (SPEC 2.3): filled in by its own change."""

from __future__ import annotations

from taskfleet.domain.actions.base import ActionType

TYPES: tuple[ActionType, ...] = ()
