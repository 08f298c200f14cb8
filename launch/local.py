"""Start N processes of one command on this host, as a multi-host job would run.

    python launch/local.py --processes 2 --cpu-devices 4 -- blayers-train run_dir=runs/mp
    python launch/local.py --processes 2 --cpu-devices 4 -- blayers-score run_dir=runs/mp

Each process gets ``JAX_COORDINATOR_ADDRESS`` (a free loopback port), ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID``, which the service passes to ``jax.distributed.initialize``; with
``--cpu-devices K`` each process also gets K fake CPU devices (for tests on machines without
accelerators). Output lines are prefixed with the process id. If any process fails, the others
are terminated after ``--grace`` seconds, so a dead peer never leaves the job hanging; the
launcher exits with the first non-zero status.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_env(
    base: dict[str, str], port: int, count: int, pid: int, cpu_devices: int | None
) -> dict[str, str]:
    env = dict(base)
    env.update(
        {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(count),
            "JAX_PROCESS_ID": str(pid),
        }
    )
    if cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [
            f
            for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        flags.append(f"--xla_force_host_platform_device_count={cpu_devices}")
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _say(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)


def launch(
    command: list[str],
    processes: int,
    cpu_devices: int | None = None,
    grace: float = 10.0,
    timeout: float | None = None,
) -> int:
    """Run ``command`` in ``processes`` processes; returns the job's exit status."""
    port = free_port()
    procs, pumps = [], []
    for pid in range(processes):
        env = process_env(dict(os.environ), port, processes, pid, cpu_devices)
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{pid}] "), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)
    start = time.monotonic()
    status = 0
    failed_at: float | None = None
    while any(p.poll() is None for p in procs):
        for pid, p in enumerate(procs):
            if p.poll() not in (None, 0) and status == 0:
                status, failed_at = p.returncode, time.monotonic()
                _say(
                    f"process {pid} {describe(p.returncode)}; the others get {grace:g} s "
                    "to stop on their own before they are terminated"
                )
        late = failed_at is not None and time.monotonic() - failed_at > grace
        overdue = timeout is not None and time.monotonic() - start > timeout
        if late or overdue:
            _say("timed out" if overdue else "grace period over: terminating the other processes")
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.1)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            status = status or 124
            break
        try:
            time.sleep(0.1)
        except KeyboardInterrupt:
            # Ctrl-C reached every process of the job too: they checkpoint and exit, and the
            # launcher stays to relay their output and status
            _say("interrupted: the processes are checkpointing and will exit")
    for p, pump in zip(procs, pumps, strict=True):
        p.wait()
        pump.join(timeout=5)
        p.stdout.close()
        if status == 0 and p.returncode != 0:
            status = p.returncode
    if status != 0:
        states = ", ".join(f"process {i} {describe(p.returncode)}" for i, p in enumerate(procs))
        _say(
            f"job failed ({states}). Rerunning the same command resumes from the last "
            "complete checkpoint."
        )
    return status


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--cpu-devices", type=int, default=None)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    sys.exit(launch(command, args.processes, args.cpu_devices, args.grace, args.timeout))


if __name__ == "__main__":
    main()
