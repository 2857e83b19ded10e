"""The error of install-cni and uninstall-cni: a refusal or failure told in one line."""


class InstallError(Exception):
    """install-cni or uninstall-cni cannot proceed; the message is one line saying what is wrong and what to do."""
