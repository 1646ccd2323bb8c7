"""The Date header the data path writes matches the stdlib's IMF-fixdate."""

from __future__ import annotations

from email.utils import formatdate

from hypothesis import given
from hypothesis import strategies as st

from gateway.datapath.shared import http_date


@given(st.floats(min_value=0, max_value=253402300799))  # up to 9999-12-31
def test_http_date_is_what_email_utils_writes(ts: float) -> None:
    assert http_date(ts).decode() == formatdate(ts, usegmt=True)
