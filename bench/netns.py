"""Separate network hosts on one machine: Linux network namespaces on a bridge (needs root).

`Switch.create(tag, subnet)` makes a namespace holding a bridge; `host(name, n)` adds a namespace
plugged into it by a veth pair with address 10.71.<subnet>.<n>; `plug_root(n)` plugs the calling
process's own namespace in too; `shape(name, rate)` limits a host's link both ways with tc;
`close()` removes everything it made. Used by `bench.sharded` and the sharding tests, so the
shared-memory path cannot hide the network: every byte crosses a veth link.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Switch:
    tag: str  # prefix of every namespace and link name this switch makes
    subnet: int
    namespaces: list[str] = field(default_factory=list)
    root_link: str = ""

    @classmethod
    def create(cls, tag: str, subnet: int) -> Switch:
        """The switch namespace and its bridge (raises CalledProcessError without root)."""
        sw = cls(tag, subnet)
        ip("netns", "add", sw.name)
        sw.namespaces.append(sw.name)
        try:
            ip("-n", sw.name, "link", "add", "br0", "type", "bridge")
            ip("-n", sw.name, "link", "set", "br0", "up")
        except BaseException:
            sw.close()
            raise
        return sw

    @property
    def name(self) -> str:
        return f"{self.tag}sw"

    def address(self, host: int) -> str:
        return f"10.71.{self.subnet}.{host}"

    def host(self, name: str, host: int) -> str:
        """A new namespace plugged into the switch with address `host`; its name."""
        ns = f"{self.tag}{name}"
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        self._plug(f"{self.tag}{name}a", f"{self.tag}{name}b", host, ns)
        ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def plug_root(self, host: int) -> None:
        """The calling process's own namespace on the switch too (to watch and check hosts)."""
        self.root_link = f"{self.tag}ra"
        self._plug(self.root_link, f"{self.tag}rb", host, None)

    def shape(self, name: str, rate: str | None) -> None:
        """Limit host `name`'s link both ways to `rate`, e.g. "100mbit" (None: unlimited)."""
        for where, dev in (
            (f"{self.tag}{name}", f"{self.tag}{name}a"),
            (self.name, f"{self.tag}{name}b"),
        ):
            tc = ["ip", "netns", "exec", where, "tc", "qdisc"]
            subprocess.run([*tc, "del", "dev", dev, "root"], capture_output=True, timeout=30)
            if rate:
                limit = ["tbf", "rate", rate, "burst", "256kb", "latency", "100ms"]
                subprocess.run([*tc, "add", "dev", dev, "root", *limit], check=True,
                               capture_output=True, timeout=30)  # fmt: skip

    def close(self) -> None:
        if self.root_link:
            subprocess.run(["ip", "link", "del", self.root_link], capture_output=True, timeout=30)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def _plug(self, inside: str, outside: str, host: int, ns: str | None) -> None:
        where = ["netns", ns] if ns else []
        ip(
            "link",
            "add",
            inside,
            *where,
            "type",
            "veth",
            "peer",
            "name",
            outside,
            "netns",
            self.name,
        )
        pre = ["-n", ns] if ns else []
        ip(*pre, "addr", "add", f"{self.address(host)}/24", "dev", inside)
        ip(*pre, "link", "set", inside, "up")
        ip("-n", self.name, "link", "set", outside, "master", "br0")
        ip("-n", self.name, "link", "set", outside, "up")
