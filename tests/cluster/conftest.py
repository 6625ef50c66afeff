"""A real two-node Ray cluster on this machine, and Fireside's cluster app on it.

`ray.cluster_utils.Cluster` starts two raylets with one CPU each (a head and a
worker node); `fireside serve --replicas 2 --ray-address ...` joins it, so each
node gets one engine replica with one llama.cpp thread. The app runs with an API
key, so the `client` and `api_key` fixtures the e2e tests use carry it.

Every test in this folder is marked `slow`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server, ServerFactory

KEY = "cluster-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The head node's address; two nodes of one CPU each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def cluster_server(ray_cluster: str) -> Iterator[Server]:
    factory = ServerFactory()
    try:
        yield factory.start(
            "--replicas",
            "2",
            "--ray-address",
            ray_cluster,
            "--api-key",
            KEY,
            env_extra={"FIRESIDE_TEST_HOOKS": "1"},
        )
    finally:
        factory.close()


@pytest.fixture(scope="session")
def server_url(cluster_server: Server) -> str:
    return cluster_server.url


@pytest.fixture()
def api_key() -> str:
    return KEY


@pytest.fixture()
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, headers=AUTH, timeout=120) as c:
        yield c


@pytest.fixture()
def cold(client: httpx.Client) -> httpx.Client:
    """The e2e tests' cold server is the cluster here: its replicas' caches hold other
    prompts, so a scored prompt may start from a cached prefix (within the tests'
    tolerance of the reference)."""
    return client
