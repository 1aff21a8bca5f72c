"""A real two-node SLURM cluster on one machine, in a temporary folder: munge, slurmctld and two slurmd.

Both nodes are this machine (``NodeAddr=127.0.0.1``), each ``slurmd`` started with ``-N <node>`` on a port of
its own, so ``srun -N2 -n2`` runs one task per "node" with SLURM's real variables. Every daemon runs in the
foreground as a child of the test process: stopping the cluster stops exactly the processes it started, by
process id, and a daemon whose parent dies (even by SIGKILL) is sent SIGTERM by the kernel
(``PR_SET_PDEATHSIG``), so a killed pytest leaves none behind.
"""

from __future__ import annotations

import ctypes
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
DAEMONS = ("munged", "slurmctld", "slurmd")
NODES = ("n1", "n2")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL"}
INSTALL = "apt-get install -y slurm-wlm munge"


def missing_binaries() -> list[str]:
    """The SLURM and munge programs this harness needs that are not on PATH (or in /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in (*DAEMONS, *CLIENTS, "munge") if shutil.which(name, path=path) is None]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def die_with_parent() -> None:
    """In the child, before exec: have the kernel send SIGTERM when the test process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


class Cluster:
    """munge + slurmctld + slurmd ``n1`` and ``n2`` under ``root``; ``env`` is what clients and jobs need.

    Args:
        root: An empty folder for the configuration, state, spool and logs (kept for post-mortems).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: dict[str, subprocess.Popen] = {}
        self.sbin = os.pathsep.join(["/usr/sbin", "/sbin", os.environ.get("PATH", "")])
        self.conf = root / "slurm.conf"
        self.env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
        self.env.update(SLURM_CONF=str(self.conf), PATH=self.sbin)

    # --- start and stop ------------------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Write the configuration, start every daemon, and wait until both nodes are idle."""
        for folder in ("munge", "state", "log", *(f"spool/{node}" for node in NODES)):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self.write_config()
        munge = self.root / "munge"
        self.spawn("munged", "munged", "--foreground", "--force", f"--key-file={key}",
                   f"--socket={munge / 'munge.sock'}", f"--pid-file={munge / 'munged.pid'}",
                   f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}")  # fmt: skip
        self.wait_for(lambda: (munge / "munge.sock").exists(), timeout, "munged to open its socket")
        self.spawn("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
        for node in NODES:
            self.spawn(f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", str(self.conf))
        self.wait_for(self.nodes_idle, timeout, "both nodes to be idle in sinfo")

    def spawn(self, name: str, *command: str) -> None:
        """Start one daemon in the foreground, its output in ``log/<name>.out``."""
        log = (self.root / "log" / f"{name}.out").open("ab")
        self.processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            cwd=self.root, preexec_fn=die_with_parent,
        )  # fmt: skip
        log.close()

    def stop(self) -> None:
        """Cancel every job, wait (bounded) for them to end, then stop the daemons this cluster started, by pid."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.client("scancel", f"--user={getpass.getuser()}", check=False)
            self.wait_for(lambda: not self.client("squeue", "-h", check=False).strip(), 30, "jobs to end", strict=False)
        for name in [*(f"slurmd-{node}" for node in NODES), "slurmctld", "munged"]:
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)

    def write_config(self) -> None:
        """``slurm.conf``: two nodes at 127.0.0.1 with ports of their own, everything else in ``root``.

        ``cred_expire=10``: a requeued job may start again 11 s after the requeue (SLURM's default is 121 s), and
        ``sched_interval=1`` starts it then (the scheduler's pass runs every 60 s by default).
        ``KillWait=5``: a task that ignores SIGTERM is killed 5 s later. ``OverTimeLimit=1``: a job that saves
        on ``--signal`` has one more minute after its time limit before SLURM kills it.
        """
        host, user, root = socket.gethostname().split(".")[0], getpass.getuser(), self.root
        nodes = [
            f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={free_port()} CPUs={os.cpu_count()} "
            "State=UNKNOWN"
            for node in NODES
        ]
        lines = [
            "ClusterName=ci",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            f"AuthInfo=socket={root / 'munge' / 'munge.sock'},cred_expire=10",
            "CredType=cred/munge",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}/%n",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "KillWait=5",
            "OverTimeLimit=1",
            "MinJobAge=600",
            *nodes,
            f"PartitionName=ci Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # --- clients ------------------------------------------------------------------------------------------------

    def client(
        self, *command: str, check: bool = True, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> str:
        """Run a SLURM client command against this cluster; its standard output."""
        result = subprocess.run(
            command, env=env or self.env, cwd=cwd, capture_output=True, text=True, check=False, timeout=60
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def nodes_idle(self) -> bool:
        """Whether sinfo shows both nodes idle."""
        states = self.client("sinfo", "-h", "-N", "-o", "%N %t", check=False).split()
        return dict(zip(states[::2], states[1::2], strict=False)) == dict.fromkeys(NODES, "idle")

    def sbatch(self, *args: str, env: dict[str, str], cwd: Path) -> str:
        """Submit a batch job from ``cwd`` with ``env`` (passed on to the job); its id."""
        output = self.client("sbatch", "--parsable", *args, env={**env, "SLURM_CONF": str(self.conf)}, cwd=cwd)
        return output.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``ExitCode``, ``Restarts``, ...)."""
        text = self.client("scontrol", "-o", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: str, timeout: float, states: set[str] = FINISHED) -> dict[str, str]:
        """Wait until the job is in one of ``states`` (by default: finished, for good); its record."""
        self.wait_for(lambda: self.job(job_id)["JobState"] in states, timeout, f"job {job_id} to reach {states}")
        return self.job(job_id)

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str, strict: bool = True) -> None:
        """Poll ``condition`` every 0.2 s; fail naming ``what`` (and the daemons' logs) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [name for name, process in self.processes.items() if process.poll() is not None]
            if time.monotonic() > deadline or dead:
                if not strict:
                    return
                raise TimeoutError(
                    f"waited {timeout} s for {what}; daemons exited: {dead}; logs in {self.root / 'log'}"
                )
            time.sleep(0.2)
