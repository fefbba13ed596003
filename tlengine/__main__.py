"""``python -m tlengine``."""

from tlengine._cli import entry

entry()
