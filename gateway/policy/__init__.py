"""Policy: the pure decisions about one request.

Authentication, routing, client addresses, admission limits, header
hygiene, the status table and its pre-rendered answers, the parsed request
head, and ``decide`` (which of them applies, in which order).  Values in,
values out: no sockets, no event loop, no clocks of its own (times are
passed in), no metrics.  Imports only ``gateway.config``.
"""
