"""The HTTP layer: one router per noun, the agent endpoints and the exchange fast path.

``server/app.py`` assembles them (``create_app``); routers call the noun modules
of ``server/`` through the runtime's writer and read engine and hold no rules.
"""
