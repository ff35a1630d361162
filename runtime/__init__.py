"""Sessions on each backend, the numeric references, and the check that compares them."""

from runtime.session import Session
from runtime.signature import InputError

__all__ = ["InputError", "Session"]
