"""The one interface every BMC driver implements."""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable


class PowerState(enum.Enum):
    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"


class PowerController(abc.ABC):
    """Synchronous: the CLI calls it between render and serve. Errors: AuthError (credentials),
    TransportError (BMC unreachable), RemoteProtocolError (BMC answered nonsense)."""

    @abc.abstractmethod
    def state(self) -> PowerState: ...

    @abc.abstractmethod
    def on(self) -> None: ...

    @abc.abstractmethod
    def off(self) -> None:
        """Hard power off (the machine is being reinstalled; there is nothing to shut down)."""

    @abc.abstractmethod
    def cycle(self) -> None:
        """Power cycle; a machine that is off is simply powered on."""

    @abc.abstractmethod
    def set_next_boot_pxe(self, *, uefi: bool = False) -> None:
        """Boot from the network once, on the next boot."""

    def wait_for(self, want: PowerState, *, timeout: float = 60.0, interval: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> bool:
        """Poll ``state()`` until it is ``want`` (BMC actions are not immediate); False on timeout."""
        deadline = clock() + timeout
        while True:
            if self.state() == want:
                return True
            if clock() >= deadline:
                return False
            sleep(interval)
