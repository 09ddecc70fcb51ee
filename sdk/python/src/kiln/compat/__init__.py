"""Drop-in modules for programs written against other sandbox SDKs: change only the import.

* ``kiln.compat.smolvm``: ``from kiln.compat.smolvm import SmolVM, SmolVMManager, SnapshotType, ...``

Programs written for nullspace's ``Sandbox``/``Snapshot`` need no shim: ``from kiln import Sandbox, Snapshot``.
"""
