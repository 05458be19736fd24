"""Test support for applications and for third-party seams.

* :class:`MemoryL2`, :class:`MemoryHub` and :class:`MemoryTransport`: a cache without Redis,
  with faults on demand. Several caches on one L2 and one hub behave like processes sharing a
  Redis::

      from hybridinval import HybridCache
      from hybridinval.testing import MemoryHub, MemoryL2

      l2, hub = MemoryL2(), MemoryHub()
      a = HybridCache(l2=l2, transport=hub.transport())
      b = HybridCache(l2=l2, transport=hub.transport())

* Behaviour suites for every seam (:class:`L1StoreContract`, :class:`L2StoreContract`,
  :class:`TransportContract`, :class:`SerializerContract`): subclass one with a factory to check
  your own implementation the way hybridinval checks its own.
"""

from ._contracts import (
    L1StoreContract,
    L2StoreContract,
    RecordingListener,
    SerializerContract,
    TransportContract,
)
from ._memory import MemoryHub, MemoryL2, MemoryTransport

__all__ = [
    "L1StoreContract",
    "L2StoreContract",
    "MemoryHub",
    "MemoryL2",
    "MemoryTransport",
    "RecordingListener",
    "SerializerContract",
    "TransportContract",
]
