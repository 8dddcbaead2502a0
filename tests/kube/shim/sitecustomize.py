"""Cluster DNS for a process the test kubelet starts (test-only; on the child's PYTHONPATH).

The kubelet gives each pod its own loopback address and keeps a JSON file of the cluster's
DNS names (pods' ``<hostname>.<subdomain>.<namespace>.svc``, Services') and their addresses.
Here Python's resolver (and a socket's bind and connect) looks names up in that file first,
and "all interfaces" means the pod's own address, so two pods can listen on the same port as
they would in a cluster. torch's TCPStore resolves and binds in C++: its rendezvous gets the
resolved address, and rank 0's store listens on the pod's address through a socket bound here.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

_HOSTS = os.environ.get("TORCHRELAY_KUBELET_HOSTS", "")
_POD_IP = os.environ.get("TORCHRELAY_KUBELET_POD_IP", "")
_ANY = {"0.0.0.0", "::", ""}  # what "all interfaces" means in this pod
_getaddrinfo = socket.getaddrinfo
_gethostbyname = socket.gethostbyname


def lookup(host: Any) -> str | None:
    """The address of a cluster name (or of "all interfaces"), None for any other host."""
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return None
    if host in _ANY:
        return _POD_IP or None
    try:
        addresses = json.loads(Path(_HOSTS).read_text()).get(host.rstrip(".").lower())
    except (OSError, ValueError):
        return None
    return addresses[0] if addresses else None


def getaddrinfo(host: Any, port: Any, family: int = 0, *args: Any, **kwargs: Any) -> Any:
    address = lookup(host)
    if address is not None and family == socket.AF_INET6:
        family = socket.AF_INET
    return _getaddrinfo(address or host, port, family, *args, **kwargs)


def gethostbyname(host: str) -> str:
    return lookup(host) or _gethostbyname(host)


def _address(address: Any) -> Any:
    """A socket address with a cluster name (or "all interfaces") replaced by its address."""
    if isinstance(address, tuple) and len(address) >= 2:
        found = lookup(address[0])
        if found is not None:
            return (found, *address[1:2])
    return address


_bind = socket.socket.bind
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def bind(self: socket.socket, address: Any) -> None:
    _bind(self, _address(address) if self.family == socket.AF_INET else address)


def connect(self: socket.socket, address: Any) -> None:
    _connect(self, _address(address) if self.family == socket.AF_INET else address)


def connect_ex(self: socket.socket, address: Any) -> int:
    return _connect_ex(self, _address(address) if self.family == socket.AF_INET else address)


def _wait_for(host: str, timeout_s: float) -> str | None:
    """A cluster name's address, waited for: a headless Service's records appear a moment
    after its pods (the C++ resolver retries, but never asks this file)."""
    deadline = time.monotonic() + timeout_s
    while (address := lookup(host)) is None and host.endswith(CLUSTER_DOMAINS):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return address


CLUSTER_DOMAINS = (".svc", ".svc.cluster.local")


def _patch_rendezvous(module: Any) -> None:
    create = module._create_c10d_store

    def create_store(hostname: str, port: int, rank: int, *args: Any, **kwargs: Any) -> Any:
        address = _wait_for(hostname, args[1].total_seconds()) or hostname
        if rank != 0 or not _POD_IP or module._torchelastic_use_agent_store():
            return create(address, port, rank, *args, **kwargs)
        world_size, timeout = args[0], args[1]
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((_POD_IP, port))
        listener.listen(128)
        _keep.append(listener)
        return module.TCPStore(
            host_name=_POD_IP,
            port=port,
            world_size=world_size,
            is_master=True,
            timeout=timeout,
            multi_tenant=True,
            master_listen_fd=listener.fileno(),
        )

    module._create_c10d_store = create_store


_keep: list[socket.socket] = []


class _Patcher(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Patches torch's tcp:// rendezvous once it is imported."""

    target = "torch.distributed.rendezvous"

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _patch_rendezvous(module)


if _HOSTS:
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.socket.bind = bind  # type: ignore[method-assign,assignment]
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    sys.meta_path.insert(0, _Patcher())
