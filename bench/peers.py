"""The processes of one bench run, each on its own free loopback port.

Sink (nginx + echo) behind every target; the direct path is wrk straight at
it.  Targets: obs-gateway, nginx as the seed configured it, nginx tuned for
streaming, vmauth.  Helpers: the Python stream sink (1 GiB test) and
VictoriaMetrics (checks that the remote-write bodies are valid).  Configs
are rendered from ``templates/`` into the run directory; ``@name@`` marks a
value (nginx already uses ``$``).  With ``tls``, the gateway and tuned nginx
terminate TLS with the same self-signed EC P-256 certificate (made with the
openssl CLI in the run directory).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Procs, free_port

__all__ = [
    "GATEWAY_TEMPLATES",
    "TARGETS",
    "TLS_TARGETS",
    "Peer",
    "Stack",
    "gateway_supports_workers",
]

TEMPLATES = Path(__file__).parent / "templates"
REPO = Path(__file__).resolve().parent.parent
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")  # libnginx-mod-http-echo
TARGETS = (
    "direct",
    "gateway",
    "gateway-2b",
    "gateway-2b-nocopy",
    "nginx-tuned",
    "nginx-seed",
    "vmauth",
)
# Two backends per route (issue 12), replay copies kept or not: config values.
GATEWAY_TEMPLATES = {
    "gateway": ("gateway.toml", {}),
    "gateway-2b": ("gateway-2b.toml", {"replay": 8 * 1024 * 1024}),
    "gateway-2b-nocopy": ("gateway-2b.toml", {"replay": 0}),
}
TLS_TARGETS = ("gateway", "nginx-tuned")


@dataclass
class Peer:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    workers: int = 1
    info: dict[str, str] = field(default_factory=dict)
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid


def gateway_supports_workers() -> bool:
    """Whether this checkout's CLI has ``run --workers`` (issue 5, part 2)."""
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=REPO,
    )
    return "--workers" in out.stdout


def render(template: str, dest: Path, **values: object) -> Path:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    leftover = re.findall(r"@[a-z_]+@", text)
    if leftover:
        raise ValueError(f"{template}: unrendered {leftover}")
    dest.write_text(text)
    return dest


