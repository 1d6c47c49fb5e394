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
WRITER_QUEUED = Gauge(
    "taskfleet_writer_queued",
    "Writes waiting for the single writer (climbing steadily: the database is slower than "
    "the load)",
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
TICKLES_FORWARDED = Counter(
    "taskfleet_tickles_forwarded_total",
    "Wake-ups handed to the leading server process, which sends them (issue 16)",
    registry=REGISTRY,
)
COMPUTERS = Gauge("taskfleet_computers", "Enrolled computers", registry=REGISTRY)
LONG_POLLS = Gauge(
    "taskfleet_long_polls", "Agent exchanges held open now (long polls)", registry=REGISTRY
)
REQUESTS = Counter(
    "taskfleet_requests_created_total", "Requests created (parents)", registry=REGISTRY
)
RELAY_TICKLES = Counter(
    "taskfleet_relay_tickles_sent_total",
    "UDP wake-ups sent to relays (one wakes all the relay's computers that have work)",
    registry=REGISTRY,
)
RELAY_EXCHANGES = Counter(
    "taskfleet_relay_exchanges_total",
    "Relay exchanges by path (fast: answered from memory; slow: touched the database)",
    ["path"],
    registry=REGISTRY,
)
FAST_RELAY_EXCHANGES = RELAY_EXCHANGES.labels("fast")
SLOW_RELAY_EXCHANGES = RELAY_EXCHANGES.labels("slow")
RELAY_ENTRIES = Histogram(
    "taskfleet_relay_exchange_entries",
    "Computers in one relay exchange (the relay's entries and those the server adds)",
    buckets=(0, 1, 2, 5, 10, 50, 100, 500, 1000, 5000, 20000),
    registry=REGISTRY,
)
RELAY_REFUSED_ENTRIES = Counter(
    "taskfleet_relay_refused_entries_total",
    "Entries of relay exchanges refused alone, by status (400 bad, 403 not this relay's "
    "computer, 500 failed)",
    ["status"],
    registry=REGISTRY,
)
RELAY_EXCHANGE_ERRORS = Counter(
    "taskfleet_relay_exchange_errors_total",
    "Relay exchanges refused whole, by reason",
    ["reason"],
    registry=REGISTRY,
)
RELAYS = Gauge("taskfleet_relays", "Enrolled relays (not revoked)", registry=REGISTRY)
CONTENT_SERVED = Counter(
    "taskfleet_content_served_bytes_total",
    "Content bytes sent, by who fetched them (agent: directly; relay: to fill its cache)",
    ["to"],
    registry=REGISTRY,
)
CONTENT_TO_AGENTS = CONTENT_SERVED.labels("agent")
CONTENT_TO_RELAYS = CONTENT_SERVED.labels("relay")
AUTH_FAILURES = Counter(
    "taskfleet_auth_failures_total",
    "Failed API tokens and enrollments (server/abuse.py), by kind",
    ["kind"],
    registry=REGISTRY,
)
AUTH_REFUSED = Counter(
    "taskfleet_auth_refused_total",
    "Attempts refused (429) from an address past its failure limit, by kind",
    ["kind"],
    registry=REGISTRY,
)
for _kind in ("token", "enroll"):
    AUTH_FAILURES.labels(_kind)
    AUTH_REFUSED.labels(_kind)
AGENT_REFUSALS = Counter(
    "taskfleet_agent_refusals_total",
    "Server messages agents refused as not genuinely theirs (server/refusals.py), by reason",
    ["reason"],
    registry=REGISTRY,
)
for _reason in sorted(REFUSAL_REASONS):
    AGENT_REFUSALS.labels(_reason)  # every series exists from the start, at 0
