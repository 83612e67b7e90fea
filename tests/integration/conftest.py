"""The local SLURM test cluster as a session fixture (for tests marked ``slurm``).

``slurm_cluster`` starts the cluster of ``launch/slurm_test_cluster.sh`` (or reuses one already
running, e.g. started by CI), sets ``SLURM_CONF`` for the whole test session so that submitit's
``sbatch``/``sacct``/``scontrol`` calls (and the jobs themselves) reach it, and hands out a
:class:`SlurmCluster` with small helpers that always poll with a deadline. ``two_node_cluster``
is the same cluster for tests that need its two nodes (node1 and node2, each in its own network
namespace); where the script could only make one node it skips with the script's reason.

It skips, with the reason, when the cluster cannot exist here: not Linux/Debian, not root, or
the packages are missing and cannot be installed. Set ``SPARSE_DETR_SLURM_REQUIRE=1`` (CI) to
turn those skips into failures. A cluster that this fixture started is stopped at the end of
the session unless ``SPARSE_DETR_SLURM_KEEP=1``; one that was already running is left running.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "launch" / "slurm_test_cluster.sh"
START_TIMEOUT_S = 900  # includes a first apt-get install
EXIT_CANNOT_INSTALL = 3  # the script's exit code for "packages missing and not installable"

FINISHED_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _unavailable(reason: str) -> None:
    """Skip (or fail, when the cluster is required) because no cluster can run here."""
    if _env_flag("SPARSE_DETR_SLURM_REQUIRE"):
        pytest.fail(f"SLURM test cluster required but unavailable: {reason}", pytrace=False)
    pytest.skip(f"SLURM test cluster unavailable: {reason}")


def _run_script(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), command],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 1.0) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}", pytrace=False)
        time.sleep(interval_s)


@dataclass(frozen=True)
class SlurmCluster:
    """Handle on the running test cluster; all waits take a deadline."""

    slurm_conf: Path
    partition: str = "debug"
    account: str = "sparse"

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (``sbatch``, ``sacct``, ...) against this cluster."""
        env = {**os.environ, "SLURM_CONF": str(self.slurm_conf)}
        return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout, env=env)

    def sbatch(self, *args: str) -> str:
        """Submit with sbatch; returns the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]

    def sacct(self, job_id: str, fields: str = "State", duplicates: bool = False) -> list[dict[str, str]]:
        """Accounting rows (allocation only, one per run of the job with ``duplicates``)."""
        cmd = ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", fields]
        if duplicates:
            cmd.append("--duplicates")
        out = self.run(*cmd).stdout
        names = fields.split(",")
        return [dict(zip(names, line.split("|"))) for line in out.splitlines() if line.strip()]

    def nodes(self) -> list[str]:
        """The nodes of the partition, in order (``node1``, ``node2``; or this host alone)."""
        return self.run("sinfo", "-h", "-N", "-p", self.partition, "-o", "%N").stdout.split()

    def state(self, job_id: str) -> str:
        """Current state as sacct reports it ("" while unknown). ``CANCELLED by 0`` -> ``CANCELLED``."""
        rows = self.sacct(job_id)
        return rows[-1]["State"].split()[0] if rows else ""

    def wait_finished(self, job_id: str, timeout_s: float = 60) -> str:
        """Wait until sacct shows a final state and return it."""
        return wait_until(
            lambda: (s := self.state(job_id)) in FINISHED_STATES and s,
            timeout_s, f"job {job_id} to finish",
        )

    def executor(self, folder: Path | str, **parameters: Any):
        """A ``submitit.AutoExecutor`` forced onto this cluster with small test defaults."""
        import submitit

        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        # timeout_min above 10: submitit treats USR2 in a job of <= 10 min as a time-out at once.
        defaults: dict[str, Any] = {
            "slurm_partition": self.partition, "timeout_min": 30, "cpus_per_task": 1, "nodes": 1,
        }
        executor.update_parameters(**{**defaults, **parameters})
        return executor

    # Also reachable through the fixture (test modules cannot reliably `import conftest`).
    wait_until = staticmethod(wait_until)

    @staticmethod
    def wait_done(job: Any, timeout_s: float = 60) -> Any:
        """Poll ``job.done()`` until true (never ``job.result()`` without a deadline)."""
        return wait_until(job.done, timeout_s, f"submitit job {job.job_id} to be done")


def _parse_slurm_conf(output: str) -> Path | None:
    for line in reversed(output.splitlines()):
        if line.startswith("export SLURM_CONF="):
            return Path(line.split("=", 1)[1].strip())
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start (or reuse) the local SLURM test cluster for this session; skip if impossible."""
    if not sys.platform.startswith("linux"):
        _unavailable(f"needs Linux, this is {sys.platform}")
    if not CLUSTER_SCRIPT.is_file():
        _unavailable(f"{CLUSTER_SCRIPT} not found")
    if shutil.which("dpkg-query") is None:
        _unavailable("needs a Debian/Ubuntu machine (dpkg/apt); no dpkg-query here")
    if os.geteuid() != 0:
        _unavailable("the test cluster installs packages and runs its daemons as root; run the tests as root")

    was_running = _run_script("status", timeout=60).returncode == 0
    try:
        started = _run_script("start", timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{CLUSTER_SCRIPT.name} start` took over {START_TIMEOUT_S} s", pytrace=False)
    output = started.stdout + started.stderr
    if started.returncode == EXIT_CANNOT_INSTALL:
        _unavailable("SLURM/munge/MariaDB packages missing and not installable:\n" + output[-2000:])
    if started.returncode != 0:
        # The packages are there but the cluster did not come up: a real error, not a skip.
        pytest.fail(f"`{CLUSTER_SCRIPT.name} start` failed (rc {started.returncode}):\n{output[-4000:]}",
                    pytrace=False)
    slurm_conf = _parse_slurm_conf(started.stdout)
    if slurm_conf is None or not slurm_conf.is_file():
        pytest.fail(f"could not find SLURM_CONF in the start output:\n{output[-2000:]}", pytrace=False)

    with pytest.MonkeyPatch.context() as mp:
        # submitit calls sbatch/sacct/scontrol with the test process's environment, and the
        # jobs inherit it (sbatch --export=ALL), so one variable routes everything here.
        mp.setenv("SLURM_CONF", str(slurm_conf))
        yield SlurmCluster(slurm_conf=slurm_conf)

    if not was_running and not _env_flag("SPARSE_DETR_SLURM_KEEP"):
        _run_script("stop", timeout=120)


@pytest.fixture(scope="session")
def two_node_cluster(slurm_cluster: SlurmCluster) -> SlurmCluster:
    """The test cluster when it has two nodes; skips (fails when required) with the start script's
    reason where it has one."""
    nodes = slurm_cluster.nodes()
    if len(nodes) < 2:
        reason_file = slurm_cluster.slurm_conf.parent.parent / "single-node-reason"
        reason = reason_file.read_text().strip() if reason_file.is_file() else "no reason recorded"
        _unavailable(f"the cluster has one node ({', '.join(nodes)}), not two: {reason}")
    return slurm_cluster
