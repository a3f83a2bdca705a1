"""The project's error for problems a user can fix: a file, a config, a setting, a command line.

Raise :class:`C2SegError` (or one of its subclasses: ``ConfigError``, ``SceneError``, ``CheckpointError``,
...) with one line that names the file or setting and the problem. ``c2seg`` prints it as
``c2seg STAGE: error: ...`` and exits with status 2. Any other exception is a bug in c2seg and keeps its
traceback. It derives from ``ValueError`` so that callers that caught ``ValueError`` still do.
"""

from __future__ import annotations


class C2SegError(ValueError):
    """A problem with the user's input, told in one line."""
