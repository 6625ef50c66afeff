"""`fireside serve --replicas N`: the cluster app in one command.

Joins the Ray cluster at `--ray-address` (or starts a local Ray instance), starts
Serve's HTTP proxy on `--host`/`--port`, deploys the app and waits for SIGTERM
or SIGINT. On the way out it deletes the app; a local Ray instance stops with
it, a cluster it joined keeps running.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from types import FrameType

import ray
from ray import serve

from fireside.cluster.app import APP_NAME, application
from fireside.config import ServeConfig
from fireside.runner.llamacpp import available_cores

log = logging.getLogger("fireside")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _runtime_env() -> dict[str, object]:
    """Fireside's environment settings, for the replicas and the ingress too (Ray
    starts its workers with the raylet's environment, not this process's). The API
    keys are in the settings already, and stay out of Ray's job records."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("FIRESIDE_") and k != "FIRESIDE_API_KEYS"
    }
    return {"env_vars": env} if env else {}


def serve_cluster(config: ServeConfig) -> int:
    threads = config.threads or 1
    if config.ray_address:
        ray.init(address=config.ray_address, runtime_env=_runtime_env())
    else:
        cores = available_cores()
        wanted = config.replicas * threads
        if wanted > cores:
            log.warning(
                "--replicas %d x --threads %d = %d threads on %d cores: replicas will "
                "slow each other down",
                config.replicas,
                threads,
                wanted,
                cores,
            )
        ray.init(num_cpus=max(cores, wanted), include_dashboard=False, runtime_env=_runtime_env())
    port = config.port or _free_port(config.host)
    serve.start(http_options={"host": config.host, "port": port})
    stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        log.info("stopping: the app is deleted, running requests may finish")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        serve.run(application(config), name=APP_NAME, route_prefix="/")
        host = f"[{config.host}]" if ":" in config.host else config.host
        log.info("listening on http://%s:%s (%d replicas)", host, port, config.replicas)
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        if not config.ray_address:
            serve.shutdown()
            ray.shutdown()
    return 0
