"""Providers: how a machine becomes a lab node. ``ssh`` (an existing OS, over SSH) so far.

``ssh`` holds the pure plan/render/commands and the apply steps; ``_asyncssh`` is the only
module that touches asyncssh (a worker thread with its own asyncio loop); ``_known_hosts`` is
the host key policy.
"""
