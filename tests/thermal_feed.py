"""A thermal ladder fed one reading a second, for the thermal policy's tests.

    feed = Feed()
    feed(81, 81, 81)                                 # three readings, 1 s apart
    feed(70, 70, reasons=SW_THERMAL_SLOWDOWN)        # the same bits on each reading
    feed((70, SW_THERMAL_SLOWDOWN), 70)              # or bits per reading
"""

from __future__ import annotations

from nkat.supervisor.policies.thermal import (
    ThermalAction,
    ThermalLadder,
    ThermalSettings,
    ThermalState,
)

S = ThermalSettings()  # target 75, throttle 80, max 83, emergency 85, 3 samples, dwell 60

Reading = float | None | tuple[float | None, int]


class Feed:
    """Feeds readings to a ladder and returns the actions they caused (all are kept in
    ``actions`` too)."""

    def __init__(self, ladder: ThermalLadder | None = None) -> None:
        self.ladder = ladder or ThermalLadder(S)
        self.t = 0.0
        self.actions: list[ThermalAction] = []

    def __call__(self, *readings: Reading, margin: float | None = None,
                 reasons: int | None = None) -> list[ThermalAction]:
        out = []
        for reading in readings:
            temp, bits = reading if isinstance(reading, tuple) else (reading, reasons)
            self.t += 1.0
            action = self.ladder.update(self.t, temp, margin=margin, reasons=bits)
            if action is not None:
                out.append(action)
        self.actions += out
        return out

    @property
    def state(self) -> ThermalState:
        return self.ladder.state
