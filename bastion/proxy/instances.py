"""Moved to :mod:`bastion.storage.instances` (liveness is the store's now: see
``StateStore.hold_instance``); kept for old imports."""

from bastion.storage.instances import (  # noqa: F401
    RUN_DIR,
    InstanceLock,
    claim_if_dead,
    is_alive,
    run_dir,
    stale_names,
)
