"""Helpers shared by the socket tiers (functional, hostile, lifecycle,
integration, soak, deploy), one module per job:

- ``wire``: HTTP/1.1 as bytes: request builders (``request``, the
  functional tier's ``request_bytes``, ``chunked``) and the strict parsers
  of a request and a response (``parse_request``, ``parse_response``),
  independent of the llhttp parser the gateway uses.
- ``client``: the raw client (``RawClient``, ``raw_client``,
  ``raw_request``): exact bytes out, every byte in kept, responses read with
  the strict parser.
- ``upstreams``: the raw upstream (``RawUpstream``): records every byte and
  every strictly parsed request; answers per request (``responder``) or per
  connection (behaviours: ``answer_with``, ``hang``, ``reset_after_head``...).
- ``sockets``: loopback sockets that misbehave: RST on close, a refused
  port, a port whose connects hang.
- ``metrics``: the metrics reader (``Metrics``, ``scrape``,
  ``scrape_sync``): a parsed /metrics page with lookups by name and labels.
- ``process``: the gateway as a real process (``GatewayProcess``): its JSON
  log, reloads, /proc memory and descriptors, a stop that kills its group.
- ``routes``: the route cases both protocols run (``ROUTES``), their
  credentials, and ``assert_error_body``.
- ``heads``: request heads parsed in memory by llhttp into a RequestHead.
"""
