"""Server-sent events in OpenAI's streaming format: ``data: {chunk}\\n\\n`` … ``data: [DONE]``.

Chat streams open each choice with a ``{"role": "assistant", "content": ""}`` delta; every
choice ends with a chunk carrying its ``finish_reason``; with ``include_usage`` every chunk has
``"usage": null`` and one last chunk with no choices carries the usage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from server.api.errors import to_api_error
from server.api.jobs import ClientGone, Job, TextDeltas, usage
from server.api.logprobs import TokenTexts, chat_logprobs
from server.engine.request import RequestOutput

log = logging.getLogger(__name__)


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


async def events(
    job: Job,
    first: tuple[int, RequestOutput],
    meta: Any,
    n: int,
    stops: Sequence[str],
    include_usage: bool,
    texts: TokenTexts,
) -> AsyncIterator[str]:
    """The whole stream of one request; aborts the engine requests however it ends.

    Logprobs travel with the text: each chunk carries those of the tokens generated since the
    previous chunk of its choice (text held back holds its tokens' logprobs back too). With
    echo, a choice's first chunk is its prompt, with the prompt's logprobs."""
    total = len(job.sub.ids)
    deltas = [TextDeltas(stops) for _ in range(total)]
    latest: list[RequestOutput | None] = [None] * total
    shapes = [meta.completion_logprobs(texts) if not meta.chat else None for _ in range(total)]
    sent = [0] * total  # tokens whose logprobs were sent, per choice
    try:
        if meta.chat:
            for i in range(total):
                yield sse(
                    _chunk(meta, i, {"role": "assistant", "content": ""}, None, include_usage)
                )
        item: tuple[int, RequestOutput] | None = first
        done: set[int] = set()
        while item is not None:
            index, out = item[0], meta.shown(item[1])
            if latest[index] is None and meta.echo is not None:
                text, part = meta.echo_part(shapes[index], out, index // n)
                yield sse(_chunk(meta, index, text, None, include_usage, part))
            latest[index] = out
            if out.finished:
                done.add(index)
            text = deltas[index].update(out)
            if text or out.finished:
                reason = out.finish_reason if out.finished else None
                body = {"content": text} if meta.chat else text
                if meta.chat and out.finished and not text:
                    body = {}
                new = (out.logprobs or [])[sent[index] :]
                sent[index] += len(new)
                logprobs = None
                if meta.chat and meta.logprobs is not None:
                    logprobs = chat_logprobs(texts, new, meta.logprobs)
                elif (shape := shapes[index]) is not None:
                    logprobs = shape.part(new, [e.token for e in new], first_null=False)
                yield sse(_chunk(meta, index, body, reason, include_usage, logprobs))
            # Read until each choice's final output: an error may still be queued after it.
            item = None if len(done) == total else await job.next()
        if include_usage:
            yield sse(_usage_chunk(meta, usage(latest, n)))  # type: ignore[arg-type]
        yield sse("[DONE]")
    except ClientGone:
        return
    except Exception as exc:  # headers are sent: the error goes in the stream
        err = to_api_error(exc)
        job.error_type = err.body()["error"]["type"]  # for the request's log line
        if job.metrics is not None:
            job.metrics.count_error(job.error_type)
        yield sse(err.body())
        yield sse("[DONE]")
    finally:
        job.close()


def _chunk(
    meta: Any,
    index: int,
    body: Any,
    reason: str | None,
    include_usage: bool,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index}
    if meta.chat:
        choice["delta"] = body
    else:
        choice["text"] = body
    choice["logprobs"] = logprobs
    choice["finish_reason"] = reason
    chunk = {
        "id": meta.id,
        "object": "chat.completion.chunk" if meta.chat else "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def _usage_chunk(meta: Any, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "chat.completion.chunk" if meta.chat else "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage,
    }
