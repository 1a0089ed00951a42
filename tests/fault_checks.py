"""What the fault tests of several modules share: a command-line run (in a subprocess or in this process), its
one-line error, a folder's snapshot."""

import os
import subprocess
import sys

import pytest

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


def cli_exit(monkeypatch, *args: str):
    """`run.py ARGS` in this process (a subprocess spends seconds importing), for a command that must end with
    SystemExit: its code (a message means exit status 1)."""
    from absl import flags
    from autorad_jax import cli as cli_lib, console
    monkeypatch.setattr(console, "quiet_third_party", lambda: None)  # process-wide filters, not for a test worker
    try:
        with pytest.raises(SystemExit) as stop:
            cli_lib.main(cli_lib._parse_flags(["run.py", *args]))
    finally:
        flags.FLAGS.unparse_flags()
    return stop.value.code


def assert_one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "Error:" in line]
    assert len(lines) == 1, proc.stderr
    for part in parts:
        assert part in lines[0], lines[0]
