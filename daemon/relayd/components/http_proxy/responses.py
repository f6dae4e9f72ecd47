"""The responses half of a client connection's exchange core (``core.ClientCore``, its
subclass): the proxy's own replies, an upstream's response forwarded to the client, and the
end of each exchange (``_finish``: counted, upstream connection released or pooled, the next
exchange started or the connection closed). Also the actions the core asks of its shell.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from . import exchange as xc
from .exchange import Exchange, chunk, header_value, json_message, simple_response
from .http1 import ResponseHead
from .pages import HTML, HTML_HEADERS, error_page, wants_html

if TYPE_CHECKING:
    from .http1 import RequestReader
    from .routes import Router

log = logging.getLogger("relayd.http_proxy")


class ProxyIO(Protocol):
    """The actions the core asks of its shell."""

    def now(self) -> float: ...
    def send(self, *parts: bytes) -> None: ...  # to the client
    def close(self, linger: bool = False) -> None: ...  # the client connection, after what was sent
    def abort(self) -> None: ...
    def set_reading(self, on: bool) -> None: ...
    def wake_at(self, when: float) -> None: ...
    def authenticate(self, ex: Exchange) -> None: ...  # later: auth_result / auth_refused
    def browser_endpoint(self, ex: Exchange, method: Any, target: str) -> None: ...  # later: reply
    def connect(self, ex: Exchange, pooled: bool) -> None: ...  # later: upstream_ready / _failed
    def send_upstream(self, ex: Exchange, *parts: bytes) -> None: ...
    def release_upstream(self, ex: Exchange, reusable: bool) -> None: ...
    def splice(self, ex: Exchange, length: int) -> bool: ...  # the rest of a body, in the kernel
    def record(self, ex: Exchange) -> None: ...  # usage counters



class ResponseSide:
    # Made by ClientCore.__init__ (see there).
    router: Router
    io: ProxyIO
    tls: bool
    reader: RequestReader | None
    ex: Exchange | None
    last: Exchange | None
    queue: deque[Exchange]
    queued_bytes: int
    closed: bool
    draining: bool
    served: int
    upstream_full: bool
    _reading: bool
    _advancing: bool

    def _advance(self) -> None:  # ClientCore's: the next exchange in order
        raise NotImplementedError

    def _update_reading(self) -> None:  # ClientCore's: pause or resume reading the client
        raise NotImplementedError

    # -- responses -----------------------------------------------------------------------------

    def _response_head(self, ex: Exchange, head: ResponseHead) -> None:
        ex.status = head.status
        # An Upgrade the upstream declined leaves bytes of another protocol behind: close after.
        closing = self.draining or not ex.request_complete or ex.req.upgrade is not None
        ex.resp_head = xc.client_head(ex, head, self.tls, closing)
        if head.status == 101:
            ex.tunnel = True
            self._flush_head(ex)
            if ex.pending:  # client bytes that arrived before the switch
                pending = ex.pending
                self._sent_pending(ex)
                ex.bytes_in += sum(map(len, pending))
                self.io.send_upstream(ex, *pending)

    def _flush_head(self, ex: Exchange, body: bytes = b"") -> None:
        head, ex.resp_head = ex.resp_head, b""
        if body:
            self.io.send(head, body)  # one write for head and body: on loopback a send costs much
        elif head:
            self.io.send(head)

    def _response_body(self, ex: Exchange, data: bytes) -> None:
        if ex.body_mode == xc.NO_BODY:
            return
        ex.bytes_out += len(data)
        if ex.body_mode == xc.CHUNKED:
            data = chunk(data)
        if ex.resp_head:
            self._flush_head(ex, data)
        else:
            self.io.send(data)

    def _to_client(self, ex: Exchange, data: bytes) -> None:
        ex.bytes_out += len(data)
        self.io.send(data)

    def _response_done(self, ex: Exchange, reusable: bool) -> None:
        if ex.tunnel or ex.finished:
            return
        if ex.resp_head or ex.body_mode == xc.CHUNKED:
            self._flush_head(ex, xc.LAST_CHUNK if ex.body_mode == xc.CHUNKED else b"")
        if not ex.request_complete:
            # The upstream answered before the whole request body was read: the rest of the body
            # cannot be sent to this upstream connection, so neither connection is reused.
            self._finish(ex, reusable=False, keep_client=False)
        else:
            self._finish(ex, reusable=reusable)

    def reply(self, ex: Exchange, status: int, body: bytes, headers: list[bytes] | None = None,
              close: bool = False, content_type: bytes = b"application/json", page: bytes | None = None) -> None:
        """A response of the proxy's own, before anything of the exchange was forwarded.

        To a browser (``Accept: text/html``) an error, or a step with a ``page``, goes as HTML."""
        if ex.finished:
            return
        if (page is not None or (status >= 400 and body)) and content_type == b"application/json" \
                and wants_html(ex.req.headers):
            # A person's browser: the same answer as a page (API clients keep the JSON).
            body = page if page is not None else error_page(self.router.core.pages, ex, status, body)
            content_type = HTML
            headers = [*(headers or ()), *HTML_HEADERS]
        # A body still arriving is not worth reading to keep the connection: close after.
        keep = ex.keep_alive and ex.request_complete and not close and not self.draining
        if not self.closed:
            head_request = ex.req.method == b"HEAD"
            self.io.send(simple_response(status, body, headers, not keep, content_type, head_request))
            if not head_request:
                ex.bytes_out += len(body)
        ex.status = status
        self._finish(ex, reusable=False, keep_client=keep)

    def browser_reply(self, ex: Exchange, answer: Any) -> None:
        """The answer of a browser login step (``BrowserAnswer``): a redirect, or message and page."""
        if answer.location is not None:
            self.reply(ex, answer.status, b"", [b"Location: " + header_value(answer.location), *answer.headers])
            return
        page = None
        if wants_html(ex.req.headers):
            page = self.router.core.pages.render(answer.page, answer.status,
                                                 **{"message": answer.message, **answer.values})
        self.reply(ex, answer.status, json_message(answer.message), answer.headers, page=page)

    def auth_refused(self, ex: Exchange, status: int, message: str, headers: list[bytes]) -> None:
        self.reply(ex, status, json_message(message), headers)

    def fail(self, ex: Exchange, status: int, message: str) -> None:
        """The exchange failed: answer with status if nothing was sent yet, else cut."""
        if ex.finished:
            return
        if status >= 500 and ex.route is not None:
            log.info("%s %s %s: %d %s", ex.route.name, ex.req.method.decode(), ex.target[:200], status,
                     message)
        if ex.upstream is not None:
            self.io.release_upstream(ex, reusable=False)
            ex.upstream = None
        if (ex.status == 0 or ex.resp_head) and not self.closed:  # nothing of a response written yet
            ex.resp_head = b""
            self.reply(ex, status, json_message(message), close=True)
        else:
            self.abort(ex)

    def abort(self, ex: Exchange) -> None:
        if not ex.finished:
            self._finish(ex, reusable=False, keep_client=False, abort=True)

    def _sent_pending(self, ex: Exchange) -> None:
        if ex.pending_size:
            self.queued_bytes -= ex.pending_size
            ex.pending = []
            ex.pending_size = 0
            self._update_reading()

    def _finish(self, ex: Exchange, reusable: bool, keep_client: bool | None = None,
                abort: bool = False) -> None:
        if ex.finished:
            return
        ex.finished = True
        self.served += 1
        if ex.counted:
            self.io.record(ex)
        if ex.upstream is not None:
            self.io.release_upstream(ex, reusable and ex.request_complete and not ex.tunnel)
            ex.upstream = None
        if ex.pending_size:
            self._sent_pending(ex)
        self.upstream_full = False  # the upstream connection is released: its flow control too
        keep = ex.keep_alive if keep_client is None else keep_client
        if ex is self.ex:
            self.ex = None
        if self.closed:
            return
        if abort or not keep:
            # The client may still be sending (a body refused early, bytes after a bad head):
            # the shell then lingers, so the answer is not lost to a reset (RFC 9112 9.6).
            linger = not ex.request_complete or ex.error is not None or (
                self.reader is not None and self.reader.in_head)
            self.closed = True
            self.queue.clear()
            self.reader = None
            self.last = None
            if abort:
                self.io.abort()
            else:
                self.io.close(linger)
            return
        if not self._advancing:
            self._advance()
            if not self._reading:
                self._update_reading()
