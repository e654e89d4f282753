"""An event-stream reader written from the WHATWG HTML Standard, to check extproc's SSE splitter.

Written from the standard's text alone, never from ``extproc.accounting.sse``: whatwg/html,
file ``source``, section "Interpreting an event stream" (id ``event-stream-interpretation``), at
commit 508a037333d8a1806504303aeb489d931fabbef6; published at
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation.
It follows the steps for web browsers, one function per step, with the standard's wording.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LF, CR, COLON, SPACE, NULL, BOM = "\n", "\r", ":", " ", "\x00", "\ufeff"


@dataclass(frozen=True)
class MessageEvent:
    """What a browser dispatches: its type, data and lastEventId."""

    type: str
    data: str
    last_event_id: str


@dataclass
class EventStream:
    """The buffers the standard associates with a stream being parsed, and what it dispatched."""

    data: str = ""
    event_type: str = ""
    last_event_id: str = ""
    last_event_id_string: str = ""  # the event source's
    reconnection_time: int | None = None
    dispatched: list[MessageEvent] = field(default_factory=list)


def interpret(body: bytes) -> EventStream:
    """Decode with UTF-8 decode (one leading BOM stripped), then process line by line."""
    text = body.decode("utf-8", errors="replace")
    if text.startswith(BOM):
        text = text[1:]
    stream = EventStream()
    for line in lines(text):
        process_line(stream, line)
    # "Once the end of the file is reached, any pending data must be discarded."
    return stream


def lines(text: str) -> list[str]:
    """Complete lines: each ends in CRLF, an LF not after a CR, or a CR not before an LF.

    Text after the last line end is not a line yet (the stream ended inside it): left out.
    """
    out: list[str] = []
    start = i = 0
    while i < len(text):
        char = text[i]
        if char == CR:
            out.append(text[start:i])
            i += 2 if text[i + 1 : i + 2] == LF else 1
            start = i
        elif char == LF:
            out.append(text[start:i])
            i += 1
            start = i
        else:
            i += 1
    return out


def process_line(stream: EventStream, line: str) -> None:
    if line == "":
        dispatch(stream)
    elif line.startswith(COLON):
        return  # a comment
    elif COLON in line:
        name, _, value = line.partition(COLON)
        if value.startswith(SPACE):
            value = value[1:]
        process_field(stream, name, value)
    else:
        process_field(stream, line, "")


def process_field(stream: EventStream, name: str, value: str) -> None:
    """Field names are compared literally, without case folding."""
    if name == "event":
        stream.event_type = value
    elif name == "data":
        stream.data += value + LF
    elif name == "id" and NULL not in value:
        stream.last_event_id = value
    elif name == "retry" and value and all("0" <= c <= "9" for c in value):
        stream.reconnection_time = int(value)
    # otherwise (an unknown field, an id holding NULL, a retry that is not digits): ignored


def dispatch(stream: EventStream) -> None:
    stream.last_event_id_string = stream.last_event_id
    if stream.data == "":
        stream.data = stream.event_type = ""
        return
    data = stream.data[:-1] if stream.data.endswith(LF) else stream.data
    stream.dispatched.append(MessageEvent(stream.event_type, data, stream.last_event_id_string))
    stream.data = stream.event_type = ""
