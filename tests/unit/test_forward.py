"""policy.forward and the targets built from it: a client query argument is
read as VictoriaMetrics (Go's url.ParseQuery) reads it, so no spelling of a
name the gateway sends gets through; pinned header fields replace the
client's copies in every spelling; the pinned labels come last."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest

from gateway.policy.forward import EXTRA_LABEL, PinnedHeaders, QueryFilter, arg_name, label_arg
from gateway.policy.routing import make_target, upstream_of


@pytest.mark.parametrize(
    ("pair", "name"),
    [
        (b"extra_label=tenant=evil", b"extra_label"),
        (b"extra_label", b"extra_label"),
        (b"EXTRA_LABEL=tenant=evil", b"extra_label"),
        (b"Extra_Label=tenant=evil", b"extra_label"),
        (b"extra%5Flabel=tenant=evil", b"extra_label"),
        (b"extra%5flabel=tenant=evil", b"extra_label"),
        (b"%65%78%74%72%61%5f%6c%61%62%65%6c=x", b"extra_label"),
        (
            b"extra_label%3Dtenant=evil",
            b"extra_label=tenant",
        ),  # "=" decoded: a name Go never matches
        (b"extra+label=x", b"extra label"),
        # Decoded once, as Go does: a doubly encoded name is another name.
        (b"extra%255Flabel=x", b"extra%5flabel"),
        # Unreadable the Go way (Go skips the pair) or splittable by older parsers.
        (b"extra_label%=x", None),
        (b"extra_label%4=x", None),
        (b"extra_label%zz=x", None),
        (b"a=b;extra_label=tenant=evil", None),
        (b"extra_label=tenant=evil;", None),
    ],
)
def test_arg_name_decodes_like_go(pair: bytes, name: bytes | None) -> None:
    assert arg_name(pair) == name


PINNED = QueryFilter(frozenset({EXTRA_LABEL}), keep_rest=True)
DROP_ALL = QueryFilter(frozenset({EXTRA_LABEL}), keep_rest=False)


@pytest.mark.parametrize(
    ("query_filter", "query", "result"),
    [
        (PINNED, b"extra_label=tenant=evil", (b"", 1, 0)),
        (PINNED, b"extra_label=tenant%3Devil", (b"", 1, 0)),
        (PINNED, b"extra%5Flabel=tenant=evil", (b"", 1, 0)),
        (PINNED, b"EXTRA_LABEL=tenant=evil", (b"", 1, 0)),
        (PINNED, b"extra_label=env=prod", (b"", 1, 0)),  # vmauth's rule: the name is ours
        (
            PINNED,
            b"foo=1&extra_label=tenant=evil&bar=%2F&extra_label=tenant=evil2",
            (b"foo=1&bar=%2F", 2, 0),
        ),
        (PINNED, b"foo=1;extra_label=tenant=evil", (b"", 0, 1)),
        (PINNED, b"extra_label%=tenant=evil&x=1", (b"x=1", 0, 1)),
        (PINNED, b"a&&b&", (b"a&b", 0, 0)),
        (PINNED, b"=x&a=1", (b"=x&a=1", 0, 0)),
        (DROP_ALL, b"foo=1&extra_label=tenant=evil", (b"", 1, 1)),
        (DROP_ALL, b"&", (b"", 0, 0)),
    ],
)
def test_query_filter(
    query_filter: QueryFilter, query: bytes, result: tuple[bytes, int, int]
) -> None:
    assert query_filter.apply(query) == result


SPELLINGS = [
    b"extra_label",
    b"EXTRA_LABEL",
    b"extra%5Flabel",
    b"extra%5flabel",
    b"%65xtra_label",
    b"extra_label%",
    b"extra_label;x",
    b"extra+label",
    b"extra%2Blabel",
    b"extra_label%00",
]


@pytest.mark.parametrize("name", SPELLINGS)
@pytest.mark.parametrize("value", [b"tenant=evil", b"tenant%3Devil", b"%74enant=evil", b""])
def test_nothing_kept_reads_as_extra_label(name: bytes, value: bytes) -> None:
    """Whatever is kept, a query parser that decodes like Go's finds no
    extra_label in it (Python's parse_qsl decodes the same way)."""
    query = b"a=1&" + name + b"=" + value + b"&b=2"
    kept, _, _ = PINNED.apply(query)
    names = [k for k, _ in parse_qsl(kept.decode(), keep_blank_values=True)]
    assert "extra_label" not in names
    assert {"a", "b"} <= set(names)


def test_label_args_are_percent_encoded() -> None:
    assert label_arg("tenant", "team-a") == b"extra_label=tenant%3Dteam-a"
    assert label_arg("team", "a&b=c d") == b"extra_label=team%3Da%26b%3Dc%20d"
    assert label_arg("city", "Zürich") == b"extra_label=city%3DZ%C3%BCrich"


def test_target_puts_pinned_labels_last() -> None:
    up = upstream_of("http://vm:8428/api/v1/write?dc=eu")
    target = make_target(up, True, label_arg("tenant", "a"))
    assert not target.plain
    assert target.bare == b"/api/v1/write?dc=eu&extra_label=tenant%3Da"
    assert target.filtered(b"") == (target.bare, 0, 0)
    assert target.filtered(b"x=1&extra_label=tenant=evil&DC=us") == (
        b"/api/v1/write?dc=eu&x=1&extra_label=tenant%3Da",
        1,
        1,
    )


def test_plain_target_appends_the_query_as_sent() -> None:
    target = make_target(upstream_of("http://vm:8428/api/v1/write"), True)
    assert target.plain
    assert target.render(b"") == b"/api/v1/write"
    assert target.render(b"extra_label=a%3Db&x") == b"/api/v1/write?extra_label=a%3Db&x"


def test_route_that_drops_the_query() -> None:
    target = make_target(upstream_of("http://vm:8428/api/v1/write"), False)
    assert not target.plain
    assert target.filtered(b"x=1&y=2") == (b"/api/v1/write", 0, 2)


def _fields(*pairs: tuple[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = []
    for name, value in pairs:
        out += (name, b": ", value, b"\r\n")
    return out


def test_pinned_headers_replace_every_spelling() -> None:
    pinned = PinnedHeaders([("X-Scope-OrgID", "team-a")])
    forward = _fields(
        (b"User-Agent", b"vmagent"),
        (b"X-Scope-OrgID", b"evil"),
        (b"x-scope-orgid", b"evil"),
        (b"X-SCOPE-ORGID", b"evil"),
        (b"X_Scope_OrgID", b"evil"),
        (b"x-scope_orgid", b"evil"),
        (b"X-Scope-OrgIDs", b"kept"),
        (b"X-Request-Id", b"rid"),
    )
    out, dropped = pinned.apply(forward)
    assert dropped == 5
    assert b"".join(out) == (
        b"User-Agent: vmagent\r\nX-Scope-OrgIDs: kept\r\nX-Request-Id: rid\r\n"
        b"X-Scope-OrgID: team-a\r\n"
    )
