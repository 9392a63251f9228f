"""The one error class for bad input: the CLI prints a ``UserError`` in one line and exits 2.

Anything else that escapes is a bug and keeps its traceback. Subclasses name what was wrong
(``AdapterError``, ``BundleError``, ``InfeasibleBudget``, ...); the message names the file, tensor
or option at fault. It derives from ``ValueError`` so that callers of the library that catch
``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or an impossible request, explained in the message."""
