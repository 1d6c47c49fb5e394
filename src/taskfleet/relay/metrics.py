"""Prometheus metrics of a relay process, served at its ``/metrics``.

Contract: one registry per process; gauges that read the spool (depth, cached, lag)
are set when ``/metrics`` is read, counters where things happen.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

SPOOLED = Gauge(
    "taskfleet_relay_spool_messages",
    "Agent messages spooled at the relay, not yet acknowledged by the server",
    registry=REGISTRY,
)
CACHED = Gauge(
    "taskfleet_relay_cached_messages",
    "Server messages cached at the relay, not yet acknowledged by their agent",
    registry=REGISTRY,
)
LAG = Gauge(
    "taskfleet_relay_forward_lag_seconds",
    "Age of the oldest spooled agent message (0: the spool is empty)",
    registry=REGISTRY,
)
COMPUTERS = Gauge("taskfleet_relay_computers", "Computers on the relay's roster", registry=REGISTRY)
RECEIVED = Counter(
    "taskfleet_relay_received_total",
    "Agent messages spooled (new ones; resends are not counted)",
    registry=REGISTRY,
)
FORWARDED = Counter(
    "taskfleet_relay_forwarded_total",
    "Agent messages the server acknowledged (dropped from the spool)",
    registry=REGISTRY,
)
DROPPED = Counter(
    "taskfleet_relay_dropped_total",
    "Spooled agent messages dropped because the server refused their computer's entry",
    registry=REGISTRY,
)
SPOOL_COMMITS = Counter(
    "taskfleet_relay_spool_commits_total",
    "Spool transactions committed (one fsync each; agent exchanges share them)",
    registry=REGISTRY,
)
AGENT_EXCHANGES = Counter(
    "taskfleet_relay_agent_exchanges_total", "Agent exchanges answered", registry=REGISTRY
)
IDENTITY_OFFERS = Counter(
    "taskfleet_relay_identity_offers_total",
    'Fresh identity nonces offered to agents (docs/relays.md "Copies behind a relay")',
    registry=REGISTRY,
)
REFUSED = Counter(
    "taskfleet_relay_refused_total",
    "Agent requests refused, by reason",
    ["reason"],
    registry=REGISTRY,
)
UPSTREAM = Counter(
    "taskfleet_relay_upstream_exchanges_total",
    "Relay exchanges with the server that succeeded",
    registry=REGISTRY,
)
UPSTREAM_FAILURES = Counter(
    "taskfleet_relay_upstream_failures_total",
    "Relay exchanges with the server that failed, by reason",
    ["reason"],
    registry=REGISTRY,
)
TICKLES_IN = Counter(
    "taskfleet_relay_tickles_received_total",
    "Tickles from the server, by outcome (accepted or the reason they were dropped)",
    ["outcome"],
    registry=REGISTRY,
)
TICKLES_OUT = Counter(
    "taskfleet_relay_tickles_sent_total", "UDP wake-ups sent to agents", registry=REGISTRY
)
CONTENT_CACHE_BYTES = Gauge(
    "taskfleet_relay_content_cache_bytes",
    "Bytes of content in the relay's cache (relay/content.py)",
    registry=REGISTRY,
)
CONTENT_HITS = Counter(
    "taskfleet_relay_content_hits_total",
    "Agent content requests answered from the cache",
    registry=REGISTRY,
)
CONTENT_MISSES = Counter(
    "taskfleet_relay_content_misses_total",
    "Agent content requests that waited for a fetch from the server (one fetch serves all "
    "the requests for the same content at the same time)",
    registry=REGISTRY,
)
CONTENT_FETCHED_BYTES = Counter(
    "taskfleet_relay_content_fetched_bytes_total",
    "Content bytes fetched from the server",
    registry=REGISTRY,
)
CONTENT_SERVED_BYTES = Counter(
    "taskfleet_relay_content_served_bytes_total",
    "Content bytes sent to agents",
    registry=REGISTRY,
)
CONTENT_EVICTED = Counter(
    "taskfleet_relay_content_evicted_total",
    "Cached content files evicted (least recently used first) to stay within the cap",
    registry=REGISTRY,
)
CONTENT_FETCH_FAILURES = Counter(
    "taskfleet_relay_content_fetch_failures_total",
    "Fetches from the server that failed, by the status agents were answered "
    "(404 not there, 502 bad bytes, 503 unreachable or refused)",
    ["status"],
    registry=REGISTRY,
)
