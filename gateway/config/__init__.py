"""Configuration: the TOML schema, credentials resolved to digests and keys,
loading with key-path errors, and the TLS material the config names.

Owns everything that turns files into frozen ``Settings``.  Must not import
sockets, the data path, metrics or logging: a config is validated the same
way by ``check-config``, at start and on reload.
"""
