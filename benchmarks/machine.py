"""What a benchmark says about the machine it ran on (light: no JAX or PyTorch import)."""


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: on a shared machine they say how quiet a measurement was."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
