"""A TCP proxy before the service that loses answers on purpose: the fault a client's retries are for."""

import socket
import threading
from collections.abc import Callable

from support.servers import free_port


class AnswerCutter:
    """Pass connections through to the service on `upstream_port`, but drop the next `cuts` answers.

    The request reaches the service whole and the service answers; the proxy
    closes both sides as the first bytes of the answer come back, after calling
    `on_cut`. To the client this is a connection cut between its request and
    the answer: it cannot know whether the request took effect.
    """

    def __init__(self, upstream_port: int, cuts: int = 1, on_cut: Callable[[], None] = lambda: None) -> None:
        self.upstream_port, self.cuts, self.on_cut = upstream_port, cuts, on_cut
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:  # the service is down: the client sees its connection closed
            client.close()
            return
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        cut = False
        while data := self._recv(upstream):
            if self.cuts > 0:
                self.cuts, cut = self.cuts - 1, True
                break
            try:
                client.sendall(data)
            except OSError:
                break
        if cut:
            self.on_cut()  # before the client hears of the cut: its retry finds the fault done
        self._close(client)
        self._close(upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while data := self._recv(source):
            try:
                sink.sendall(data)
            except OSError:
                break
        self._close(sink)

    @staticmethod
    def _close(sock: socket.socket) -> None:
        """Shut the connection down first: a plain close() leaves it open while the other pump reads it."""
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already shut down by the other side's pump
            pass
        sock.close()

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    def close(self) -> None:
        self.listener.close()
