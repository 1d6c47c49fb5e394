"""The agent's typed activities (SPEC 2.3): how each type runs on this computer.

Contract: ``registry.handler`` maps each typed activity (``domain/actions``) to an
:class:`AgentAction`: ``run`` does the work through ``ActionContext.run``, which
starts the system's own tools as argv (never a shell) in a process group the
agent tracks like a script's (a cancel stops it, the scrubber sees its PID), and
returns an :class:`ActionOutcome` whose line says what changed; ``unsupported``
says why this computer cannot run the type (a tool it lacks), or None.
Parameters reach a handler already validated by ``domain/actions`` (the agent
checks them again when the operation arrives). Each family's handlers live in
their own module; ``registry.py`` finds them, loading a family only when one
of its types is needed (every module loaded costs memory in every agent).
``context.py`` holds what a handler is given. This module imports nothing.
"""
