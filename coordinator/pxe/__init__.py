"""Embedded network boot: DHCP (full or proxy), TFTP, and the HTTP boot service.

Protocol cores (``dhcp.DhcpServer``, ``tftp.TftpTransfer``) are sans-IO; trio lives only in
the ``serve_*`` edges. Every service answers only machines on the onboarding ``Allowlist``.
"""

from lab.coordinator.pxe.registry import Allowlist, OnboardingNode, normalize_mac

__all__ = ["Allowlist", "OnboardingNode", "normalize_mac"]
