"""The lab's Services, programmed on every node as kube-proxy programs them in iptables mode (AKS's default).

Debian's `iptables` is iptables-nft, as on AKS's node images. Per node, one `iptables-restore --noflush` writes the
kube-proxy chains of the `filter` and `nat` tables in full (a declared chain is flushed first) and deletes the
per-Service chains of Services that are gone, so `service-del` leaves exactly what was there before `service-add`:
- nat PREROUTING and OUTPUT jump to KUBE-SERVICES, POSTROUTING to KUBE-POSTROUTING; filter INPUT/FORWARD/OUTPUT
  jump to KUBE-EXTERNAL-SERVICES / KUBE-FORWARD / KUBE-SERVICES as kube-proxy links them (inserted once, first);
- KUBE-SERVICES: `ClusterIP:port -> KUBE-SVC-<hash>`, and last `-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`;
- KUBE-NODEPORTS: `dport NodePort -> KUBE-EXT-<hash>`;
- KUBE-EXT (policy Cluster): KUBE-MARK-MASQ, then KUBE-SVC. KUBE-EXT (policy Local): pod and node-local traffic go
  to KUBE-SVC (node-local traffic masqueraded), the rest to KUBE-SVL (this node's endpoints only) or, on a node
  without a local endpoint, to nothing: filter KUBE-EXTERNAL-SERVICES drops the NodePort there ("has no local
  endpoints"). Local keeps the client's source address;
- KUBE-SVC: traffic that is not from a pod is masqueraded, then one KUBE-SEP per endpoint (`statistic random`);
- KUBE-SEP: hairpin masquerade, DNAT to the endpoint;
- KUBE-MARK-MASQ sets 0x4000/0x4000; KUBE-POSTROUTING masquerades marked packets (and clears the mark);
  KUBE-FORWARD accepts marked and established traffic and drops INVALID.
Local traffic is told apart by interface name (`--detect-local-mode=InterfaceNamePrefix`, the pods' veth prefix),
as on AKS with Azure CNI: pods, nodes and other VNet hosts share one subnet there, so no CIDR tells pods apart.
Chain names are kube-proxy's: the prefix and 16 base32 characters of the SHA-256 of the service port name and
protocol (and endpoint).

Services live in the lab's state (`LabState.services`); `program_node(state, node)` (re)programs all of them on one
node, as kube-proxy does after a restart.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Iterable

from wgcni_lab import lab

SERVICE_CIDR = ipaddress.ip_network("10.0.0.0/16")  # AKS's default service CIDR
FIRST_CLUSTER_IP = 16  # .1 is the API server's Service and .10 kube-dns on AKS
NODE_PORT_RANGE = range(30000, 32768)
POLICIES = ("Cluster", "Local")
PROTOCOL = "tcp"
MASQUERADE_MARK = "0x4000/0x4000"
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # a DNS-1035 label, as Kubernetes requires of Services
_CHAIN = re.compile(r"^:(KUBE-(?:SVC|SVL|EXT|SEP)-[A-Z2-7]{16}) ")
_POD_LOCAL = f"{lab.POD_VETH_PREFIX}+"

JUMPS = (  # (table, built-in chain, rule) as kube-proxy links its chains
    ("nat", "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("nat", "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("nat", "POSTROUTING", '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'),
    ("filter", "INPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service '
                        'portals" -j KUBE-EXTERNAL-SERVICES'),
    ("filter", "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
    ("filter", "FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
                          '-j KUBE-SERVICES'),
    ("filter", "FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service '
                          'portals" -j KUBE-EXTERNAL-SERVICES'),
    ("filter", "OUTPUT", '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
                         '-j KUBE-SERVICES'),
)
FILTER_CHAINS = ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD")
NAT_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")


def port_name(service: lab.ServiceState) -> str:
    """The service port's name as kube-proxy writes it (one unnamed port: `namespace/name`)."""
    return f"{lab.POD_NAMESPACE}/{service.name}"


def chain_name(prefix: str, service: lab.ServiceState, endpoint: str = "") -> str:
    digest = hashlib.sha256(f"{port_name(service)}{PROTOCOL}{endpoint}".encode()).digest()
    return f"KUBE-{prefix}-{base64.b32encode(digest).decode()[:16]}"


def _endpoint(service: lab.ServiceState, endpoint: dict[str, str]) -> str:
    return f"{endpoint['ip']}:{service.port}"


