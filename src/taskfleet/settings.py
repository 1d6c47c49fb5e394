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
# Identities that cannot be cloned (domain/identity.py): an agent's identity nonce is
# replaced when the confirmed one is this old (0: at every exchange), and a request
# presenting the one before it is accepted for this long (it was delayed on its way).
IDENTITY_ROTATE = 60.0
IDENTITY_GRACE = 120.0
LOST_GRACE = 60.0  # SPEC 9: the server waits this much longer than the agent's limit
OUTPUT_CAP = 64 * 1024  # bytes per stream kept from a script (stated in every result)
OUTPUT_CAP_MAX = 1024 * 1024  # the most a request may ask for
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL to a child's process group
# Seconds a child's output is still read after its main process exited: processes it left in
# the background may hold the pipes open for ever, and the result must not wait for them.
EXIT_DRAIN = 2.0
REAPER_INTERVAL = 5.0  # how often the server looks for lost activities
# SPEC 6: how long a terminated job waits for computers still running it (offline ones
# get the order when they return) before it records them "unreachable at termination":
# a day covers a laptop closed overnight; a maintenance window may ask for less.
JOB_TERMINATE_WAIT = 24 * 3600.0

AGENT_RETRY_MIN = 1.0  # agent backoff when the server is down...
AGENT_RETRY_MAX = 60.0  # ...doubling up to this
# Retry-After (seconds) of a 503 when the database is full or unreachable (store/unavailable.py)
UNAVAILABLE_RETRY_AFTER = 2
EXCHANGE_HTTP_TIMEOUT = 30.0  # seconds an agent waits for an ordinary exchange
# Bytes of messages in one exchange reply (one larger message still goes alone).
# A quarter of the agent's 64 MiB response cap (AGENT_MAX_RESPONSE), so
# the largest single operation the script limits allow still fits beside it;
# the rest is handed out at the next exchange, which "more" asks for at once.
REPLY_MAX_BYTES = 16 * 1024 * 1024

# Relays (issue 11, docs/relays.md).
# A relay exchanges at least this often: a lost tickle costs a minute; one exchange covers
# all its computers, so this costs the server one request per relay per minute.
RELAY_POLL_INTERVAL = 60.0
# Bytes of messages in one relay exchange reply, all its computers together: four agent
# replies' worth, so a relay holds a bounded reply in memory however many computers have
# work; the rest comes at once on the next exchange ("more").
RELAY_REPLY_MAX_BYTES = 4 * REPLY_MAX_BYTES
RELAY_NAME_MAX = 128  # characters of a relay's name (unique per tenant)
RELAY_URL_MAX = 512  # characters of the URL a relay advertises to its agents
# Seconds between sending a relay its new roster and waking the agents assigned away
# from it: time for it to apply the roster, so it refuses them (503) and they fail over
# to the server, which names their new relay. Too early, it still serves them and they
# learn at their next poll instead.
RELAY_MOVED_WAKE_DELAY = 1.0

WRITE_BATCH_MAX = 2000  # exchanges applied in one database transaction
LAST_SEEN_FLUSH = 30.0  # seconds between writes of computers' last-seen times

# A time, schedule, approval expiry, queued-work expiry or recurring interval further
# out than this is a typo, refused (a year and a day covers any yearly maintenance).
MAX_AHEAD = 366 * 86400.0
MAX_SCRIPT_TIMEOUT = 7 * 86400.0  # a script's time limit: longer than a week is a mistake
RECURRING_EVERY = 3600.0  # a recurring operation that names no interval runs hourly
AGENT_MAX_RESPONSE = 64 * 1024 * 1024  # the agent refuses a larger exchange reply (memory)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what both databases' BIGINT columns hold
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # ... and their INTEGER columns (PostgreSQL)

