"""HTTP for the supervisor: the Prometheus endpoint and the read-only status page.

    server   one bounded aiohttp server layer on a single background thread
    access   who may read: the loopback rule and the token
    board    what the page shows, read from a state directory (writes nothing)
    page     the status page's routes, HTML and JSON

aiohttp is imported only by ``server`` and ``page``, and only when an address is asked for.
"""
