"""A short fingerprint of a model's weights: which global model a site received, and which one the
server sent, can be compared in the round report without moving any weights.

It is a SHA-256 over the sorted keys and the raw bytes of every tensor (12 hex digits shown);
hashing a 100 MB model takes a fraction of a second, once per round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

#: meta key of a site's update: the fingerprint of the global model the site received this round
RECEIVED_KEY = "fedseg_received_model"


def model_fingerprint(params: Mapping[str, Any]) -> str:
    """12 hex digits identifying ``params`` (torch tensors or numpy arrays) byte for byte."""
    digest = hashlib.sha256()
    for key in sorted(params):
        value = params[key]
        array = value.detach().cpu().contiguous().numpy() if hasattr(value, "detach") else np.ascontiguousarray(value)
        digest.update(key.encode())
        digest.update(str(array.dtype).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:12]
