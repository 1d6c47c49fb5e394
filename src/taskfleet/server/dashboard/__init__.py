"""The web dashboard (issue 14, docs/dashboard.md): server-rendered pages under ``/ui/``.

``routes.py`` holds the pages and actions, ``sessions.py`` the pure session, CSRF and
login-limit rules, ``session_stores.py`` where sessions live (memory or the database);
``templates/`` the Jinja2 pages and ``static/`` the CSS, our script and the one vendored
file (htmx). No rule lives here: pages read through the service layer
and actions call the API's own route functions.
"""

# Pages in modules of their own (ops.py: tasks, jobs, schedules, relays; audit.py) add
# their routes to ``routes.router`` when imported.
from taskfleet.server.dashboard import audit, ops  # noqa: F401
