"""What a measurement says about the machine it was taken on: the CPU's name and its core
count. Standard library only, so that both the export side (latency) and the neutral latency
table can name the machine the same way."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU's model name as the OS reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cores() -> int:
    """Logical CPUs of the machine (not this process's affinity, which a scheduler may narrow
    per run: a latency table belongs to the machine)."""
    return os.cpu_count() or 1


def this_machine() -> dict:
    return {"cpu": cpu_name(), "cores": cores()}


def runtime_version(runtime: str) -> str:
    """The installed version of "onnxruntime" or "openvino" (imported only when asked: a
    runtime that is not installed raises ImportError)."""
    if runtime == "openvino":
        import openvino

        return openvino.__version__
    import onnxruntime

    return onnxruntime.__version__
