"""Appliers: the only code in the hook with side effects (WireGuard backends, routes/rules, firewall, sysctl)."""