class Stack:
    def __init__(
        self,
        procs: Procs,
        rundir: Path,
        token: str,
        *,
        workers: int,
        sink_workers: int,
        access_log: bool,
        tls: bool = False,
    ) -> None:
        self.procs = procs
        self.tls = tls
        self.cert: tuple[Path, Path] | None = None
        self.rundir = rundir
        self.token = token
        self.workers = workers
        self.sink_workers = sink_workers
        self.access_log = access_log
        self.sink: Peer | None = None
        self.sink_port2 = 0  # the sink's second port: the second backend of gateway-2b
        self.stream_sink_port = 0
        self.vm: Peer | None = None

    def _dir(self, name: str) -> Path:
        d = self.rundir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _certificate(self) -> tuple[Path, Path]:
        """One self-signed certificate for 127.0.0.1, shared by every TLS target."""
        if self.cert is None:
            d = self._dir("tls")
            cert, key = d / "server.crt", d / "server.key"
            subprocess.run(
                [
                    *("openssl", "req", "-x509", "-newkey", "ec"),
                    *("-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"),
                    *("-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"),
                    *("-keyout", str(key), "-out", str(cert)),
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
            self.cert = cert, key
        return self.cert

    def tls_block(self) -> str:
        """The gateway's [server.tls] section ("" without TLS)."""
        if not self.tls:
            return ""
        cert, key = self._certificate()
        return f'[server.tls]\ncert_file = "{cert}"\nkey_file = "{key}"'

    def _nginx(self, name: str, template: str, workers: int, **values: object) -> Peer:
        d = self._dir(name)
        port = free_port()
        # Workers run as the master's user so they can write the temp dirs.
        user = "user root;" if os.geteuid() == 0 else ""
        access = f"{d}/access.log" if self.access_log else "off"
        conf = render(
            template,
            d / "nginx.conf",
            dir=d,
            port=port,
            workers=workers,
            user=user,
            access_log=access,
            token=self.token,
            **values,
        )
        proc = self.procs.start(name, ["nginx", "-p", str(d), "-c", str(conf)], port=port)
        return Peer(name, port, proc, workers)

    def start_sink(self) -> Peer:
        d = self._dir("sink")
        port = free_port()
        self.sink_port2 = free_port()
        conf = render(
            "sink.conf",
            d / "nginx.conf",
            dir=d,
            port=port,
            port2=self.sink_port2,
            workers=self.sink_workers,
            echo_module=ECHO_MODULE,
        )
        proc = self.procs.start("sink", ["nginx", "-p", str(d), "-c", str(conf)], port=port)
        self.sink = Peer("direct", port, proc, self.sink_workers)
        self.stream_sink_port = free_port()
        self.procs.start(
            "stream-sink",
            [sys.executable, "-m", "bench.sink", str(self.stream_sink_port)],
            port=self.stream_sink_port,
            cwd=REPO,
        )
        return self.sink

    def start_vm(self) -> Peer:
        port = free_port()
        argv = [
            "victoria-metrics",
            f"-storageDataPath={self._dir('vm')}/data",
            f"-httpListenAddr=127.0.0.1:{port}",
            "-retentionPeriod=1d",
            "-loggerLevel=ERROR",
        ]
        self.vm = Peer("victoria-metrics", port, self.procs.start("vm", argv, port=port))
        return self.vm

    def vm_rows_inserted(self) -> int:
        """VictoriaMetrics' count of remote-write samples parsed without error."""
        assert self.vm is not None
        url = f"http://127.0.0.1:{self.vm.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        m = re.search(
            r'^vm_protoparser_rows_read_total\{type="promremotewrite"\} (\d+)', text, re.M
        )
        return int(m.group(1)) if m else 0

    def start(self, name: str) -> Peer:
        assert self.sink is not None
        if name == "direct":
            return self.sink
        if name in GATEWAY_TEMPLATES:
            return self.start_gateway(name)
        if name in ("nginx-tuned", "nginx-seed"):
            ssl, ssl_files = "", ""
            if self.tls:
                cert, key = self._certificate()
                ssl = "ssl "
                # The gateway's protocol floor; everything else nginx's defaults.
                ssl_files = (
                    f"ssl_certificate {cert}; ssl_certificate_key {key}; "
                    "ssl_protocols TLSv1.2 TLSv1.3;"
                )
            values = {"sink": self.sink.port, "ssl": ssl, "ssl_files": ssl_files}
            peer = self._nginx(name, f"{name}.conf", self.workers, **values)
            peer.tls = self.tls
            return peer
        if name == "vmauth":
            return self.start_vmauth()
        raise ValueError(f"unknown target {name!r}")

    def start_gateway(self, name: str = "gateway") -> Peer:
        assert self.sink is not None
        d = self._dir(name)
        port, admin = free_port(), free_port()
        template, extra = GATEWAY_TEMPLATES[name]
        conf = render(
            template,
            d / "gateway.toml",
            port=port,
            admin=admin,
            sink=self.sink.port,
            sink2=self.sink_port2,
            **extra,
            stream_sink=self.stream_sink_port,
            vm=self.vm.port if self.vm else 9,
            access="true" if self.access_log else "false",
            token_sha256=hashlib.sha256(self.token.encode()).hexdigest(),
            tls=self.tls_block(),
        )
        argv = [sys.executable, "-m", "gateway", "run", "--config", str(conf)]
        if gateway_supports_workers():
            argv += ["--workers", str(self.workers)]
        elif self.workers != 1:
            raise RuntimeError("this gateway has no --workers: run with --workers 1")
        proc = self.procs.start(name, argv, port=port, cwd=REPO)
        return Peer(name, port, proc, self.workers, {"admin_port": str(admin)}, self.tls)

    def start_vmauth(self) -> Peer:
        assert self.sink is not None
        d = self._dir("vmauth")
        port = free_port()
        conf = render("vmauth.yml", d / "auth.yml", token=self.token, sink=self.sink.port)
        argv = [
            "vmauth",
            f"-auth.config={conf}",
            f"-httpListenAddr=127.0.0.1:{port}",
            "-loggerLevel=ERROR",
        ]
        # Go uses every core by default (GOMAXPROCS = CPUs); left as shipped.
        return Peer("vmauth", port, self.procs.start("vmauth", argv, port=port))
