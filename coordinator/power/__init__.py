"""Remote power control of bare metal behind one interface: IPMI (ipmitool) and Redfish (httpx).

    ctl = IpmiPower(host, user, password_file=...)      or  RedfishPower(url, user, password)
    ctl.set_next_boot_pxe(); ctl.on(); ctl.state() -> PowerState.ON
"""

from lab.coordinator.power.base import PowerController, PowerState

__all__ = ["PowerController", "PowerState"]
