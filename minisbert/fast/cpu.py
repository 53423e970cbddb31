"""What kind of CPU this is, as far as minisbert's speed depends on it.

Three things decide which mode is fast on a CPU: the fp32 GEMM kernels torch picks (its "capability":
AVX2, AVX512, ...), whether bf16 has native instructions (AVX512_BF16 or AMX-BF16; without them
oneDNN emulates bf16 and it is several times slower than fp32), and which int8 dot products exist
(AVX512_VNNI / AVX_VNNI, AMX-INT8). ``cpu_kind()`` reads them once: the flags from
``/proc/cpuinfo`` on Linux, torch's capability everywhere (elsewhere the flags are unknown and the
advice falls back to the capability). the fast path warns from it, ``inspect`` and ``scripts/bench.py``
print it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from minisbert.errors import MinisbertError
from minisbert.io.files import read_text

# /proc/cpuinfo flag -> the name Intel's and AMD's manuals use, in the order shown.
FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512_BF16", "avx512_vnni": "AVX512_VNNI",
         "avx_vnni": "AVX_VNNI", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuKind:
    model_name: str  # "Intel(R) Xeon(R) Processor", "AMD EPYC 9R14 96-Core Processor", or "unknown"
    family: int | None  # cpu family / model from /proc/cpuinfo (None elsewhere)
    model: int | None
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    flags: tuple[str, ...] | None  # the speed-relevant /proc/cpuinfo flags present (keys of FLAGS); None: unknown

    @property
    def native_bf16(self) -> bool | None:
        """Whether bf16 GEMMs run natively (AVX512_BF16 or AMX-BF16); None when the flags are unknown."""
        return None if self.flags is None else bool({"avx512_bf16", "amx_bf16"} & set(self.flags))

    def describe(self) -> str:
        """One line: model, family/model, the speed-relevant flags."""
        where = f" (family {self.family} model {self.model})" if self.family is not None else ""
        flags = ", ".join(FLAGS[f] for f in self.flags) if self.flags is not None else f"torch: {self.capability}"
        return f"{self.model_name}{where}: {flags or 'no AVX2'}"

    def bf16_advice(self) -> str:
        """What bf16 means for speed on this CPU, in one sentence."""
        if self.native_bf16:
            return "bf16 is native here (about twice the fp32 GEMM peak; inexact, cosine >= 0.9998 to fp32)"
        if self.native_bf16 is None:
            return "bf16 speed unknown (no /proc/cpuinfo flags); it is native only with AVX512_BF16 or AMX"
        return ("bf16 is emulated here (no AVX512_BF16 or AMX): several times slower than fp32; "
                "for speed beyond fp32 use int8 (inexact: quantize='int8', or --quantize int8)")


def parse_cpuinfo(text: str) -> tuple[str, int | None, int | None, tuple[str, ...]]:
    """(model name, family, model, speed-relevant flags) of the first processor in /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    number = lambda key: int(fields[key]) if fields.get(key, "").isdigit() else None
    present = set(fields.get("flags", "").split())
    return (fields.get("model name", "unknown"), number("cpu family"), number("model"),
            tuple(f for f in FLAGS if f in present))


@functools.cache
def cpu_kind() -> CpuKind:
    """This machine's CPU (read once per process)."""
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        name, family, model, flags = parse_cpuinfo(read_text(CPUINFO, "CPU description", limit=4 << 20))
    except (MinisbertError, OSError):  # not Linux, or /proc not mounted
        return CpuKind("unknown", None, None, capability, None)
    return CpuKind(name, family, model, capability, flags)
