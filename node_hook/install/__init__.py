"""install-cni and uninstall-cni: the wgcni plugin on a node, chained right after azure-vnet.

install-cni does two things, in this order, so a conflist never names a plugin that is not there yet:
1. installs the plugin into the CNI bin dir;
2. inserts `{"type": "wgcni", ...settings}` right after `azure-vnet` in the config the runtime actually uses.
uninstall-cni restores the conflists first, then removes the plugin. containerd tears pods down with the *current*
conflist, so pods created while wgcni was installed do not need the binary for DEL after uninstall.

One module per concern:
- settings: the node's CNI directories, the image's plugin, the names wgcni uses there, the plugin's entry;
- errors: InstallError, the one-line refusal that changed nothing;
- conflist_text: the conflist text edit that keeps the file's formatting (pure);
- conflist_files: the active conflist, its backup, one edit planned then applied, and its undo;
- plugin_files: the plugin executable or bundle in the CNI bin dir (digest, fsync, symlink swap);
- installation: install and uninstall as a whole, under the conf dir's lock;
- watch: `--watch` and `--wait`, installing again whenever the conf dir changes;
- cli: the `install-cni` and `uninstall-cni` commands, registered by node_hook/cli.py.
"""
