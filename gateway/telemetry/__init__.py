"""Telemetry: the gateway's own counters, their snapshots and merge across
workers, and structured logging.

Plain data and cheap additions on the hot path.  Must not import
prometheus-client or aiohttp (rendering is ``gateway.admin``'s job) nor
anything else of the gateway.
"""
