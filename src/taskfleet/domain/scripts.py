"""The execute-script activity: which parameters a request may carry (pure validation).

Contract: ``validate_script_params`` returns the normalised parameters or
raises ``ValueError`` naming the first bad field. The server checks a request
with it before anything is stored; the agent checks again before it runs.
"""

from __future__ import annotations

from typing import Any

from taskfleet.domain.kinds import EXECUTE_SCRIPT as EXECUTE_SCRIPT
from taskfleet.settings import MAX_SCRIPT_TIMEOUT

MAX_SCRIPT_CHARS = 1024 * 1024
# argv as a whole (a command instead of a script): the same bound as a script.
MAX_ARGV_CHARS = MAX_SCRIPT_CHARS
# env as a whole (names and values): Linux's execve takes at most 128 KiB per
# string and about 2 MiB for argv and env together; an operation carries argv
# or script plus env, so this keeps every operation well inside one exchange
# reply (settings.REPLY_MAX_BYTES) even when each character is escaped.
MAX_ENV_CHARS = 256 * 1024
MAX_NAME_CHARS = 4096  # interpreter, cwd, user: a path or a name (PATH_MAX)
MAX_TIMEOUT = MAX_SCRIPT_TIMEOUT


def validate_timeout(timeout: Any) -> float:
    if type(timeout) not in (int, float) or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}]")
    return float(timeout)


def validate_script_params(params: Any, *, default_cap: int, max_cap: int) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise ValueError("params must be an object")
    unknown = set(params) - {"argv", "script", "interpreter", "env", "cwd", "user", "output_cap"}
    if unknown:
        raise ValueError(f"unknown script parameter(s): {', '.join(sorted(unknown))}")
    argv, script = params.get("argv"), params.get("script")
    if (argv is None) == (script is None):
        raise ValueError("give exactly one of argv (a command) or script (a script text)")
    out = _command_params(params, argv, script)
    env = params.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError("env must map variable names to strings")
    size = sum(len(k) + len(v) for k, v in env.items())
    if size > MAX_ENV_CHARS:
        raise ValueError(f"env is {size} characters, the limit is {MAX_ENV_CHARS}")
    out["env"] = env
    for key in ("cwd", "user"):
        value = params.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{key} must be a non-empty string")
        if value is not None:
            _check_name(key, value)
        out[key] = value
    cap = params.get("output_cap", default_cap)
    if type(cap) is not int or not 0 <= cap <= max_cap:
        raise ValueError(f"output_cap must be 0..{max_cap} bytes")
    out["output_cap"] = cap
    return out


def _command_params(params: dict[str, Any], argv: Any, script: Any) -> dict[str, Any]:
    """The command part: argv, or script text with its interpreter."""
    out: dict[str, Any] = {}
    if argv is not None:
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, str) for a in argv)
            or not argv[0]
        ):
            raise ValueError("argv must be a non-empty list of strings")
        size = sum(len(a) for a in argv)
        if size > MAX_ARGV_CHARS:
            raise ValueError(f"argv is {size} characters, the limit is {MAX_ARGV_CHARS}")
        out["argv"] = argv
    else:
        if not isinstance(script, str) or not script.strip():
            raise ValueError("script must be a non-empty text")
        if len(script) > MAX_SCRIPT_CHARS:
            raise ValueError(f"script is {len(script)} characters, the limit is {MAX_SCRIPT_CHARS}")
        out["script"] = script
        interpreter = params.get("interpreter", "/bin/sh")
        if not isinstance(interpreter, str) or not interpreter:
            raise ValueError("interpreter must be a non-empty string")
        _check_name("interpreter", interpreter)
        out["interpreter"] = interpreter
    return out


def _check_name(key: str, value: str) -> None:
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{key} is {len(value)} characters, the limit is {MAX_NAME_CHARS}")


def policy_refusal(policy: dict[str, Any] | None, params: dict[str, Any]) -> str | None:
    """Why an agent with this policy would refuse the script, or None if it would run it."""
    # Exact checks only: a policy stored before the server validated policies may
    # hold anything ("users": 5, "users": "root"); it allows nothing it does not list.
    if not isinstance(policy, dict) or policy.get("scripts") is not True:
        return "scripts are disabled in its configuration"
    user = params.get("user")
    users = policy.get("users")
    if user is not None and not (isinstance(users, list) and user in users):
        return f"user {user!r} is not in its allowed script users"
    return None
