"""The error type for mistakes a user can fix. It lives with the data contract (which raises it
for bad tables) so that the contract imports nothing of the code that uses it; the stages'
library re-exports it (``stages.lib.errors.UserError``) and prints it as one line."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: bad input, bad config, mismatched models, a locked run dir."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        s = self.what
        if self.where:
            s += f" ({self.where})"
        if self.fix:
            s += f". Fix: {self.fix}"
        # one line, even when a name read from disk holds a line break
        return s.replace("\r", "\\r").replace("\n", "\\n")
