"""The coordinator daemon's ``onboard.*`` and ``tokens.*`` methods: what `lab onboard` and
`lab token` need from the coordinator when they run in a connected home (`lab server connect`, or
the laptop after `lab server migrate`). The SSH work, the BMC and the display stay in the CLI
(coordinator/onboarding.py ``RemoteOnboarding``).

Certificates with the ``admin`` role only, checked first for every method (default deny); every
write is audited with the admin certificate's name (``cert:NAME``). A join token leaves the daemon
only in the reply to ``onboard.token`` / ``tokens.create`` (over Noise, to the admin), and is never
logged or audited. Replies ``{"result": …, "warnings": [...]}`` like ``engine.*``:

* ``onboard.status {name?, labels?, image?}`` → ``{server, endpoint, pxe, image_family}``: the
  server as ``{provider, labels, enrolled_at, facts}`` (None when absent), the daemon's advertised
  endpoint, its boot services (``{interface, address, mode, pool}`` from ``pxe:``, None without),
  the image's OS family; unknown labels or image are refused;
* ``onboard.register {name, provider, labels, environment, region}`` → ``{}``;
* ``onboard.token {name, labels, environment, region, ttl}`` → ``{token, expires_at}`` (older unused
  tokens of the server revoked first);
* ``onboard.allow {name, mac, image, labels, environment, region, wait_s, disk_gb, coordinator}`` →
  ``{expires_at}``: token minted here and written into the machine's onboarding record in the
  daemon's ``pxe/nodes`` (its boot services serve it);
* ``onboard.record {name, mac, stage, state, history, step, expires_at}`` → ``{}``: the stage record;
* ``onboard.audit {name, action, detail}`` → ``{}``: ``onboard.*`` actions only;
* ``tokens.create {name, labels, environment, region, ttl}`` → ``{token, record}``;
  ``tokens.list`` → ``{tokens}``; ``tokens.revoke {name}`` → ``{count}``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Final

from lab.common.errors import LabError, UsageError

__all__ = ["METHODS", "handle"]

METHODS: Final = frozenset({
    "onboard.status", "onboard.register", "onboard.token", "onboard.allow", "onboard.record", "onboard.audit",
    "tokens.create", "tokens.list", "tokens.revoke",
})  # fmt: skip
PROVIDERS: Final = ("ssh", "baremetal")
STATES: Final = ("running", "failed", "timed-out")
MAX_WAIT_S: Final = 7 * 24 * 3600 - 3600


def _text(body: dict[str, Any], key: str, *, optional: bool = False, limit: int = 255) -> str | None:
    v = body.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v or len(v) > limit:
        raise UsageError(f"{key} must be {'a string' if not optional else 'a string or null'}")
    return v


def _labels(body: dict[str, Any], key: str = "labels") -> list[str]:
    v = body.get(key) or []
    if not isinstance(v, list) or len(v) > 256 or not all(isinstance(x, str) and len(x) <= 255 for x in v):
        raise UsageError(f"{key} must be a list of strings")
    return v


def _number(body: dict[str, Any], key: str, low: float, high: float, *, optional: bool = False) -> float | None:
    v = body.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise UsageError(f"{key} must be a number from {low:g} to {high:g}")
    return float(v)


def _pxe_info(home: Any) -> dict[str, Any] | None:
    from lab.coordinator.pxe.config import load_pxe_config

    cfg = load_pxe_config(home)
    if cfg is None:
        return None
    try:
        address = cfg.address or cfg.options().address
    except LabError:
        address = None
    return {"interface": cfg.interface, "address": address, "mode": cfg.mode, "pool": cfg.pool,
            "images_dir": str(cfg.images_dir) if cfg.images_dir else None}


def _image_family(home: Any, image: str) -> str:
    import pathlib

    from lab.coordinator.pxe.images import ImageStore

    pxe = _pxe_info(home)
    root = pathlib.Path(pxe["images_dir"]) if pxe and pxe.get("images_dir") else home / "pxe" / "images"
    return ImageStore(root).get(image).family


async def handle(coordinator: Any, peer: Any, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """One ``onboard.*`` / ``tokens.*`` request on the daemon's engine and home."""
    from lab.coordinator import onboarding, tokens
    from lab.coordinator.enrollment import log_event

    engine = coordinator.operator_engine(peer, method, METHODS)
    state, home, actor = engine.state, engine.paths.home, f"cert:{peer.name}"
    labels = _labels(body)
    if labels and method in ("onboard.status", "onboard.register", "onboard.token", "onboard.allow", "tokens.create"):
        engine._check_labels(labels)
    result: dict[str, Any] = {}
    subject: str | None = None
    if method == "onboard.status":
        name = _text(body, "name", optional=True)
        server = None
        if name is not None:
            try:
                server = onboarding.server_view(state.get_server(name))
            except LabError:
                server = None
        image = _text(body, "image", optional=True)
        result = {"server": server, "endpoint": coordinator.enrollment.endpoint, "pxe": _pxe_info(home),
                  "image_family": _image_family(home, image) if image is not None else None}
    elif method == "onboard.register":
        subject = _text(body, "name")
        provider = _text(body, "provider")
        if provider not in PROVIDERS:
            raise UsageError(f"provider must be one of {', '.join(PROVIDERS)}")
        onboarding.register_server(state, subject, provider, labels, _text(body, "environment", optional=True),
                                   _text(body, "region", optional=True), actor=actor)
    elif method in ("onboard.token", "tokens.create"):
        subject = _text(body, "name")
        env, region = _text(body, "environment", optional=True), _text(body, "region", optional=True)
        fpr = onboarding._ca_fingerprint(home)
        if method == "onboard.token":
            ttl = _number(body, "ttl", 1, tokens.MAX_TTL)
            text, expires = onboarding.mint_for_onboarding(state, fpr, subject, labels, env, region, ttl, actor=actor)
            result = {"token": text, "expires_at": expires}
        else:
            ttl = int(_number(body, "ttl", 1, tokens.MAX_TTL))
            with state.transaction():
                text, rec = tokens.create_token(state, fpr, subject, labels, environment=env, region=region, ttl=ttl)
                state.audit("token.create", subject, {"labels": labels, "environment": env, "region": region,
                                                      "expires_at": rec.expires_at}, actor=actor)
            result = {"token": text, "record": tokens.token_record(rec, time.time())}
    elif method == "onboard.allow":
        from lab.coordinator.pxe.registry import normalize_mac

        subject = _text(body, "name")
        image = _text(body, "image")
        _image_family(home, image)  # registered here, or NotFound before anything is written
        disk = _number(body, "disk_gb", 1, 1 << 20, optional=True)
        result = {"expires_at": onboarding.allow_baremetal(
            state, home, onboarding._ca_fingerprint(home), subject, mac=normalize_mac(_text(body, "mac")), image=image,
            labels=labels, environment=_text(body, "environment", optional=True), region=_text(body, "region", optional=True),
            wait_s=_number(body, "wait_s", 1, MAX_WAIT_S), disk_gb=int(disk) if disk is not None else None,
            coordinator=_text(body, "coordinator") or "", actor=actor)}
    elif method == "onboard.record":
        from lab.coordinator.providers import baremetal as bm
        from lab.coordinator.pxe.registry import normalize_mac

        subject = _text(body, "name")
        stage, st = _text(body, "stage"), _text(body, "state")
        if stage not in {s.key for s in bm.STAGES} or st not in STATES:
            raise UsageError(f"stage must be one of {', '.join(s.key for s in bm.STAGES)}; state one of {', '.join(STATES)}")
        history = _labels(body, "history")
        expires = _number(body, "expires_at", 0, 1e12, optional=True)
        onboarding.record_stage(state, subject, normalize_mac(_text(body, "mac")), stage, state_=st, history=history,
                                step=_text(body, "step", optional=True), expires_at=expires)
    elif method == "onboard.audit":
        subject = _text(body, "name")
        action = _text(body, "action", limit=64)
        detail = body.get("detail")
        if not action.startswith("onboard.") or not isinstance(detail, dict):
            raise UsageError("onboard.audit records onboard.* actions with a detail mapping")
        state.audit(action, subject, detail, actor=actor)
    elif method == "tokens.list":
        result = {"tokens": tokens.list_tokens(state, time.time())}
    else:  # tokens.revoke
        subject = _text(body, "name")
        with state.transaction():
            count = tokens.revoke_tokens(state, subject)
            state.audit("token.revoke", subject, {"count": count}, actor=actor)
        result = {"count": count}
    if subject is not None:
        log_event(logging.INFO, "api.write", name=peer.name, method=method, subject=subject)
    return {"result": json.loads(json.dumps(result)), "warnings": list(engine.warnings)}
