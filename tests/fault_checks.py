"""What the fault tests of several modules share: a command-line run, its one-line error, a folder's snapshot."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(folder) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return out


def environment(devices: int) -> dict[str, str]:
    """This process's environment with conftest's XLA flags asking for `devices` CPU devices instead of 8 (a
    subprocess that needs no mesh compiles its programs for one device, several times faster)."""
    flags = os.environ["XLA_FLAGS"].replace("device_count=8", f"device_count={devices}")
    return {**os.environ, "XLA_FLAGS": flags}


def cli(*args: str, cwd, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in `cwd`, on the CPU, in this environment or `env`."""
    env = {**(os.environ if env is None else env), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "Error:" in line]
    assert len(lines) == 1, proc.stderr
    for part in parts:
        assert part in lines[0], lines[0]
