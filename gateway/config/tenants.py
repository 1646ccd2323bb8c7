"""What ``check-config`` says about tenancy: per credential and route, the
labels, headers and backend it forwards with, and a warning where
credentials without any tenancy setting share a route that others keep
apart (their data would mix, and look like nobody's).

Reads validated ``Settings`` only; prints nothing itself.
"""

from __future__ import annotations

from gateway.config.loader import Credential, Settings

__all__ = ["forwarding_lines", "tenancy_warnings"]


def _pinned(cred: Credential, route: str, protocol: str) -> tuple[list[str], list[str], str | None]:
    """(labels, headers, backend URLs) the credential forwards with on a route."""
    fwd = cred.forward
    if fwd is None:
        return [], [], None
    labels = []
    if protocol == "prometheus-remote-write":
        labels = [f'{n}="{v}"' for n, v in fwd.extra_labels.items()]
    headers = [f"{n}: {v}" for n, v in fwd.headers.items()]
    return labels, headers, ", ".join(fwd.upstream_urls(route)) or None


def forwarding_lines(settings: Settings) -> list[str]:
    lines = ["forwarding (credential → route: extra labels; headers; backend):"]
    for cred in settings.credentials:
        for route in settings.routes:
            if route.name not in cred.routes:
                continue
            labels, headers, url = _pinned(cred, route.name, route.protocol)
            query = "" if route.query == "pass" else " (client query dropped)"
            lines.append(
                f"  {cred.name} → {route.name}: "
                f"{', '.join(labels) or '-'}; {', '.join(headers) or '-'}; "
                f"{url or 'the route upstream'}{query}"
            )
    return lines


def tenancy_warnings(settings: Settings) -> list[str]:
    out = []
    for route in settings.routes:
        plain: list[str] = []
        kept_apart: list[str] = []
        for cred in settings.credentials:
            if route.name not in cred.routes:
                continue
            labels, headers, url = _pinned(cred, route.name, route.protocol)
            (kept_apart if labels or headers or url else plain).append(cred.name)
        if len(plain) >= 2 and kept_apart:
            out.append(
                f"route {route.name}: credentials {', '.join(plain)} share it without any "
                f"[credentials.forward] setting while {', '.join(kept_apart)} "
                f"{'has' if len(kept_apart) == 1 else 'have'} one: their data is not kept apart"
            )
    return out
