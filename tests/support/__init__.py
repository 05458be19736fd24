"""Test infrastructure: private Redis servers and a fault-injecting TCP proxy.

Deliberately independent of ``hybridinval`` so it works (and its own tests
pass) before, and regardless of, the library under test.
"""

from .proxy import TcpProxy
from .servers import RedisServer, free_port, redis_ping, redis_server_binary

__all__ = ["RedisServer", "TcpProxy", "free_port", "redis_ping", "redis_server_binary"]
