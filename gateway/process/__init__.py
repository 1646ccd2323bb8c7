"""Processes: one serving process (listeners, the deadline sweeper, reload,
drain), the supervisor and its workers, the control channel between them,
sockets, file watching and malloc tuning.

The only layer that binds sockets and starts processes.  Imports the data
path and, lazily and only where an admin listener runs, ``gateway.admin``.
"""
