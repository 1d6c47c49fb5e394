"""The relay process (SPEC 3.3, docs/relays.md): a spool and cache between agents and the server.

``spool.py`` is its durable state, ``http.py`` what agents talk to, ``upstream.py`` the
exchange with the server, ``tickles.py`` the UDP wake-ups both ways, ``main.py`` the process.
"""
