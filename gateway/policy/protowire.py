"""Protocol Buffers wire format, the two pieces the gateway writes by hand.

Only used to render OTLP error bodies (``google.rpc.Status``) without a
protobuf runtime on the data path; the benchmark and the tests build their
payloads with it too.  https://protobuf.dev/programming-guides/encoding/
"""

from __future__ import annotations

__all__ = ["length_delimited", "varint"]


def varint(n: int) -> bytes:
    """Base-128 varint; negative numbers as 64-bit two's complement (int64)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field: int, data: bytes) -> bytes:
    """Field ``field`` with wire type 2: strings, bytes, embedded messages."""
    return varint(field << 3 | 2) + varint(len(data)) + data
