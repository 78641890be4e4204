"""The one exception type for mistakes a user can make: the CLI prints its message and exits 2."""


class FerlabError(Exception):
    """A user-facing error: its message is one sentence saying what is wrong and what to do."""