def _endpoint_jumps(chain: str, service: lab.ServiceState, endpoints: list[dict[str, str]]) -> list[str]:
    """One KUBE-SEP jump per endpoint, each taken with probability 1/(endpoints left), the last always."""
    rules = []
    for index, endpoint in enumerate(endpoints):
        left = len(endpoints) - index
        chance = f" -m statistic --mode random --probability {1 / left:.10f}" if left > 1 else ""
        rules.append(f'-A {chain} -m comment --comment "{port_name(service)} -> {_endpoint(service, endpoint)}"'
                     f"{chance} -j {chain_name('SEP', service, _endpoint(service, endpoint))}")
    return rules


def service_rules(service: lab.ServiceState, node: lab.NodeState) -> tuple[list[str], list[str], list[str]]:
    """(filter rules, nat chains, nat rules) of one Service on `node`."""
    name = port_name(service)
    svc = chain_name("SVC", service)
    chains = [svc]
    nat = [f'-A KUBE-SERVICES -d {service.cluster_ip}/32 -p {PROTOCOL} -m comment --comment "{name} cluster IP" '
           f"-m {PROTOCOL} --dport {service.port} -j {svc}",
           f'-A {svc} ! -i {_POD_LOCAL} -d {service.cluster_ip}/32 -p {PROTOCOL} -m comment --comment '
           f'"{name} cluster IP" -m {PROTOCOL} --dport {service.port} -j KUBE-MARK-MASQ',
           *_endpoint_jumps(svc, service, service.endpoints)]
    filter_rules = []
    if service.node_port:
        ext = chain_name("EXT", service)
        chains.append(ext)
        nat.append(f'-A KUBE-NODEPORTS -p {PROTOCOL} -m comment --comment "{name}" -m {PROTOCOL} '
                   f"--dport {service.node_port} -j {ext}")
        if service.external_traffic_policy == "Cluster":
            nat += [f'-A {ext} -m comment --comment "masquerade traffic for {name} external destinations" '
                    "-j KUBE-MARK-MASQ",
                    f"-A {ext} -j {svc}"]
        else:
            local = [endpoint for endpoint in service.endpoints if endpoint["node"] == node.name]
            nat += [f'-A {ext} -i {_POD_LOCAL} -m comment --comment "pod traffic for {name} external destinations" '
                    f"-j {svc}",
                    f'-A {ext} -m comment --comment "masquerade LOCAL traffic for {name} external destinations" '
                    "-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
                    f'-A {ext} -m comment --comment "route LOCAL traffic for {name} external destinations" '
                    f"-m addrtype --src-type LOCAL -j {svc}"]
            if local:
                svl = chain_name("SVL", service)
                chains.append(svl)
                nat += [f"-A {ext} -j {svl}", *_endpoint_jumps(svl, service, local)]
            else:
                filter_rules.append(f'-A KUBE-EXTERNAL-SERVICES -p {PROTOCOL} -m comment --comment "{name} has no '
                                    f'local endpoints" -m addrtype --dst-type LOCAL -m {PROTOCOL} '
                                    f"--dport {service.node_port} -j DROP")
    for endpoint in service.endpoints:
        sep = chain_name("SEP", service, _endpoint(service, endpoint))
        chains.append(sep)
        nat += [f'-A {sep} -s {endpoint["ip"]}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ',
                f'-A {sep} -p {PROTOCOL} -m comment --comment "{name}" -m {PROTOCOL} '
                f"-j DNAT --to-destination {_endpoint(service, endpoint)}"]
    return filter_rules, chains, nat


def render(state: lab.LabState, node: lab.NodeState, existing_chains: Iterable[str] = (),
           missing_jumps: Iterable[tuple[str, str, str]] = ()) -> str:
    """The `iptables-restore --noflush` input that leaves `node` with exactly kube-proxy's rules for the lab's
    Services: the base chains, each Service's chains, the links from the built-in chains in `missing_jumps`, and
    the deletion of `existing_chains` no Service needs any more."""
    filter_rules, service_chains, nat_rules = [], [], []
    for service in state.services:
        service_filter, chains, nat = service_rules(service, node)
        filter_rules += service_filter
        service_chains += chains
        nat_rules += nat
    stale = sorted(set(existing_chains) - set(service_chains))
    jumps = {table: [f"-I {chain} 1 {rule}" for jump_table, chain, rule in reversed(list(missing_jumps))
                     if jump_table == table] for table in ("filter", "nat")}
    lines = ["*filter", *(f":{chain} - [0:0]" for chain in FILTER_CHAINS),
             "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
             f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQUERADE_MARK} '
             "-j ACCEPT",
             '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate '
             "RELATED,ESTABLISHED -j ACCEPT",
             *filter_rules, *jumps["filter"], "COMMIT",
             "*nat", *(f":{chain} - [0:0]" for chain in [*NAT_CHAINS, *service_chains, *stale]),
             f"-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK} -j RETURN",
             "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
             '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
             "-j MASQUERADE --random-fully",
             "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
             *nat_rules,
             '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule '
             'in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
             *(f"-X {chain}" for chain in stale), *jumps["nat"], "COMMIT", ""]
    return "\n".join(lines)


