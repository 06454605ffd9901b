"""Real servers the tests share: a moto S3 endpoint on 127.0.0.1 and a local Ray cluster.

Each is a context manager so a module-scoped fixture is ``with ...: yield``; both restore what
they changed (environment variables, torch's thread count) when they end.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3(bucket: str, versioned: bool = False) -> Iterator:
    """A moto S3 server with ``bucket`` and the AWS variables that point boto3, pyarrow (and
    processes started meanwhile) at it; yields a boto3 client. ``versioned``: every PUT of a key
    is a version, so "published once" is countable."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        if versioned:
            status = {"Status": "Enabled"}
            client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=status)
        yield client
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def local_ray() -> Iterator[None]:
    """One local Ray cluster (2 CPUs); one torch thread here, as in the actors
    (OMP_NUM_THREADS=1 is inherited), so samples are bitwise comparable to a local run."""
    import ray
    import torch

    from stages.lib import raylaunch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env=raylaunch.job_runtime_env(),
        logging_level="WARNING",
    )
    try:
        yield
    finally:
        raylaunch.drop_pool()
        ray.shutdown()
        torch.set_num_threads(before)
