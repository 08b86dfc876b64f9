"""Rehearsal: tools that drive the real bot against the sandbox emulators.

``make run`` without tokens (``sandbox_mode``: the emulators and a terminal chat),
``python -m rehearsal simulate`` (load with injected faults, and a report on the promise) and
the ``ledger`` of what each user saw. This package sits above both ``bot/`` and ``sandbox/``:
it imports both, neither imports it.
"""
