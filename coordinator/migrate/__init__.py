"""Moving the coordinator: `lab server migrate --to NODE` (docs/LIFECYCLE.md, "Moving the coordinator").

The move is *pulled* by the target's agent over its own authenticated Noise session (agents
never listen)::

    lab server migrate ── migrate.plan / migrate.start ──► old coordinator (daemon, or served
         │                                                  in-process in local mode)
         │                 NODE's check-in reply carries {"migrate": {id, listen, advertise}}
         │                 NODE ── migrate.fetch ──► bundle (state.db via the sqlite backup API,
         │                         CA key, CRL, issued certificates, config minus `server:`,
         │                         definitions) — only NODE's current, unrevoked certificate may
         │                 NODE writes AGENT_HOME/coordinator/ (0700, files 0600), supervises
         │                 `lab server run` there, ── migrate.ready {endpoint} ──► old
         ├── verify: the new endpoint answers as coordinator, same CA, same inventory count
         ├── migrate.adopt on the new one: NODE gets the `lab-server` label (the old node loses it)
         ├── switch config.yaml `server:` to the new endpoint
         └── migrate.finish on the old one: from then on every check-in reply carries
             {"coordinator": new, "moved_to": new}; it writes moved.json, announces new in the
             stores (for agents that are away) and stops once every enrolled node was
             redirected, or after the grace period.

From the moment NODE fetched the state the old coordinator is *frozen*: it refuses enrollment,
inventory writes and identity operations (they would be lost), and keeps answering check-ins.
A failure at any step before the config switch aborts the migration (``migrate.abort``): the old
coordinator is unfrozen and stays authoritative; NODE stops and removes what it installed.

The package, one module per side: ``bundle`` (what moves), ``service`` (the old coordinator),
``role`` (the target agent), ``command`` (the CLI), ``announce`` (the CA-signed announcement in the
stores, which reaches agents that missed the redirect); ``_base`` holds what they share.

The pure parts (plan, endpoint choice, bundle build/verify, who may fetch, config switch, the
check-in decisions) are unit-tested in tests/unit/test_migrate.py; the whole move by
tests/integration/test_migrate_cluster.py.
"""

from __future__ import annotations

from lab.coordinator.migrate._base import (
    DEFAULT_GRACE, ENDPOINT_FILE, MOVED_FILE, ORIGIN_FILE, ROLE_DIR, ROLE_FILE, SERVER_LABEL, MigrationFailed,
    choose_endpoint,
)
from lab.coordinator.migrate.bundle import (
    BUNDLE_KIND, Bundle, build_bundle, check_not_moved, config_for_bundle, count_rows, decode_bundle_untrusted,
    encode_bundle, install_bundle, origin_node,
)
from lab.coordinator.migrate.command import render_plan, run_migration, switch_config
from lab.coordinator.migrate.role import CoordinatorRole, on_checkin_reply
from lab.coordinator.migrate.service import MigrationService, Pending, may_fetch

__all__ = [
    "BUNDLE_KIND", "DEFAULT_GRACE", "ENDPOINT_FILE", "MOVED_FILE", "ORIGIN_FILE", "ROLE_DIR", "ROLE_FILE", "SERVER_LABEL",
    "Bundle", "CoordinatorRole", "MigrationFailed", "MigrationService", "Pending",
    "build_bundle", "check_not_moved", "choose_endpoint", "config_for_bundle", "count_rows", "decode_bundle_untrusted",
    "encode_bundle", "install_bundle", "may_fetch", "on_checkin_reply", "origin_node", "render_plan", "run_migration",
    "switch_config",
]
