"""deploy/: the image's entrypoint and the Kubernetes manifests run a real server as written.

No Docker engine or cluster runs here, so the StatefulSet's own command line is started as a process
(ports, paths and the bind address swapped for local ones) and probed the way the kubelet would.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import torch
import trustme
import yaml

from adamd.client import Client, TLSConfig, Unauthenticated, Unavailable
from adamd.client._addresses import parse_servers
from adamd.server.cli.main import build_parser
from adamd.server.config import ServerConfig

from ..processes import serve

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BASE = DEPLOY / "k8s" / "base"


def _documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(BASE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def _container() -> dict[str, Any]:
    container: dict[str, Any] = _one("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    return container


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.partition("=")[::2] for a in args)


def test_the_manifest_command_line_serves_answers_its_probes_and_requires_its_token(
    tmp_path: Path,
) -> None:
    c = _container()
    assert c["command"] == ["adamd", "serve"]
    token = tmp_path / "token"
    token.write_text("s3cret\n")  # as `kubectl create secret --from-file` stores a file
    secret = _tls_secret(tmp_path / "tls")
    local = {
        "--host": "127.0.0.1",
        "--grpc-port": "0",
        "--bulk-port": "0",
        "--http-port": "0",
        "--data-dir": str(tmp_path / "data"),
        "--token-file": str(token),
        "--tls-cert": str(secret / "tls.crt"),
        "--tls-key": str(secret / "tls.key"),
    }
    args = [f"{k}={local.get(k, v)}" if v else k for k, v in _flags(c["args"]).items()]
    with serve(*args, tmp=tmp_path) as (_, grpc_address, http_url, _):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = c[probe]["httpGet"]
            url = f"{get.get('scheme', 'HTTP').lower()}://{http_url.split('://')[1]}{get['path']}"
            deadline = time.monotonic() + 30
            # The kubelet does not verify a probe's certificate; the test does, against ca.crt.
            trusting = ssl.create_default_context(cafile=str(secret / "ca.crt"))
            while httpx.get(url, timeout=5, verify=trusting).status_code != 200:
                assert time.monotonic() < deadline, f"{probe} {url} never answered 200"
                time.sleep(0.2)
        tls = TLSConfig(ca=secret / "ca.crt")
        with Client(grpc_address, tls=tls) as anonymous, pytest.raises(Unauthenticated):
            anonymous.list_models()
        with Client(grpc_address, token="s3cret", tls=tls) as worker:
            assert worker.list_models() == []
        plain = Client(grpc_address, token="s3cret", retry_timeout=0.5)
        with plain, pytest.raises(Unavailable):  # TLS on: plaintext is refused
            plain.list_models()


def _tls_secret(where: Path) -> Path:
    """The files of a cert-manager Certificate's Secret, for the Service's in-cluster name."""
    ca = trustme.CA()
    cert = ca.issue_cert("adamd", "adamd.default.svc", "127.0.0.1", "localhost")
    where.mkdir()
    cert.cert_chain_pems[0].write_to_path(str(where / "tls.crt"))
    cert.private_key_pem.write_to_path(str(where / "tls.key"))
    ca.cert_pem.write_to_path(str(where / "ca.crt"))
    return where


def test_ports_volumes_and_services_agree_with_the_command_line() -> None:
    c = _container()
    flags = _flags(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "grpc": int(flags["--grpc-port"]),
        "bulk": int(flags["--bulk-port"]),
        "http": int(flags["--http-port"]),
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert flags["--data-dir"] == mounts["data"]
    assert Path(flags["--token-file"]).parent == Path(mounts["token"])
    # cert-manager's Secret keys (kubernetes.io/tls, plus ca.crt), from a Secret volume
    assert Path(flags["--tls-cert"]) == Path(mounts["tls"]) / "tls.crt"
    assert Path(flags["--tls-key"]) == Path(mounts["tls"]) / "tls.key"
    volumes = {v["name"]: v for v in _one("StatefulSet")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "adamd-tls"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS"
    spec = _one("StatefulSet")["spec"]
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]
    for service in ("adamd", "adamd-headless"):
        svc = _one("Service", service)["spec"]
        assert svc["selector"] == spec["selector"]["matchLabels"]
        assert {p["targetPort"] for p in svc["ports"]} <= ports.keys()
    assert spec["serviceName"] == "adamd-headless"


def test_the_image_entrypoint_and_exposed_ports_match_the_cli() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (entry,) = re.findall(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)
    command = json.loads(entry)
    assert command[:2] == ["adamd", "serve"]
    build_parser().parse_args(command[1:])  # every flag exists (argparse exits otherwise)
    (exposed,) = re.findall(r"^EXPOSE (.*)$", dockerfile, re.M)
    defaults = ServerConfig()
    bulk = int(command[command.index("--bulk-port") + 1])  # its default is a free port
    assert sorted(map(int, exposed.split())) == sorted(
        [defaults.grpc_port, bulk, defaults.http_port]
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_kustomize_builds(variant: str) -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s" / variant)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert built.returncode == 0, built.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(built.stdout) if d)
    assert kinds == ["NetworkPolicy", "Service", "Service", "StatefulSet"]
    if variant == "gpu":
        assert "--device=cuda" in built.stdout and "nvidia.com/gpu: 1" in built.stdout


KUBERNETES = "1.37.0"  # the Kubernetes version whose schemas the manifests are checked against
VARIANTS = ["base", "gpu", "sharded"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_manifest_is_valid_for_kubernetes(variant: str) -> None:
    """What the API server would check: each document against Kubernetes' own OpenAPI schemas,
    strict (a misspelt or misplaced field is an error, not silently dropped)."""
    docs = _kustomize(variant)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    broken = json.loads(json.dumps(sts))
    broken["spec"]["bogus"] = 1  # the check does catch a field that does not exist
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_meet_what_production_clusters_require(variant: str) -> None:
    """Probes, requests and limits, the restricted Pod Security Standard, and a NetworkPolicy
    admitting only the three ports."""
    docs = _kustomize(variant)
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"]:
        assert c["livenessProbe"]["httpGet"] and c["readinessProbe"]["httpGet"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= c["resources"][kind].keys(), (c["name"], kind)
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for writable in ("/data", "/tmp"):  # the only paths the daemon writes
            assert not mounts[writable].get("readOnly", False), writable
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        assert mounts["/data"]["name"] in {
            t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]
        }
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress"]
    admitted = {(p["protocol"], p["port"]) for rule in spec["ingress"] for p in rule["ports"]}
    container_ports = {p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert (
        admitted
        == {("TCP", port) for port in container_ports}
        == {
            ("TCP", 50051),
            ("TCP", 50052),
            ("TCP", 8080),
        }
    )


def _kustomize(variant: str) -> list[dict[str, Any]]:
    built = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s" / variant)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert built.returncode == 0, built.stderr
    return [d for d in yaml.safe_load_all(built.stdout) if d]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_sharded_overlay_builds_and_every_pod_serves_its_shard(tmp_path: Path) -> None:
    docs = _kustomize("sharded")
    by_kind = {d["kind"]: d for d in docs}
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "StatefulSet",
    ]
    sts = by_kind["StatefulSet"]
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    labels = spec["selector"]["matchLabels"]
    replicas = spec["replicas"]
    assert replicas > 1 and spec["podManagementPolicy"] == "Parallel"
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]  # per pod
    (anti,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert anti["labelSelector"]["matchLabels"] == labels
    pdb = by_kind["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"] == labels and pdb["maxUnavailable"] == 1
    # The workers' address form names every ordinal of this StatefulSet, in order.
    container = pod["containers"][0]
    flags = _flags(container["args"])
    assert "--durable" in flags
    servers = parse_servers(by_kind["ConfigMap"]["data"]["ADAMD_SERVERS"])
    port = flags["--grpc-port"]
    headless = spec["serviceName"]
    name = sts["metadata"]["name"]
    assert servers == [f"{name}-{i}.{headless}:{port}" for i in range(replicas)]
    # Every pod's command line as a real process (ports and paths made local), probed as the
    # kubelet would, then one model sharded over all of them.
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    secret = _tls_secret(tmp_path / "tls")
    addresses = []
    with contextlib.ExitStack() as stack:
        for i in range(replicas):
            local = {
                "--host": "127.0.0.1",
                "--grpc-port": "0",
                "--bulk-port": "0",
                "--http-port": "0",
                "--data-dir": str(tmp_path / f"data{i}"),
                "--token-file": str(token),
                "--tls-cert": str(secret / "tls.crt"),
                "--tls-key": str(secret / "tls.key"),
            }
            args = [f"{k}={local.get(k, v)}" if v else k for k, v in flags.items()]
            (tmp_path / f"pod{i}").mkdir()
            _, grpc_address, http_url, _ = stack.enter_context(
                serve(*args, tmp=tmp_path / f"pod{i}")
            )
            trusting = ssl.create_default_context(cafile=str(secret / "ca.crt"))
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                url = f"https://{http_url.split('://')[1]}{container[probe]['httpGet']['path']}"
                deadline = time.monotonic() + 30
                while httpx.get(url, timeout=5, verify=trusting).status_code != 200:
                    assert time.monotonic() < deadline, f"pod {i}: {probe} {url} never answered"
                    time.sleep(0.2)
            addresses.append(grpc_address)
        tls = TLSConfig(ca=secret / "ca.crt")
        with Client(addresses, token="s3cret", tls=tls, slice_bytes=1024) as c:
            params = {"emb": torch.randn(64, 16), "w": torch.randn(8, 8), "b": torch.zeros(8)}
            c.create_model("m", params, lr=0.1)
            c.push_grad("m", {n: torch.ones_like(t) for n, t in params.items()})
            info = c.describe("m")
            assert info.shard_versions == (1,) * replicas
            assert all(c.layout("m").names_on(k) for k in range(replicas))
