"""The names of the two activity types that are not typed activities (``domain/actions``).

Their rules live in ``domain/scripts.py`` and ``domain/jobs.py``, which re-export
these; code that only tells the kinds apart imports them from here and loads
neither (the agent loads the job code only when a job arrives: agent memory).
"""

from __future__ import annotations

EXECUTE_SCRIPT = "execute-script"
JOB = "job"  # the activity (and operation) type of a job