# -- limits of what the API accepts (bad input is a 400/404/413, never a 500) ---------------
# Every id is a 64-bit signed integer in both stores (SQLite INTEGER, PostgreSQL BIGINT): a
# larger one cannot name anything (a path answers 404, a body or query 400).
MAX_ID = INT64_MAX
# Epoch times an administrator gives (a request's "at", a task's not_before): anything
# before 1970 or after 2100 is a typo (or a 1e20), and the bounds keep every date shown,
# stored or added to finite and exact.
TIME_MIN = 0.0
TIME_MAX = 4_102_444_800.0  # 2100-01-01T00:00:00Z
# Durations in seconds (token lifetimes, "older than" filters): ten years is longer than
# any sensible one, and now + ten years stays well inside float precision.
DURATION_MAX = 10 * 366 * 86400.0
# Request bodies, read to at most this before any parsing (413 beyond). The enrollment
# route answers callers without a token, so it gets only what an enrollment needs; the
# admin API must fit a request with a script at the documented limit (1 Mi characters,
# up to 12 bytes each once JSON-escaped) plus its argv and env. The agent exchange has
# its own limit (protocol/exchange.py MAX_BODY_BYTES).
ENROLL_BODY_MAX = 64 * 1024
API_BODY_MAX = 32 * 1024 * 1024
# Tag values (keys follow domain/targets.py): printable text of at most this many characters.
TAG_VALUE_MAX = 256

# `run --wait` (and `request rerun --wait`) keep polling through a server restart
# or a proxy's 502/503/504 for this long before giving up: a restart takes
# seconds, and a longer outage should reach the administrator as an error.
CLI_WAIT_RETRY = 120.0
CLI_RETRY_MAX_DELAY = 5.0  # seconds between two attempts at most (from 0.25 s, doubling)
# Server tasks canceled while running (issue 9).
EARLY_CANCEL_MEMORY = 60.0  # seconds a worker remembers a cancel for a task it has not
# claimed yet: the cancel message can overtake the end of the worker's own claim; the
# database (read at every heartbeat) is the record after that

# -- defaults the command line states (issue 10: the CLI's help prints these constants) -----
SERVER_DATA_DIR = "taskfleet-data"  # relative to where `taskfleet server` starts: a first try
# needs no root; an installed server is given its own --data-dir
SERVER_KEEP_ALIVE = 120  # seconds an idle API connection stays open: longer than a long
# poll (LONG_POLL_WAIT), so an agent keeps its one keep-alive connection
SERVER_BACKLOG = 4096  # pending TCP connections: a fleet woken at TICKLE_RATE connects at once
WORKER_CONCURRENCY = 4  # server tasks one worker (or the embedded queue) runs at once
WORKER_HEARTBEAT_TIMEOUT = 5 * 3600.0  # SPEC 4.6: a silent worker's tasks fail after this
SCRIPT_INTERPRETER = "/bin/sh"  # runs a --script file: the one shell every Unix agent has
AGENT_STATE_DIR = "/var/lib/taskfleet"  # the agent's durable local state (FHS: service state)
AGENT_TICKLE_BIND = "0.0.0.0"  # every interface: tickles come from wherever the server is
SCRUB_INTERVAL = 3600.0  # SPEC 5: the agent's scrubber runs at start, then this often
# An agent behind a relay (--relay; docs/relays.md "Agents behind a relay"):
# Seconds of relay failures (refused, timeout, 5xx) before the agent exchanges with the
# server directly: two minutes ride out a relay restart or upgrade without moving the
# agents' load onto the server, and results wait at most that long.
AGENT_RELAY_FAILOVER_AFTER = 120.0
# While direct, the agent tries its relay again this often (one ordinary exchange): a
# returned relay takes its agents back within a minute, at one refused connection a
# minute per agent while it is down.
AGENT_RELAY_PROBE_INTERVAL = 60.0
# While its relay holds messages the server has not acknowledged, the agent asks the
# relay again at least this often (or at its poll interval if shorter): its outbox is
# pruned soon after the server has them, and a relay that dies holding them is noticed
# (then failed over from) within this plus the failover time, not at the next poll
# (30 min). An exchange with a relay nearby is cheap and never reaches the server.
AGENT_RELAY_CHECK_INTERVAL = 30.0
SCRUB_MAX_ATTEMPTS = 3  # SPEC 5: attempts after which the scrubber stops continuing an operation
# A job's Download step (agent/jobs.py): the time limit the agent gives one content fetch
# (agent/content.py says how it applies it). A minute rides out a relay restart; a fetch
# that fails is a failed step, not a stuck job.
JOB_FETCH_TIMEOUT = 60.0
CLI_HTTP_TIMEOUT = 60.0  # seconds one admin API call may take (a bulk cancel of many rows)
CLI_POLL_INTERVAL = 0.2  # seconds between two polls of `run --wait`: a live bar, a light load

