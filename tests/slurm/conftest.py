"""The ``slurm_cluster`` fixture: one real two-node cluster shared by the tests in tests/slurm/ (marked ``slurm``)."""

from __future__ import annotations

import atexit
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import INSTALL, Cluster, missing_binaries


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """munge, slurmctld and slurmd ``n1``/``n2`` started in a temporary folder; stopped whatever happens."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}): `{INSTALL}` (.ci/run does it)")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    atexit.register(cluster.stop)  # also on an interrupt that skips fixture teardown; stopping twice is a no-op
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
