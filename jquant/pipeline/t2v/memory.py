"""Resident and peak bytes per pipeline component (XLA's memory analysis of each compiled call)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ComponentMemory:
    """One component: the bytes its weights hold, and the peak of its largest call (XLA's memory
    analysis of the compiled call: arguments + outputs + temporaries; None where not measured)."""

    name: str
    precision: str
    resident_bytes: int
    peak_bytes: int | None = None
    host: bool = False  #: weights kept in host memory, copied to the device for this component's call only

    @property
    def device_bytes(self) -> int:
        """Bytes the weights hold on the device between calls (0 when kept on the host)."""
        return 0 if self.host else self.resident_bytes


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Resident and peak bytes per component of one generation."""

    components: tuple[ComponentMemory, ...]

    @property
    def resident_bytes(self) -> int:
        """Weights held on the device for the whole generation (host-kept components excluded)."""
        return sum(c.device_bytes for c in self.components)

    @property
    def peak_bytes(self) -> int:
        """The device-resident weights plus the largest call's working set beyond them
        (components run one after the other; a host-kept component's weights count only in its
        own call, where the analysis has them as arguments)."""
        extra = [c.peak_bytes - c.device_bytes for c in self.components if c.peak_bytes is not None]
        return self.resident_bytes + max([0, *extra])

    def __str__(self) -> str:
        mib = 2.0**20
        lines = [f"{'component':<16} {'precision':<22} {'weights MiB':>12} {'where':>6} {'peak MiB':>10}"]
        for c in self.components:
            peak = "-" if c.peak_bytes is None else f"{c.peak_bytes / mib:.2f}"
            where = "host" if c.host else "device"
            lines.append(f"{c.name:<16} {c.precision:<22} {c.resident_bytes / mib:>12.2f} {where:>6} {peak:>10}")
        lines.append(
            f"{'pipeline':<16} {'(device-resident)':<22} {self.resident_bytes / mib:>12.2f} {'':>6} "
            f"{self.peak_bytes / mib:>10.2f}"
        )
        return "\n".join(lines)


def compiled_peak(compiled: Any) -> int | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)
