"""Errors a user can cause. Each carries one sentence that names the input and the fix.

The CLI and the UI catch `UserError` at the edge and show only its message; anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, said in one sentence."""


class HubUnavailable(UserError):
    """A model, fuser or dataset needed the Hugging Face hub and it could not be reached."""


class OutOfMemory(UserError):
    """The device ran out of memory during a run (records already written are kept)."""