# -- server tasks (SPEC 4) ----------------------------------------------------------------
TASK_TIME_LIMIT = 3600.0  # seconds; a server task whose type declares no limit still ends
# A worker writes a heartbeat this often, busy or idle (and reads its tasks' cancels then):
# far below the reaper's timeout (5 h), so only a really silent worker loses its tasks.
WORKER_HEARTBEAT_INTERVAL = 10.0
CLAIM_RETRY_DELAY = 1.0  # seconds before a delivery whose claim failed goes back to the queue
# A worker's claim/result batch waits at most this many event-loop turns, while each
# turn brings more, before it goes: a result and the claim of the delivery its free
# slot takes are a few turns apart, and sharing one transaction halves the writer's
# transactions per task. Turns, not time: an idle worker loses a few microseconds.
BATCH_SETTLE_TURNS = 8
# A worker retries storing a result until the database answers (it never acks before):
# from this many seconds, doubling up to the next, so an outage is not a busy loop.
RESULT_RETRY_MIN = 0.5
RESULT_RETRY_MAX = 30.0

# -- relays (issue 11; docs/relays.md) ------------------------------------------------------
RELAY_PORT = 8471  # a relay's HTTP port for agents: beside the server's, so both fit one host
RELAY_LISTEN = f"0.0.0.0:{RELAY_PORT}"  # every interface: agents reach it from their network
RELAY_STATE_DIR = "/var/lib/taskfleet-relay"  # the relay's spool and identity (FHS: state)
RELAY_TICKLE_BIND = "0.0.0.0"  # every interface: tickles come from wherever the server is
RELAY_RETRY_MIN = 1.0  # relay backoff while the server is unreachable...
RELAY_RETRY_MAX = 60.0  # ...doubling up to this (a returning server sees the spool within a minute)
# A revoked relay (401) asks again this rarely: it serves nobody meanwhile (its agents fail
# over to the server), and an administrator who un-revokes it waits at most this long.
RELAY_REVOKED_RETRY = 300.0
RELAY_ENROLL_CONCURRENCY = 8  # agents' enrollments a relay forwards to the server at once
RELAY_HTTP_TIMEOUT = 60.0  # one relay exchange applies all its entries in one batch: more
# work than an agent's, so more time than EXCHANGE_HTTP_TIMEOUT
# Bytes of agent messages in one relay request: a quarter of the server's limit
# (protocol/relay.py MAX_RELAY_BODY_BYTES), so entries, agent info and JSON overhead fit
# beside them; the rest goes in the next request, sent at once.
RELAY_SEND_BUDGET = 16 * 1024 * 1024
# The relay refuses a larger reply (memory): several computers' full replies
# (REPLY_MAX_BYTES each) fit; the server keeps its whole-reply cap below this.
RELAY_MAX_RESPONSE = 256 * 1024 * 1024
# An agent the relay does not know makes it ask the server for its whole roster, at most
# this often: a flood of made-up computer ids must not become a flood of roster reads.
RELAY_ROSTER_REFRESH_MIN = 1.0
RELAY_SHUTDOWN_GRACE = 3.0  # seconds open agent requests get to finish when the relay stops

# -- content by hash (issue 12; docs/content.md) --------------------------------------------
# The largest content one upload may add (413 beyond): a service pack or a disk image fits;
# the bytes are streamed to disk, never held in memory, so this bounds disk, not RAM.
CONTENT_MAX_BYTES = 8 * 1024**3
# Bytes read or written per step when content is streamed (upload, serving, relay fetch,
# agent download): large enough that per-chunk overhead vanishes, small enough that many
# transfers at once cost little memory.
CONTENT_CHUNK = 1024 * 1024
# A relay's content cache (LRU by total size): ten 1 GiB packages, or a month of patches.
RELAY_CONTENT_CACHE_BYTES = 10 * 1024**3
# Seconds without progress (connecting, or between two reads) before a relay's fetch from
# the server is abandoned: a stalled server must not hold the agents waiting on it forever.
RELAY_CONTENT_TIMEOUT = 60.0

