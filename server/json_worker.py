"""The JSON parser process (``python -m server.json_worker``): parses request bodies of many
values away from the server's event loop.

``json.loads`` is one C call that holds the GIL: a body of four million tiny values takes the
server's only event loop for half a second, and a thread would not help. This process takes
such bodies from ``server.api.json_body.JsonLane`` and answers with the parsed body, or the
reason it is refused, bounded by ``server.json_parse``'s limits, so what the server has to
load back is small.

Frames, both ways: an 8-byte big-endian length, then that many bytes. A request frame is the
body's bytes; an answer frame is ``marshal`` of ``("ok", body)`` or
``("error", message, code, param)`` (a parsed JSON body holds only the plain types ``marshal``
writes). The process ends when its input closes.
"""

from __future__ import annotations

import marshal
import struct
import sys
from typing import Any, BinaryIO

from server.json_parse import BodyError, parse

HEADER = struct.Struct(">Q")


def serve(source: BinaryIO, sink: BinaryIO) -> None:
    """Answer request frames from ``source`` on ``sink`` until ``source`` closes."""
    while len(head := source.read(HEADER.size)) == HEADER.size:
        (size,) = HEADER.unpack(head)
        raw = source.read(size)
        if len(raw) < size:
            return
        try:
            answer: tuple[Any, ...] = ("ok", parse(raw))
        except BodyError as exc:
            answer = ("error", exc.message, exc.code, exc.param)
        del raw
        frame = marshal.dumps(answer)
        sink.write(HEADER.pack(len(frame)))
        sink.write(frame)
        sink.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
