"""wgcni-node: the node hook that owns the WireGuard device, peers, routing and firewall state of one node."""
