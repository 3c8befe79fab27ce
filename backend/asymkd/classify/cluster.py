"""The Dask cluster a classify job runs on: a new local one (`--workers N`) or the workers
of a running dask-scheduler (`--scheduler ADDRESS`).

`starting` connects it in a background thread from the job's first step, so a local
cluster's worker processes spawn and import Dask while this process imports the engine and
plans the job (about half a second of a local job otherwise spent one after the other).
This module imports neither the engine nor Dask until a cluster is asked for.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import ConfigError

if TYPE_CHECKING:
    from .options import ClassifyOptions

# Keep in step with backend/requirements-dask.txt (a test checks it).
DASK_REQUIREMENT = "dask[distributed]==2026.8.0"


def import_distributed() -> Any:
    """The `distributed` package, or a ConfigError saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise ConfigError(f"classification on a Dask cluster needs Dask, which is not installed ({exc})",
                          f"install {DASK_REQUIREMENT} to use --workers/--scheduler: pip install "
                          f"'{DASK_REQUIREMENT}' (or pip install -r backend/requirements-dask.txt)") from exc
    return distributed


SCHEMES = ("tcp", "tls", "ucx", "inproc")
_ADDRESS_HINT = "give the scheduler's address as tcp://HOST:PORT (or tls://, ucx://), e.g. tcp://10.0.0.5:8786"


def check_address(address: str) -> str:
    """The --scheduler address, stripped, once its form is right (scheme tcp, tls, ucx or
    inproc; a host; a port from 1 to 65535; tcp when no scheme is given, as Dask reads it).
    Refused here before any Dask client starts: Dask's own refusal of a malformed address
    comes from a background thread, with a traceback and a wait."""
    text = str(address).strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    if scheme not in SCHEMES:
        raise ConfigError(f"--scheduler {ascii(text)}: unknown scheme {ascii(scheme)} (tcp, tls, ucx or inproc)",
                          _ADDRESS_HINT)
    if scheme == "inproc":
        if not rest.strip("/"):
            raise ConfigError(f"--scheduler {ascii(text)} names no in-process address", _ADDRESS_HINT)
        return text
    if rest.startswith("["):  # an IPv6 host: [::1]:8786
        host, _, port = rest[1:].partition("]")
        port = port[1:] if port.startswith(":") else "" if not port else "?"
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host or any(c.isspace() or c in "/?#@[]" for c in host) or not host.isprintable():
        raise ConfigError(f"--scheduler {ascii(text)}: no valid host name before the port", _ADDRESS_HINT)
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(f"--scheduler {ascii(text)}: the port must be a number from 1 to 65535, "
                          f"not {ascii(port) if port else 'missing'}", _ADDRESS_HINT)
    return text


# The workers' statistical profiler samples every thread's stack every 10 ms: CPU taken
# from inference for a dashboard this engine does not show.
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}


@contextlib.contextmanager
def _local_cluster(distributed: Any, workers: int) -> Iterator[Any]:
    import logging

    import dask
    with dask.config.set(WORKER_CONFIG):  # handed to the worker processes as they start
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=":0", silence_logs=logging.ERROR)
    try:
        client = distributed.Client(cluster, set_as_default=False)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


@contextlib.contextmanager
def _remote(distributed: Any, address: str, timeout: float) -> Iterator[Any]:
    import dask
    hint = ("start one with `dask-scheduler` and workers with `dask-worker ADDRESS`, check the address and "
            "port (e.g. tcp://10.0.0.5:8786), or use --workers N for a cluster on this machine")
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": f"{timeout}s"}):
            client = distributed.Client(address, timeout=f"{timeout}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s: "
                          f"{exc or type(exc).__name__}", hint) from exc
    try:  # not `with client`: that makes it the current client of the thread that entered it,
        # and the cluster is started and closed on threads of its own (Cluster)
        try:
            client.wait_for_workers(1, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"the Dask scheduler at {address} has no workers (waited {timeout:g} s)",
                              "start workers with `dask-worker ADDRESS` on the hosts that see the raster") from exc
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def connect(opts: ClassifyOptions) -> Iterator[Any]:
    """A Dask client: of a new local cluster (--workers) or of a running scheduler (--scheduler)."""
    distributed = import_distributed()
    if opts.scheduler is not None:
        with _remote(distributed, str(opts.scheduler).strip(), opts.connect_timeout) as client:
            yield client
    else:
        with _local_cluster(distributed, int(opts.workers or 1)) as client:
            yield client


class Cluster:
    """A Dask client being connected in a background thread; `client()` waits for it.
    Closed once, from whichever user is done first (`close_soon` starts the close and
    returns, so a local cluster's workers end while the job writes its last outputs)."""

    def __init__(self, opts: ClassifyOptions):
        self.opts = opts
        self.start_s = 0.0  # seconds from the start to a connected client
        self._t0 = time.perf_counter()
        self._stack = contextlib.ExitStack()
        self._client: Any = None
        self._error: BaseException | None = None
        self._closing: threading.Thread | None = None
        self._close_error: BaseException | None = None
        self._thread = threading.Thread(target=self._connect, name="asymkd-cluster-start", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        try:
            self._client = self._stack.enter_context(connect(self.opts))
        except BaseException as exc:  # handed to the thread that asks for the client
            self._error = exc
        self.start_s = time.perf_counter() - self._t0

    def client(self) -> Any:
        """The connected client, or the start's error (e.g. an unreachable scheduler)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._client

    def close_soon(self) -> None:
        if self._closing is None:
            self._thread.join()  # a start still under way is let finish, then closed
            self._closing = threading.Thread(target=self._close, name="asymkd-cluster-close", daemon=True)
            self._closing.start()

    def _close(self) -> None:
        try:
            self._stack.close()
        except BaseException as exc:
            self._close_error = exc

    def close(self) -> None:
        """Close and wait until closed (a local cluster's worker processes have ended)."""
        self.close_soon()
        assert self._closing is not None
        self._closing.join()
        if self._close_error is not None:
            error, self._close_error = self._close_error, None
            raise error


@contextlib.contextmanager
def starting(opts: ClassifyOptions) -> Iterator[Cluster | None]:
    """The job's cluster, being connected, or None when the job runs in this process."""
    if opts.workers is None and opts.scheduler is None:
        yield None
        return
    if opts.scheduler is not None:
        check_address(opts.scheduler)
    import_distributed()  # here, not in the thread: a missing Dask is a ConfigError now
    cluster = Cluster(opts)
    try:
        yield cluster
    finally:
        cluster.close()
