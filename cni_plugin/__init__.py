"""wgcni chained CNI plugin: runs after azure-vnet on every pod ADD/DEL and records the pod's IPs for the node hook."""