# -- the computer's inventory (issue 13; docs/inventory.md) ---------------------------------
# The agent re-collects its inventory this often even when nothing told it to (a package
# installed by hand, a user added): four times a day finds those the same working day.
AGENT_INVENTORY_INTERVAL = 6 * 3600.0
# ... and never more often than this: a burst of finished operations (a rollout of 50
# scripts) costs one collection a minute, not fifty.
AGENT_INVENTORY_MIN_INTERVAL = 60.0
# One run of an inventory tool (dpkg-query, apt-get -s, ip): apt's simulation takes a few
# seconds on a small machine; a stuck one must not stop the next collection.
INVENTORY_TOOL_TIMEOUT = 120.0
# The most read from one tool or file (dpkg-query on a desktop writes about 0.5 MB).
INVENTORY_TOOL_OUTPUT = 16 * 1024 * 1024
# apt's answers kept in the cache (one per dpkg database and lists state): agents of one
# machine share them; more than a few are states that passed.
INVENTORY_CACHE_ENTRIES = 8

# -- typed activities (issue 13; docs/activity-types.md) -------------------------------------
# How long a package activity waits for apt's or dpkg's lock held by another process (an
# unattended upgrade) before it fails saying so: long enough for a nightly upgrade's usual
# run, short enough that a stuck lock is reported the same hour.
AGENT_PACKAGE_LOCK_TIMEOUT = 300.0
# A restart is Succeeded when the agent comes back on a new boot; after the restart's own
# delay plus this grace with the same boot it is Failed ("did not restart"). A normal boot
# takes a few minutes; a slow firmware or fsck can take ten.
AGENT_RESTART_GRACE = 15 * 60.0

# -- the web dashboard (issue 14; docs/dashboard.md) -----------------------------------------
# A dashboard session ends this long after login, used or not: a working day, so a
# browser left open overnight asks for the token again.
DASHBOARD_SESSION_TTL = 8 * 3600.0
# On PostgreSQL a session's last_seen_at is written at most this often (not on every
# page view).
DASHBOARD_SESSION_TOUCH_EVERY = 60.0
# Failed logins one client address may make within the window before every login from
# it is refused (429) until the window has passed: a person mistypes a few times; a
# script guessing tokens gets 10 guesses per 5 minutes.
# Failed API tokens and enrollments per source address (server/abuse.py): past the
# limit within the window, the address gets 429 until its oldest failure ages out.
AUTH_FAILURE_LIMIT = 30
ENROLL_FAILURE_LIMIT = 20
AUTH_FAILURE_WINDOW = 300.0
AUTH_FAILURE_ADDRESSES = 100_000  # addresses tracked at most (a flood evicts the oldest)
# On PostgreSQL (the auth_failures table) each process prunes expired rows and trims
# to AUTH_FAILURE_ADDRESSES on its first failure and every this many after.
AUTH_FAILURE_PRUNE_EVERY = 64
DASHBOARD_LOGIN_LIMIT = 10
DASHBOARD_LOGIN_WINDOW = 300.0
# A computer is shown offline when its last exchange is older than this: an idle agent
# with wake-ups exchanges every POLL_INTERVAL, so one missed poll plus five minutes.
DASHBOARD_OFFLINE_AFTER = POLL_INTERVAL + 300.0
# How often a request page's event stream looks for new activity events, and how long
# one stream lasts before the browser reconnects (resuming from Last-Event-ID).
DASHBOARD_SSE_POLL = 0.5
DASHBOARD_SSE_MAX_AGE = 600.0
# The polling fallback where server-sent events are blocked (issue 14: 5 s).
DASHBOARD_POLL_EVERY = 5
# The most activities one request page lists (the counts cover them all).
DASHBOARD_ROWS = 500

# Tenants and login accounts (docs/tenants.md).
TENANT_NAME_MAX = 64  # characters: letters, digits, '.', '_', '-' (used in CLI options, headers)
ACCOUNT_NAME_MAX = 64  # characters of a login account's name (unique server-wide)
ACCOUNT_PASSWORD_MIN = 12  # characters: NIST SP 800-63B asks 8 at least; admins get more
ACCOUNT_PASSWORD_MAX = 1024  # characters: argon2 takes any length, a megabyte is an attack
LOGIN_LINK_TTL = 10 * 60.0  # seconds a one-time login link (the demo's) stays usable
TENANT_HEADER = "X-Taskfleet-Tenant"  # the super-admin acts in the tenant it names

