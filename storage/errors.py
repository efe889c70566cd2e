"""The one exception type for bad user input.

Every reader, writer and command raises ``InputError`` with a one-line message that names the
file (or parameter) and what is wrong with it; the CLI turns it into exit code 2.
"""


class InputError(ValueError):
    """Bad input: a missing/corrupt file, an unknown name, a parameter out of range."""
