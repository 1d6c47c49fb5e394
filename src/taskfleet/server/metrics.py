"""Prometheus metrics of a server process, served at ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from taskfleet.protocol.exchange import REFUSAL_REASONS

REGISTRY = CollectorRegistry(auto_describe=True)

EXCHANGES = Counter(
    "taskfleet_exchanges_total",
    "Agent exchanges by path (fast: answered from memory; slow: touched the database)",
    ["path"],
    registry=REGISTRY,
)
# Bound once: a labels() lookup per exchange shows in the hot path's profile.
FAST_EXCHANGES = EXCHANGES.labels("fast")
SLOW_EXCHANGES = EXCHANGES.labels("slow")
EXCHANGE_ERRORS = Counter(
    "taskfleet_exchange_errors_total",
    "Refused exchanges by reason",
    ["reason"],
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "taskfleet_write_batch_exchanges",
    "Exchanges applied per database transaction",
    buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 2000),
    registry=REGISTRY,
)
DELIVERED = Counter(
    "taskfleet_activities_delivered_total", "Client activities handed out", registry=REGISTRY
)
RESULTS = Counter(
    "taskfleet_results_recorded_total", "Operation results recorded", registry=REGISTRY
)
LOST = Counter(
    "taskfleet_activities_lost_total",
    "Client activities failed as lost (no result in time)",
    registry=REGISTRY,
)
TICKLES = Counter("taskfleet_tickles_sent_total", "UDP wake-ups sent to agents", registry=REGISTRY)
TICKLES_SKIPPED = Counter(
    "taskfleet_tickles_skipped_total",
    "Wake-ups not sent (rate limited per computer, or no address known)",
    ["reason"],
    registry=REGISTRY,
)
COMPUTERS = Gauge("taskfleet_computers", "Enrolled computers", registry=REGISTRY)
REQUESTS = Counter(
    "taskfleet_requests_created_total", "Requests created (parents)", registry=REGISTRY
)
AGENT_REFUSALS = Counter(
    "taskfleet_agent_refusals_total",
    "Server messages agents refused as not genuinely theirs (server/refusals.py), by reason",
    ["reason"],
    registry=REGISTRY,
)
for _reason in sorted(REFUSAL_REASONS):
    AGENT_REFUSALS.labels(_reason)  # every series exists from the start, at 0
