"""The data path: client connections, exchanges, upstream connections and
their pools, accounting, the /health answer.

asyncio protocols on uvloop with llhttp, driven by ``gateway.policy``'s
decisions.  Must never import aiohttp, prometheus-client or the process
layer: worker processes load only this, ``policy``, ``config`` and
``telemetry``.
"""
