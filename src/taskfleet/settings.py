"""Every default in one place, each with the reason beside it."""

from __future__ import annotations

SERVER_PORT = 8470  # HTTP API, dashboard and agent exchanges
RELAY_TICKLE_PORT = 50123  # SPEC 3.2: server -> relay
AGENT_TICKLE_PORT = 50124  # SPEC 3.2: relay or server -> agent

POLL_INTERVAL = 30 * 60.0  # SPEC 3.2: fallback exchange when tickles are lost
LONG_POLL_WAIT = 55.0  # below common proxy idle timeouts (60 s)
TICKLE_RATE = 5000.0  # fleet-wide tickles per second: 10,000 computers woken in 2 s
TICKLE_MIN_INTERVAL = 1.0  # at most one tickle per computer per second: no amplification
TICKLE_MAX_SKEW = 120.0  # seconds a tickle's timestamp may differ from the agent's clock

SCRIPT_TIMEOUT = 300.0  # default time limit of a script on the agent
LOST_GRACE = 60.0  # SPEC 9: the server waits this much longer than the agent's limit
OUTPUT_CAP = 64 * 1024  # bytes per stream kept from a script (stated in every result)
OUTPUT_CAP_MAX = 1024 * 1024  # the most a request may ask for
REAPER_INTERVAL = 5.0  # how often the server looks for lost activities

AGENT_RETRY_MIN = 1.0  # agent backoff when the server is down...
AGENT_RETRY_MAX = 60.0  # ...doubling up to this
EXCHANGE_HTTP_TIMEOUT = 30.0  # seconds an agent waits for an ordinary exchange

WRITE_BATCH_MAX = 2000  # exchanges applied in one database transaction
LAST_SEEN_FLUSH = 30.0  # seconds between writes of computers' last-seen times

# Server tasks canceled while running (issue 9).
EARLY_CANCEL_MEMORY = 60.0  # seconds a worker remembers a cancel for a task it has not
# claimed yet: the cancel message can overtake the end of the worker's own claim; the
# database (read at every heartbeat) is the record after that