def program_node(state: lab.LabState, node: lab.NodeState) -> None:
    """(Re)program every Service in `state.services` on `node`, as kube-proxy's sync does (one iptables-save, one
    restore). The node's mount namespace must be up (`lab.start_node_mounts`); pass a state read from disk
    (`lab.require_state`) to include Services that `wgcni-lab service-add` added after the caller loaded its own."""
    saved = lab.in_node(node, ["iptables-save"]).stdout
    tables: dict[str, list[str]] = {}
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        tables.setdefault(table, []).append(line)
    existing = [match[1] for line in tables.get("nat", []) if (match := _CHAIN.match(line))]
    missing = [(jump_table, chain, rule) for jump_table, chain, rule in JUMPS
               if f"-A {chain} {rule}" not in tables.get(jump_table, [])]
    lab.in_node(node, ["iptables-restore", "-w", "--noflush"], input=render(state, node, existing, missing))


def _program_everywhere(state: lab.LabState) -> None:
    for node in state.nodes:
        program_node(state, node)


def service_json(service: lab.ServiceState) -> dict[str, object]:
    return {"name": service.name, "namespace": lab.POD_NAMESPACE, "cluster_ip": service.cluster_ip,
            "port": service.port, "protocol": PROTOCOL.upper(), "node_port": service.node_port or None,
            "external_traffic_policy": service.external_traffic_policy or None, "endpoints": service.endpoints}


def _free_cluster_ip(state: lab.LabState) -> str:
    taken = {service.cluster_ip for service in state.services}
    for offset in range(FIRST_CLUSTER_IP, SERVICE_CIDR.num_addresses - 1):
        candidate = str(SERVICE_CIDR.network_address + offset)
        if candidate not in taken:
            return candidate
    raise lab.LabError(f"no free ClusterIP left in {SERVICE_CIDR}")


def add_service(state: lab.LabState, name: str, pods: Iterable[str], port: int, node_port: int = 0,
                external_traffic_policy: str = "") -> lab.ServiceState:
    """A Service over `pods` (its endpoints, port = targetPort), of type NodePort when `node_port` is given; then
    programmed on every node."""
    if not _NAME.match(name):
        raise lab.LabError(f"service name {name!r} is not a DNS-1035 label (lower-case letters, digits, '-')")
    if any(service.name == name for service in state.services):
        raise lab.LabError(f"a service {name!r} already exists (`wgcni-lab service-del {name}` first)")
    if not 1 <= port <= 65535:
        raise lab.LabError(f"port {port} is not in 1-65535")
    if node_port and node_port not in NODE_PORT_RANGE:
        raise lab.LabError(f"node port {node_port} is not in the NodePort range "
                           f"{NODE_PORT_RANGE.start}-{NODE_PORT_RANGE.stop - 1}")
    if node_port and any(service.node_port == node_port for service in state.services):
        raise lab.LabError(f"node port {node_port} is taken by another service")
    if external_traffic_policy and not node_port:
        raise lab.LabError("externalTrafficPolicy applies to NodePort services only: give --node-port")
    if external_traffic_policy and external_traffic_policy not in POLICIES:
        raise lab.LabError(f"externalTrafficPolicy {external_traffic_policy!r} is not one of {', '.join(POLICIES)}")
    names = list(dict.fromkeys(pods))
    if not names:
        raise lab.LabError("a service needs at least one endpoint: give --pod")
    endpoints = []
    for pod_name in names:
        node, pod = lab.find_pod(state, pod_name)
        endpoints.append({"pod": pod["name"], "ip": pod["ip"], "node": node.name})
    service = lab.ServiceState(name=name, cluster_ip=_free_cluster_ip(state), port=port, node_port=node_port,
                               external_traffic_policy=(external_traffic_policy or "Cluster") if node_port else "",
                               endpoints=endpoints)
    state.services.append(service)
    state.save()
    _program_everywhere(state)
    return service


def delete_service(state: lab.LabState, name: str) -> lab.ServiceState:
    """Remove the Service and every rule it added on every node."""
    for service in state.services:
        if service.name == name:
            state.services.remove(service)
            state.save()
            _program_everywhere(state)
            return service
    known = ", ".join(service.name for service in state.services) or "none"
    raise lab.LabError(f"no service {name!r} in the lab (services: {known})")
