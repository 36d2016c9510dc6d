"""The decision core: pure functions that decide every allow and deny.

No storage, asyncssh, socket or clock imports (checked by import-linter): each
function takes a :class:`~bastion.authz.facts.Facts` read in one transaction and
``now``, and either returns what is allowed or raises the ``AccessDenied`` /
``DeviceNotTrusted`` whose message the user and the audit log see.
"""