# -- the audit log (docs/audit.md) ------------------------------------------------
# One page of GET /api/v1/audit: the default and the most a caller may ask for (an
# export, format=csv|jsonl, streams every matching row in batches of AUDIT_EXPORT_BATCH).
AUDIT_PAGE_DEFAULT = 100
AUDIT_PAGE_MAX = 10_000
AUDIT_EXPORT_BATCH = 1000
# The longest filter value (actor, action, object) the API takes.
AUDIT_FILTER_MAX = 200
# Refused calls by no known caller (a bad or missing token, a dashboard form without a
# session) are audited as actor "unknown" at most this many times per window across the
# server; past it they are counted and the next entry written says how many were not:
# a flood of bad tokens cannot fill the disk, and is still seen.
AUDIT_UNKNOWN_LIMIT = 60
AUDIT_UNKNOWN_WINDOW = 60.0
# Rows per page of the dashboard's audit page.
DASHBOARD_AUDIT_ROWS = 50

# -- server processes and the leader (server/cluster.py, issue 16) ------------------
# Each process beats this often; the leader is found within one beat of the last one's
# death (PostgreSQL drops a dead session's advisory lock at once).
SERVER_HEARTBEAT = 5.0
# A process silent for this many beats is shown as lost.
SERVER_LOST_AFTER_BEATS = 3
# ... and after this many it is gone: the tasks its embedded worker ran fail (that worker
# died with it) instead of waiting out WORKER_HEARTBEAT_TIMEOUT. Twice the "lost" mark, so
# a process whose beats were only slowed (a busy database) is not taken for dead.
SERVER_GONE_AFTER_BEATS = 6
# Rows of processes stopped or lost longer ago than this are pruned by the leader.
SERVER_PROCESS_KEEP = 86_400.0
# The PostgreSQL advisory lock key the leader holds (any constant 64-bit number).
LEADER_LOCK_KEY = 0x7461736B666C6565  # "taskflee"

# -- several server processes on PostgreSQL (server/hints.py, server/fleet_load.py) --
# A process refused an exchange from a computer or relay it does not know (or whose
# secret it does not match) reloads that row at most this often per id.
FLEET_RELOAD_MIN_INTERVAL = 1.0
# The LISTEN/NOTIFY channel of has-work and fleet-change hints between processes.
HINTS_CHANNEL = "taskfleet_hints"
# The hints listener's connection is checked this often (a NOTIFY to itself) ...
HINTS_CHECK_INTERVAL = 10.0
# ... and reconnected when that is not heard back within this many seconds.
HINTS_CHECK_TIMEOUT = 3.0
# Waits between attempts to reconnect the listener (doubling up to the second).
HINTS_RETRY = (0.5, 10.0)
# NOTIFY payloads are limited to 8000 bytes: ids are split into payloads of at most this.
HINTS_PAYLOAD_MAX = 7000
# More computers than this in one flush: the hint says "all" (every process looks once).
HINTS_ALL_OVER = 20_000
# The application_name of the listener's session (pg_stat_activity), with the pid.
HINTS_APPLICATION = "taskfleet-hints"
# Seconds: a computer (or relay) whose exchange a process answered this recently may
# have been told "nothing" while a has-work hint was on its way to that process; on
# the hint it is tickled again (the leader sends it after its per-computer interval).
RETICKLE_WINDOW = 5.0

# While it leads, the leader scans the database this often for work other processes
# persisted (requests with a lifecycle, schedules, server tasks): server/cluster.py.
LEADER_CATCH_UP = 1.0
# ... and at once when another process tells it it persisted server tasks (a hint),
# but not more often than this: each catch-up reads every open task.
LEADER_HINT_GAP = 0.2
# The catch-up scan looks back this far past its last scan (commit order is not id
# order, and the hosts' clocks differ a little).
LEADER_CATCH_UP_OVERLAP = 60.0
