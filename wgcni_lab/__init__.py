"""wgcni-lab: an AKS-like cluster on one Linux machine (namespaces, containerd CRI, test API server) for demos and
tests."""
