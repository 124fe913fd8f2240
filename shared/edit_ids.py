"""How unlearning edits are named, on devices and in the coordinator's ledger.

A request's edits are named per request and per device (`<request>:<device tag>`),
so that the ledger can hold the edits of several devices for one request, and a
device that is asked again finds the edits it already made. The coordinator
writes a ledger file per edit, so an id from a device is checked in full here
before anything uses it as part of a name.
"""

from __future__ import annotations

import re

SHARED_EDIT_PREFIX = "shared:"  # the edit of the shared model (sent to the coordinator)
DEVICE_EDIT_PREFIX = "device:"  # the edit of the device's own model (never leaves it)
_DEVICE_TAG = 12  # hex digits of the device's salt that name its edits


def edit_name(request_id: str, salt: str) -> str:
    """The name both of a device's edits for `request_id` share."""
    return f"{request_id}:{salt[:_DEVICE_TAG]}"


def is_shared_edit_of(edit_id: str, request_id: str) -> bool:
    """Whether `edit_id` is a device's shared edit for `request_id`, and nothing more."""
    pattern = re.escape(SHARED_EDIT_PREFIX + request_id) + f":[0-9a-f]{{{_DEVICE_TAG}}}"
    return re.fullmatch(pattern, edit_id) is not None
