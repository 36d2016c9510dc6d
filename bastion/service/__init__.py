"""``dt-bastion serve`` as a service an admin runs under systemd.

The SSH front is :mod:`bastion.proxy`; this package is what runs around it: the log
lines (:mod:`.logs`), readiness and state for systemd (:mod:`.notify`), reloading the
config on SIGHUP (:mod:`.reload`), draining on SIGTERM (:mod:`.drain`), the /metrics
and /healthz listener (:mod:`.metrics`), and the process's life from start to exit
(:mod:`.run`).
"""
