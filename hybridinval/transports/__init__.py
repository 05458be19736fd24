"""Backplane transports: the :class:`Transport` seam and its implementations."""

from ._base import TICK_INTERVAL, BackplaneListener, Transport
from .redis_pubsub import RedisPubSubTransport

__all__ = ["TICK_INTERVAL", "BackplaneListener", "RedisPubSubTransport", "Transport"]
