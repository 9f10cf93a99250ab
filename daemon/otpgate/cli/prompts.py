"""Where an ordinary user's password and code come from: the terminal, or stdin.

Never from the command line, where other users could read them in ps.
"""

from __future__ import annotations

import getpass
import sys
import warnings
from typing import Protocol

from otpgate.errors import ClientError


class Secrets(Protocol):
    def ask(self, prompt: str) -> str:
        """The next answer; ClientError when there is nothing to ask or read."""
        ...

    def tell(self, message: str) -> None:
        """A note between two questions (why the next one is asked)."""
        ...


class TerminalSecrets:
    """Asks on the controlling terminal without echo, as su and ssh do."""

    def ask(self, prompt: str) -> str:
        # Without a terminal getpass warns (GetPassWarning, several lines on stderr) and
        # reads stdin with echo instead: refuse that in one line and name the way out.
        with warnings.catch_warnings():
            warnings.simplefilter("error", getpass.GetPassWarning)
            try:
                return getpass.getpass(prompt)
            except (getpass.GetPassWarning, EOFError, OSError):
                raise ClientError(
                    "no terminal to ask for the password or code: use --password-stdin"
                ) from None

    def tell(self, message: str) -> None:
        print(f"otpgate: {message}", file=sys.stderr, flush=True)


class StdinSecrets:
    """--password-stdin: one answer a line, for scripts."""

    def ask(self, prompt: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise ClientError("--password-stdin: stdin ended before the password or code")
        return line.rstrip("\n")

    def tell(self, message: str) -> None:
        pass  # a script gets the outcome as the error, if it comes to one
