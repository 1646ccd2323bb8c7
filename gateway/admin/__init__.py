"""The admin listener: ``/metrics``, ``/livez``, ``/readyz`` (aiohttp) and
the Prometheus exposition of telemetry snapshots.

The only importers of aiohttp and prometheus-client in ``gateway/``.  Reads
snapshots and gauges as plain data; must not import the data path.
"""
