"""wgcni chained CNI plugin: runs after azure-vnet on every pod ADD/DEL and records the pod's IPs for the node hook."""

__version__ = "0.1.0"  # kept equal to pyproject.toml's version by tests/cni/test_cli.py
