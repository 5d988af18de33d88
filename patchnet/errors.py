"""The one base class of every error about the user's input or run, so callers catch exactly these."""


class PatchnetError(Exception):
    """A problem the user can fix; the message names the file or field, the accepted values and the fix."""
