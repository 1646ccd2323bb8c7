"""Configs with several backends per route, for the socket tiers: the two
routes of ``tests.conftest.config_text`` (remote_write, otlp_traces), each
with an ``upstreams`` list and whatever keys a test adds to its table, and
the credentials that give every route an in-scope token.

Knows TOML and the config's key names, nothing of the gateway's code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from tests.support.routes import THREE_CREDENTIALS

__all__ = ["Entry", "backends_config", "toml_list"]

# A backend as a test writes it: a URL, or the table form's keys.
Entry = str | Mapping[str, object]


def _value(value: object) -> str:
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return toml_list(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings and numbers: JSON's spelling is TOML's


def toml_list(values: Sequence[object]) -> str:
    return "[" + ", ".join(_value(v) for v in values) + "]"


def _route(name: str, path: str, protocol: str, entries: Sequence[Entry], keys: str) -> str:
    return f"""
[[routes]]
name = "{name}"
path = "{path}"
protocol = "{protocol}"
upstreams = {toml_list(entries)}
{keys}
"""


def backends_config(
    rw: Sequence[Entry],
    otlp: Sequence[Entry] | None = None,
    *,
    rw_keys: str = "",
    otlp_keys: str = "",
    upstream: str = "",
    server: str = "",
    log: str = 'level = "debug"',
    credentials: str = THREE_CREDENTIALS,
) -> str:
    """remote_write over ``rw``, otlp_traces over ``otlp`` (default: the
    same hosts with /v1/traces), each route's table extended by its keys
    (``balance = "round_robin"``, a ``[routes.health_check]`` table, …)."""
    if otlp is None:
        otlp = [
            e.replace("/api/v1/write", "/v1/traces")
            if isinstance(e, str)
            else {**e, "url": str(e["url"]).replace("/api/v1/write", "/v1/traces")}
            for e in rw
        ]
    return f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server}

[upstream]
{upstream}

[log]
{log}
{_route("remote_write", "/api/v1/write", "prometheus-remote-write", rw, rw_keys)}
{_route("otlp_traces", "/v1/traces", "otlp-http", otlp, otlp_keys)}
{credentials}
"""
