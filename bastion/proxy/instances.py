"""Moved to :mod:`bastion.storage.instances` (liveness is the store's now: see
``StateStore.hold_instance``). This name is that very module, for old imports."""

import sys

from bastion.storage import instances

sys.modules[__name__] = instances
