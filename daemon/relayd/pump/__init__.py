"""Byte pumps: move the bytes of one connection to another, both ways, and nothing else.

A pump knows nothing of sessions, users or policies. Its owner gives it two connections, an
optional rate gate per direction (a `TokenBucket`), a callback told how many bytes went which
way, and a callback for when both connections are closed. It keeps backpressure (a slow reader
stalls the writer instead of growing memory) and half-close (an EOF one way is forwarded while
the other way keeps flowing).

Three implementations:
- `ProtocolPump` (``protocol.py``): asyncio ``BufferedProtocol`` on the event loop; works with
  any transport (TLS included).
- `SplicePump` (``splice.py``): plain TCP sockets only; splice(2) socket -> pipe -> socket in
  two threads per connection. The bytes never enter Python and the GIL is released in the
  syscalls, so several connections use several cores.
- `TlsPump` (``tls.py``): the splice pump's threads with TLS on either side (``SSLObject``
  over memory BIOs; OpenSSL works without the GIL); the handshake is done first on the event
  loop (``tls.handshake``).
"""

from relayd.pump.gate import TokenBucket
from relayd.pump.protocol import ProtocolPump, PumpSide
from relayd.pump.splice import SPLICE_AVAILABLE, SplicePump

__all__ = ["SPLICE_AVAILABLE", "ProtocolPump", "PumpSide", "SplicePump", "TokenBucket"]
