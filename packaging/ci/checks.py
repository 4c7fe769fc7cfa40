#!/usr/bin/env python3
"""Checks of packaging/ that need no container engine; run by packaging/check.sh.

    checks.py static                 Dockerfile, compose and Kubernetes files: the
                                     facts that tie them to each other and to the proxy
    checks.py elf BINARY             the binary needs only what distroless/cc-debian12 has
    checks.py systemd-keys UNIT      the unit's hardening keys (when systemd-analyze cannot run)
    checks.py status-only BINARY     each shipped config passes `xoauth2-proxy status`
                                     (secret paths pointed at a stand-in file)
    checks.py sandbox BINARY         run as root inside `unshare --mount --net`: for the
                                     compose service and the Kubernetes sidecar, build the
                                     image's file system (the binary, its libraries, the CA
                                     bundle, the volume) and run the container's command in
                                     a chroot as its user, with its environment and mounts;
                                     `status` must pass, `serve` must answer /healthz and the
                                     mail greetings (TLS on tls_listen, verified against
                                     `tls ca`; no login before STARTTLS with require_tls),
                                     log no plaintext warning, and end with status 0 on
                                     SIGTERM; the compose file's CA service, run with
                                     busybox, must copy that CA certificate and no key.

Every check prints one line; any failure makes the exit status 1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "packaging"
DOCKERFILE = PKG / "Dockerfile"
COMPOSE = PKG / "docker-compose.yml"
KUBE = PKG / "kubernetes" / "nocobase-xoauth2-proxy.yaml"
CONTAINER_CONFIG = PKG / "config.toml"
README = ROOT / "README.md"

# The build command the Dockerfile runs and CI runs (check.sh); one string for both.
CARGO_BUILD = "cargo build --release --locked"
PROXY_SERVICE = "xoauth2-proxy"
NOCOBASE_IMAGE = "nocobase/nocobase"
# What gcr.io/distroless/cc-debian12 provides: glibc 2.36 (Debian 12), libgcc_s, libstdc++, libgomp.
DISTROLESS_CC_LIBS = {
    "libc.so.6",
    "libm.so.6",
    "libgcc_s.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libutil.so.1",
    "libresolv.so.2",
    "libstdc++.so.6",
    "libgomp.so.1",
}
DEBIAN12_GLIBC = (2, 36)
# Where distroless (like Debian) keeps the CA bundle; rustls-native-certs reads it there.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Where the self-made CA's certificate (alone, no key) lies under state_dir (src/local_tls/ca.rs).
CA_CERT_IN_STATE = "tls/ca.pem"
# What the proxy logs for a plain listener off loopback that takes passwords (src/server.rs).
PLAINTEXT_WARNING = "not on loopback and takes logins without TLS"
# Linux capability numbers, for the compose file's cap_add (linux/capability.h).
CAPABILITIES = {"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3}

failures: list[str] = []


def ok(message: str) -> None:
    print(f"  ok    {message}")


def fail(message: str) -> None:
    print(f"  FAIL  {message}")
    failures.append(message)


def expect(condition: bool, message: str, detail: str = "") -> bool:
    if condition:
        ok(message)
    else:
        fail(message + (f" ({detail})" if detail else ""))
    return condition


def section(title: str) -> None:
    print(f"\n== {title}")


def duration_secs(text: str) -> float:
    """`30s`, `500ms`, `1m30s`, `2m` → seconds (humantime and compose both write these)."""
    total = 0.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", str(text))
    if not parts:
        raise ValueError(f"not a duration: {text!r}")
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


# ---- the Dockerfile -----------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [rest for instr, rest in self.instructions if instr == instruction]


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for rest in self.final.all("ENV"):
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
        return env

    def exec_form(self, instruction: str) -> list[str] | None:
        values = self.final.all(instruction)
        if not values:
            return None
        try:
            parsed = json.loads(values[-1])
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, list) else None

    def user(self) -> tuple[int, int] | None:
        users = self.final.all("USER")
        if not users:
            return None
        uid, _, gid = users[-1].strip().partition(":")
        if not uid.isdigit():
            return None
        return int(uid), int(gid or uid)

    def volumes(self) -> list[str]:
        out: list[str] = []
        for rest in self.final.all("VOLUME"):
            rest = rest.strip()
            out.extend(json.loads(rest) if rest.startswith("[") else rest.split())
        return out

    def exposed(self) -> set[int]:
        ports: set[int] = set()
        for rest in self.final.all("EXPOSE"):
            for word in rest.split():
                ports.add(int(word.split("/")[0]))
        return ports


def parse_dockerfile(path: Path) -> Dockerfile:
    logical: list[str] = []
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue  # comments (also inside continuations, as Docker does) and blank lines
        if line.endswith("\\"):
            buffer += line[:-1].strip() + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if instruction == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        elif not stages and instruction == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
        elif stages:
            stages[-1].instructions.append((instruction, rest))
    return Dockerfile(args=args, stages=stages)


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), text)


def listen_port(config: dict, section_name: str, default: str) -> tuple[str, int]:
    listen = config.get(section_name, {}).get("listen", default)
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def config_ports(config: dict) -> dict[str, tuple[str, int]]:
    """Every listener: imap, smtp, admin, and imap_tls/smtp_tls when tls_listen is set."""
    ports = {
        "imap": listen_port(config, "imap", "127.0.0.1:1143"),
        "smtp": listen_port(config, "smtp", "127.0.0.1:1587"),
        "admin": listen_port(config, "admin", "127.0.0.1:8025"),
    }
    for proto in ["imap", "smtp"]:
        tls_listen = config.get(proto, {}).get("tls_listen")
        if tls_listen:
            host, _, port = tls_listen.rpartition(":")
            ports[f"{proto}_tls"] = (host.strip("[]"), int(port))
    return ports


def check_client_tls(config: dict, where: str, dialled_name: str | None) -> None:
    """A plain listener off loopback must have require_tls (with [tls]); a tls_listen
    needs [tls]; a self-made certificate must name what NocoBase dials."""
    ports = config_ports(config)
    tls = config.get("tls")
    for proto in ["imap", "smtp"]:
        host = ports[proto][0]
        if ipaddress_is_loopback(host):
            ok(f"{where}: the plain {proto.upper()} listener is on loopback ({host}): plain is fine")
        else:
            expect(
                tls is not None and config.get(proto, {}).get("require_tls") is True,
                f"{where}: the plain {proto.upper()} listener binds {host}, so [{proto}] require_tls = true "
                "with [tls] (no password in clear)",
            )
        if f"{proto}_tls" in ports:
            expect(tls is not None, f"{where}: {proto}.tls_listen {ports[proto + '_tls']} has a [tls] section")
    if tls is not None and dialled_name and "cert_file" not in tls:
        names = tls.get("names", ["localhost", "127.0.0.1", "xoauth2-proxy"])
        expect(
            dialled_name in names,
            f"{where}: the self-made certificate names `{dialled_name}`, the host NocoBase dials: {names}",
        )


def check_dockerfile(df: Dockerfile, container_config: dict) -> None:
    section("packaging/Dockerfile")
    expect(len(df.stages) >= 2, "multi-stage build (a build stage and a runtime stage)")
    build = df.stages[0]
    build_image = substitute(build.image, df.args)
    expect(
        build_image.startswith("rust:") and build_image.endswith("-bookworm"),
        f"build stage is the official Rust image on Debian 12: {build_image}",
    )
    runs = " ".join(build.all("RUN"))
    expect(CARGO_BUILD in runs, f"build stage runs `{CARGO_BUILD}`, the command CI runs")
    rust_version = df.args.get("RUST_VERSION", "")
    try:
        local = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout
        local_version = ".".join(local.split()[1].split(".")[:2])
    except (OSError, IndexError):
        local_version = "?"
    if rust_version and local_version != rust_version:
        print(
            f"  note  the Dockerfile builds with Rust {rust_version}, CI with {local_version}: "
            "update ARG RUST_VERSION when CI's toolchain moves"
        )
    else:
        ok(f"the Dockerfile's Rust ({rust_version}) is CI's ({local_version})")

    final = df.final
    expect(
        final.image.startswith("gcr.io/distroless/cc-debian12"),
        f"runtime stage is distroless cc on Debian 12, as the build stage: {final.image}",
    )
    expect(not final.all("RUN"), "runtime stage has no RUN (distroless has no shell)")
    user = df.user()
    expect(user is not None and user[0] != 0, f"runs as a non-root numeric user: {user}")
    env = df.env()
    config_path = env.get("XOAUTH2_PROXY_CONFIG", "")
    state_dir = env.get("XOAUTH2_PROXY_STATE_DIR", "")
    expect(config_path.startswith("/"), f"ENV XOAUTH2_PROXY_CONFIG={config_path}")
    expect(state_dir.startswith("/"), f"ENV XOAUTH2_PROXY_STATE_DIR={state_dir}")
    expect(state_dir in df.volumes(), f"VOLUME {state_dir}")
    chowned = [
        rest
        for rest in final.all("COPY")
        if rest.split()[-1] == state_dir and user and f"--chown={user[0]}:{user[1]}" in rest
    ]
    expect(bool(chowned), f"the state directory is in the image, owned by {user}")
    ports = {p for _, p in config_ports(container_config).values()}
    expect(
        df.exposed() == ports,
        f"EXPOSE {sorted(df.exposed())} = the container config's listen ports {sorted(ports)}",
    )
    entrypoint = df.exec_form("ENTRYPOINT")
    cmd = df.exec_form("CMD")
    expect(
        bool(entrypoint) and entrypoint[0].endswith("/xoauth2-proxy"),
        f"ENTRYPOINT (exec form) is the binary: {entrypoint}",
    )
    expect(cmd == ["serve"], f'CMD ["serve"]: {cmd}')
    copied = [rest for rest in final.all("COPY") if entrypoint and rest.split()[-1] == entrypoint[0]]
    expect(bool(copied), f"the binary is copied to {entrypoint[0] if entrypoint else '?'}")
    expect(
        container_config.get("server", {}).get("state_dir", state_dir) == state_dir,
        "packaging/config.toml's state_dir is the image's volume",
    )


def check_dockerignore() -> None:
    section(".dockerignore")
    path = ROOT / ".dockerignore"
    if not expect(path.exists(), ".dockerignore exists at the repository root (the build context)"):
        return
    patterns = [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ["target", ".git", "**/node_modules", "packaging/client-secret", "packaging/storage"]:
        expect(needed in patterns, f"leaves out {needed}")
    for kept in ["Cargo.toml", "Cargo.lock", "src", "testkit"]:
        expect(
            not any(p.rstrip("/") in (kept, "*", "**") or p == "." for p in patterns),
            f"keeps {kept} (the build needs it)",
        )


# ---- the compose file ---------------------------------------------------------


@dataclass
class ContainerSpec:
    """What a container engine would do, reduced to what the sandbox needs."""

    label: str
    argv: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    groups: list[int]
    read_only_root: bool
    files: dict[str, tuple[bytes, int, int, int]]  # path → (content, mode, uid, gid)
    volumes: list[tuple[str, int, int, int]]  # writable mounts: path, owner uid, gid, mode
    probe_port: int
    probe_path: str
    mail: dict[str, tuple[str, int]]  # "imap"/"smtp" → (host to dial, port)
    accounts: list[str]
    tls: dict[str, tuple[str, int]] = field(default_factory=dict)  # tls_listen: (host to dial, port)
    tls_name: str | None = None  # the name the certificate must verify for
    require_tls: list[str] = field(default_factory=list)  # plain listeners that take no login before STARTTLS
    ca_export: dict | None = None  # the compose service that hands NocoBase the CA


def parse_compose_port(entry) -> tuple[str, str | None, int]:
    """→ (host ip, published port or None, container port)."""
    if isinstance(entry, dict):
        return (
            entry.get("host_ip", "0.0.0.0"),
            str(entry["published"]) if "published" in entry else None,
            int(entry["target"]),
        )
    parts = str(entry).split("/")[0].split(":")
    if len(parts) == 3:
        return parts[0], parts[1], int(parts[2])
    if len(parts) == 2:
        return "0.0.0.0", parts[0], int(parts[1])
    return "0.0.0.0", None, int(parts[0])


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {}) or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def check_compose(df: Dockerfile, container_config: dict) -> ContainerSpec | None:
    section("packaging/docker-compose.yml")
    text = COMPOSE.read_text()
    doc = yaml.safe_load(text)
    services = doc.get("services", {})
    for name in ["app", "postgres", PROXY_SERVICE]:
        expect(name in services, f"service `{name}`")
    if not all(name in services for name in ["app", PROXY_SERVICE]):
        return None
    expect("nocobase" in (doc.get("networks") or {}), "network `nocobase` is declared")
    app = services["app"]
    proxy = services[PROXY_SERVICE]
    expect(
        str(app.get("image", "")).startswith(NOCOBASE_IMAGE + ":"),
        f"app runs {NOCOBASE_IMAGE}: {app.get('image')}",
    )
    app_env = compose_env(app)
    for key in ["APP_KEY", "DB_DIALECT", "DB_HOST", "DB_DATABASE", "DB_USER", "DB_PASSWORD", "TZ"]:
        expect(key in app_env, f"app sets {key} as NocoBase's docs do")
    expect(
        "./storage:/app/nocobase/storage" in (app.get("volumes") or []),
        "app keeps ./storage at /app/nocobase/storage",
    )
    expect(
        any(parse_compose_port(p)[1:] == ("13000", 80) for p in app.get("ports", [])),
        "app publishes 13000:80",
    )
    for name in ["app", PROXY_SERVICE]:
        expect("nocobase" in (services[name].get("networks") or []), f"{name} is on network `nocobase`")
    expect(PROXY_SERVICE in (app.get("depends_on") or []), "app depends on the proxy")

    build = proxy.get("build", {})
    dockerfile = (COMPOSE.parent / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve()
    expect(dockerfile == DOCKERFILE.resolve(), f"the proxy is built from packaging/Dockerfile ({dockerfile})")

    ports = config_ports(container_config)
    published = [parse_compose_port(p) for p in proxy.get("ports", [])]
    check_client_tls(container_config, "packaging/config.toml", PROXY_SERVICE)
    mail_listeners = [name for name in ports if name != "admin"]
    for proto in mail_listeners:
        port = ports[proto][1]
        expect(
            all(target != port for _, _, target in published),
            f"the {proto.upper().replace('_TLS', ' over TLS')} port {port} is not published on the host",
        )
        expect(
            ports[proto][0] in ("0.0.0.0", "::"),
            f"the container config's {proto} listener binds all interfaces of the container "
            f"(NocoBase connects from its own container): {ports[proto]}",
        )
    for host_ip, published_port, target in published:
        expect(
            host_ip in ("127.0.0.1", "::1"),
            f"the published port {published_port}:{target} binds the host's loopback only",
        )

    env = {**df.env(), **compose_env(proxy)}
    config_path = env.get("XOAUTH2_PROXY_CONFIG", "")
    state_dir = env.get("XOAUTH2_PROXY_STATE_DIR", "")
    for key, value in compose_env(proxy).items():
        if key in df.env():
            expect(value == df.env()[key], f"compose's {key} is the image's ({value})")

    config_source = None
    state_volume = None
    for entry in proxy.get("volumes", []):
        source, _, rest = str(entry).partition(":")
        target = rest.split(":")[0]
        if target == config_path:
            config_source = (COMPOSE.parent / source).resolve()
            expect(rest.endswith(":ro"), f"the config is mounted read-only at {config_path}")
        if target == state_dir:
            state_volume = source
    expect(
        config_source == CONTAINER_CONFIG.resolve(),
        f"packaging/config.toml is mounted at XOAUTH2_PROXY_CONFIG ({config_path})",
    )
    expect(
        state_volume is not None and state_volume in (doc.get("volumes") or {}),
        f"a named volume `{state_volume}` holds the tokens at {state_dir}",
    )

    secret_file = container_config["providers"][next(iter(container_config["providers"]))].get(
        "client_secret_file", ""
    )
    secrets = doc.get("secrets") or {}
    mounted = {}
    for entry in proxy.get("secrets", []):
        name = entry if isinstance(entry, str) else entry["source"]
        target = name if isinstance(entry, str) else entry.get("target", name)
        mounted[name] = target if target.startswith("/") else f"/run/secrets/{target}"
    matching = [name for name, target in mounted.items() if target == secret_file]
    expect(
        bool(matching),
        f"a compose secret is mounted as the file config.toml names: {secret_file}",
        f"mounted: {mounted}",
    )
    for name in matching:
        expect("file" in secrets.get(name, {}), f"secret `{name}` comes from a file")

    grace = duration_secs(container_config.get("server", {}).get("shutdown_grace", "30s"))
    stop = duration_secs(proxy.get("stop_grace_period", "10s"))
    expect(stop > grace, f"stop_grace_period ({stop:.0f}s) > shutdown_grace ({grace:.0f}s)")
    expect(proxy.get("read_only") is True, "the proxy's root file system is read-only")

    exposed = {int(str(p).split("/")[0]) for p in proxy.get("expose", [])}
    expect(
        exposed == {p for _, p in ports.values()},
        f"the proxy's expose {sorted(exposed)} = packaging/config.toml's listen ports",
    )

    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    login = f"docker compose exec {PROXY_SERVICE} xoauth2-proxy login"
    expect(login in header, f"the header shows `{login} …`")
    for proto in ["imap", "smtp"]:
        port, secure = (ports[f"{proto}_tls"][1], "on") if f"{proto}_tls" in ports else (ports[proto][1], "off")
        expect(
            re.search(rf"host {PROXY_SERVICE}\s+port {port}\s+secure {secure}", header) is not None,
            f"the header points NocoBase's {proto.upper()} at {PROXY_SERVICE}:{port}, secure {secure}",
        )
    ca_export = check_compose_ca(doc, services, state_dir, state_volume, container_config)

    user = proxy.get("user")
    uid, gid = df.user() or (0, 0)
    if user:
        u, _, g = str(user).partition(":")
        uid, gid = int(u), int(g or u)
    entrypoint = proxy.get("entrypoint") or df.exec_form("ENTRYPOINT") or []
    command = proxy.get("command") or df.exec_form("CMD") or []
    files = {
        config_path: (CONTAINER_CONFIG.read_bytes(), 0o644, 0, 0),
        # As the README says: the host file chowned to 65532, mode 0400 (a bind mount).
        secret_file: (b"stand-in-client-secret\n", 0o400, uid, gid),
    }
    return ContainerSpec(
        label="compose service xoauth2-proxy (image + compose + packaging/config.toml)",
        argv=list(entrypoint) + list(command),
        env=env,
        uid=uid,
        gid=gid,
        groups=[gid],
        read_only_root=bool(proxy.get("read_only")),
        files=files,
        # A new named volume starts as a copy of the image's directory: owner, mode.
        volumes=[(state_dir, *(df.user() or (0, 0)), 0o700)],
        probe_port=ports["admin"][1],
        probe_path="/healthz",
        mail={proto: ("127.0.0.1", ports[proto][1]) for proto in ["imap", "smtp"]},
        accounts=[a["username"] for a in container_config.get("accounts", [])],
        tls={proto: ("127.0.0.1", ports[f"{proto}_tls"][1]) for proto in ["imap", "smtp"] if f"{proto}_tls" in ports},
        # NocoBase dials the service name: the certificate must verify for it.
        tls_name=PROXY_SERVICE,
        require_tls=[p for p in ["imap", "smtp"] if container_config.get(p, {}).get("require_tls")],
        ca_export=ca_export,
    )


def volume_mounts(service: dict) -> list[tuple[str, str, bool]]:
    """A compose service's volumes → (source, target, read-only)."""
    out = []
    for entry in service.get("volumes", []) or []:
        if isinstance(entry, dict):
            out.append((entry.get("source", ""), entry["target"], bool(entry.get("read_only"))))
        else:
            source, _, rest = str(entry).partition(":")
            target, _, mode = rest.partition(":")
            out.append((source, target, "ro" in mode.split(",")))
    return out


def check_compose_ca(doc: dict, services: dict, state_dir: str, state_volume, config: dict) -> dict | None:
    """NocoBase trusts the proxy's self-made CA: NODE_EXTRA_CA_CERTS names a file on a
    read-only volume that a one-shot service fills with state_dir/tls/ca.pem (the
    certificate; the CA key stays in the state volume), before NocoBase starts."""
    app = services["app"]
    ca_path = compose_env(app).get("NODE_EXTRA_CA_CERTS")
    serves_tls = any(config.get(p, {}).get("tls_listen") for p in ["imap", "smtp"])
    if not serves_tls:
        expect(ca_path is None, "no tls_listen, so NocoBase gets no NODE_EXTRA_CA_CERTS")
        return None
    if not expect(
        ca_path is not None and ca_path.startswith("/"),
        f"app sets NODE_EXTRA_CA_CERTS (the config has tls_listen): {ca_path}",
    ):
        return None
    if "tls" in config and "cert_file" in config["tls"]:
        ok("[tls] names certificate files: bring their CA to NocoBase yourself")
        return None
    ca_dir = str(PurePosixPath(ca_path).parent)
    ca_name = PurePosixPath(ca_path).name
    app_mounts = [m for m in volume_mounts(app) if m[1] == ca_dir]
    named = doc.get("volumes") or {}
    if not expect(
        len(app_mounts) == 1 and app_mounts[0][0] in named,
        f"NODE_EXTRA_CA_CERTS ({ca_path}) is on a named volume mounted at {ca_dir}",
        f"app mounts {volume_mounts(app)}",
    ):
        return None
    ca_volume, _, ca_ro = app_mounts[0]
    expect(ca_ro, f"app mounts `{ca_volume}` read-only")
    expect(
        all(source != state_volume for source, _, _ in volume_mounts(app)),
        f"app does not mount the proxy's state volume `{state_volume}` (the CA key is there)",
    )
    writers = [
        (name, target)
        for name, service in services.items()
        for source, target, ro in volume_mounts(service)
        if source == ca_volume and not ro
    ]
    if not expect(len(writers) == 1, f"one service writes `{ca_volume}`: {[w[0] for w in writers]}"):
        return None
    init_name, init_ca_dir = writers[0]
    init = services[init_name]
    state_mounts = [(t, ro) for s, t, ro in volume_mounts(init) if s == state_volume]
    expect(
        len(state_mounts) == 1 and state_mounts[0][1],
        f"`{init_name}` mounts the state volume `{state_volume}` read-only",
    )
    if not state_mounts:
        return None
    init_state = state_mounts[0][0]
    for name, service in services.items():
        if name not in (PROXY_SERVICE, init_name):
            expect(
                all(source != state_volume for source, _, _ in volume_mounts(service)),
                f"`{name}` does not mount the state volume (the CA key stays with the proxy)",
            )
    command = init.get("command") or []
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    script = " ".join(argv)
    source = f"{init_state}/{CA_CERT_IN_STATE}"
    expect(source in script, f"`{init_name}` copies {source} (state_dir/{CA_CERT_IN_STATE}, the certificate alone)")
    expect(f"{init_ca_dir}/{ca_name}" in script, f"…to {init_ca_dir}/{ca_name}, which app sees as {ca_path}")
    expect("ca-key" not in script and "server.pem" not in script, f"`{init_name}` touches no key file")
    depends = app.get("depends_on") or {}
    condition = depends.get(init_name, {}).get("condition") if isinstance(depends, dict) else None
    expect(
        condition == "service_completed_successfully",
        f"app starts after `{init_name}` has completed (Node.js reads NODE_EXTRA_CA_CERTS at start): {condition}",
    )
    expect(PROXY_SERVICE in (init.get("depends_on") or []), f"`{init_name}` starts after the proxy")
    expect(init.get("restart", "no") == "no", f"`{init_name}` is one-shot (restart: no)")
    caps = init.get("cap_add") or []
    expect("ALL" in (init.get("cap_drop") or []), f"`{init_name}` drops all capabilities but {caps}")
    # Compose writes $ as $$ in commands; the sandbox runs what the shell gets.
    return {
        "service": init_name,
        "argv": [a.replace("$$", "$") for a in argv],
        "state_mount": init_state,
        "ca_mount": init_ca_dir,
        "ca_file": ca_name,
        "caps": [CAPABILITIES[c.upper()] for c in caps if c.upper() in CAPABILITIES],
        "uid": int(str(init.get("user", "0")).split(":")[0]),
    }


# ---- the Kubernetes manifest ----------------------------------------------------


def check_kubernetes(df: Dockerfile) -> ContainerSpec | None:
    section("packaging/kubernetes/nocobase-xoauth2-proxy.yaml")
    text = KUBE.read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = by_kind.get("Deployment", [])
    if not expect(len(deployments) == 1, "one Deployment"):
        return None
    dep = deployments[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    expect(spec.get("replicas") == 1, "replicas: 1 (one proxy per grant)")
    expect(spec.get("strategy", {}).get("type") == "Recreate", "strategy Recreate (never two proxies at once)")
    containers = {c["name"]: c for c in pod["containers"]}
    expect(set(containers) >= {"app", PROXY_SERVICE}, f"containers `app` and `{PROXY_SERVICE}`: {sorted(containers)}")
    if "app" not in containers or PROXY_SERVICE not in containers:
        return None
    app = containers["app"]
    proxy = containers[PROXY_SERVICE]
    expect(str(app.get("image", "")).startswith(NOCOBASE_IMAGE + ":"), f"app runs {NOCOBASE_IMAGE}")
    expect(
        any(m["mountPath"] == "/app/nocobase/storage" for m in app.get("volumeMounts", [])),
        "app keeps its storage at /app/nocobase/storage",
    )

    env = dict(df.env())
    for item in proxy.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            if item["name"] in df.env():
                expect(item["value"] == df.env()[item["name"]], f"{item['name']} is the image's")
    config_path = env.get("XOAUTH2_PROXY_CONFIG", "")
    state_dir = env.get("XOAUTH2_PROXY_STATE_DIR", "")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in proxy.get("volumeMounts", [])}

    def mount_for(path: str):
        best = None
        for mount_path, mount in mounts.items():
            if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
                if best is None or len(mount_path) > len(best[0]):
                    best = (mount_path, mount)
        return best

    config_text = None
    found = mount_for(config_path)
    if expect(found is not None, f"XOAUTH2_PROXY_CONFIG ({config_path}) is on a mounted volume"):
        mount_path, mount = found
        volume = volumes.get(mount["name"], {})
        key = PurePosixPath(config_path).relative_to(mount_path).as_posix()
        cm_name = volume.get("configMap", {}).get("name")
        maps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
        expect(cm_name in maps, f"the config comes from ConfigMap `{cm_name}`, defined here")
        config_text = maps.get(cm_name, {}).get("data", {}).get(key)
        expect(config_text is not None, f"ConfigMap `{cm_name}` has the key `{key}`")
        expect(mount.get("readOnly") is True, "the config is mounted read-only")
    if config_text is None:
        return None
    config = tomllib.loads(config_text)
    ports = config_ports(config)

    for proto in [name for name in ports if name != "admin"]:
        expect(
            ipaddress_is_loopback(ports[proto][0]),
            f"{proto.upper()} listens on the pod's loopback, where NocoBase reaches it: {ports[proto]}",
        )
    check_client_tls(config, "the sidecar's config", "127.0.0.1")
    expect(
        ports["admin"][0] in ("0.0.0.0", "::"),
        f"the admin listener binds all interfaces, for the kubelet's probes: {ports['admin']}",
    )
    named_ports = {p.get("name"): p["containerPort"] for p in proxy.get("ports", [])}
    probe_port = None
    for probe in ["readinessProbe", "livenessProbe"]:
        http = proxy.get(probe, {}).get("httpGet", {})
        port = http.get("port")
        port = named_ports.get(port) if isinstance(port, str) else port
        expect(
            http.get("path") == "/healthz" and port == ports["admin"][1],
            f"{probe}: GET /healthz on the admin port {ports['admin'][1]}",
            f"got {http}",
        )
        probe_port = port
    expect(
        not any(
            p["containerPort"] in {port for name, (_, port) in ports.items() if name != "admin"}
            for p in proxy.get("ports", [])
        ),
        "the mail ports are not declared as container ports",
    )

    provider = config["providers"][next(iter(config["providers"]))]
    secret_file = provider.get("client_secret_file", "")
    found = mount_for(secret_file)
    secret_name = None
    if expect(found is not None, f"client_secret_file ({secret_file}) is on a mounted volume"):
        mount_path, mount = found
        volume = volumes.get(mount["name"], {})
        secret_name = volume.get("secret", {}).get("secretName")
        key = PurePosixPath(secret_file).relative_to(mount_path).as_posix()
        expect(secret_name is not None, f"…from the Secret `{secret_name}`, mounted as a file")
        expect(
            f"kubectl create secret generic {secret_name}" in text and f"--from-file={key}=" in text,
            f"the header shows how to create Secret `{secret_name}` with the key `{key}`",
        )

    found = mounts.get(state_dir)
    claims = {c["metadata"]["name"] for c in by_kind.get("PersistentVolumeClaim", [])}
    if expect(found is not None, f"a volume is mounted at XOAUTH2_PROXY_STATE_DIR ({state_dir})"):
        claim = volumes.get(found["name"], {}).get("persistentVolumeClaim", {}).get("claimName")
        expect(claim in claims, f"the tokens live on PersistentVolumeClaim `{claim}`, defined here")
        expect(not found.get("readOnly"), "the state volume is writable")
    expect(config.get("server", {}).get("state_dir", state_dir) == state_dir, "the config's state_dir is the volume")

    security = proxy.get("securityContext", {})
    image_user = df.user() or (0, 0)
    uid = security.get("runAsUser", image_user[0])
    gid = security.get("runAsGroup", image_user[1])
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    expect(security.get("runAsNonRoot") is True and uid != 0, f"runs as non-root ({uid})")
    expect(uid == image_user[0], f"runAsUser is the image's USER ({image_user[0]})")
    expect(fs_group == gid, f"fsGroup ({fs_group}) lets the proxy write the state volume")
    expect(security.get("readOnlyRootFilesystem") is True, "read-only root file system")
    expect(security.get("allowPrivilegeEscalation") is False, "no privilege escalation")
    expect("ALL" in security.get("capabilities", {}).get("drop", []), "drops all capabilities")
    grace = duration_secs(config.get("server", {}).get("shutdown_grace", "30s"))
    expect(
        pod.get("terminationGracePeriodSeconds", 30) > grace,
        f"terminationGracePeriodSeconds > shutdown_grace ({grace:.0f}s)",
    )
    proxy_ports = {p[1] for p in ports.values()}
    for service in by_kind.get("Service", []):
        exposed = {p.get("targetPort") for p in service["spec"].get("ports", [])} | {
            p.get("port") for p in service["spec"].get("ports", [])
        }
        exposed |= {named_ports.get(p) for p in exposed if isinstance(p, str)}
        expect(
            not (exposed & proxy_ports),
            f"Service `{service['metadata']['name']}` exposes none of the proxy's ports",
        )

    secret_mode = 0o440
    for volume in volumes.values():
        if volume.get("secret", {}).get("secretName") == secret_name:
            secret_mode = volume["secret"].get("defaultMode", 0o644)
    entrypoint = proxy.get("command") or df.exec_form("ENTRYPOINT") or []
    args = proxy.get("args") or ([] if proxy.get("command") else df.exec_form("CMD")) or []
    return ContainerSpec(
        label="Kubernetes sidecar xoauth2-proxy (image + pod spec + ConfigMap config)",
        argv=list(entrypoint) + list(args),
        env=env,
        uid=uid,
        gid=gid,
        groups=[gid] + ([fs_group] if fs_group is not None else []),
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
        files={
            config_path: (config_text.encode(), 0o644, 0, 0),
            # The kubelet writes secret files as root, group fsGroup, with defaultMode.
            secret_file: (b"stand-in-client-secret", secret_mode, 0, fs_group or 0),
        },
        # A new PersistentVolume with fsGroup: root-owned, group fsGroup, setgid, group-writable.
        volumes=[(state_dir, 0, fs_group or 0, 0o2770)],
        probe_port=probe_port or ports["admin"][1],
        probe_path="/healthz",
        mail={proto: ("127.0.0.1", ports[proto][1]) for proto in ["imap", "smtp"]},
        accounts=[a["username"] for a in config.get("accounts", [])],
        tls={proto: ("127.0.0.1", ports[f"{proto}_tls"][1]) for proto in ["imap", "smtp"] if f"{proto}_tls" in ports},
        tls_name="127.0.0.1",
        require_tls=[p for p in ["imap", "smtp"] if config.get(p, {}).get("require_tls")],
    )


def ipaddress_is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_readme(container_config: dict) -> None:
    section("README.md")
    text = README.read_text()
    start = text.find("## Run beside NocoBase")
    end = text.find("\n## ", start + 1)
    beside = text[start:end] if start >= 0 else ""
    ports = config_ports(container_config)
    for proto in ["imap", "smtp"]:
        if f"{proto}_tls" in ports:
            port = ports[f"{proto}_tls"][1]
            expect(
                f"`{port}`" in beside,
                f"\"Run beside NocoBase\" gives NocoBase's {proto.upper()} port `{port}` (tls_listen)",
            )
    if any(f"{p}_tls" in ports for p in ["imap", "smtp"]):
        expect("NODE_EXTRA_CA_CERTS" in beside, '"Run beside NocoBase" explains NODE_EXTRA_CA_CERTS')
    for heading in ["## Run beside NocoBase", "## Try it without an Azure tenant"]:
        expect(heading in text, f"has the section {heading[3:]!r}")
    for needle in [
        f"docker compose exec {PROXY_SERVICE} xoauth2-proxy login",
        "packaging/docker-compose.yml",
        "packaging/systemd/xoauth2-proxy.service",
        "packaging/kubernetes/",
        "cargo run --example demo",
    ]:
        expect(needle in text, f"mentions `{needle}`")


def static() -> None:
    df = parse_dockerfile(DOCKERFILE)
    container_config = tomllib.loads(CONTAINER_CONFIG.read_text())
    check_dockerfile(df, container_config)
    check_dockerignore()
    specs = [s for s in (check_compose(df, container_config), check_kubernetes(df)) if s]
    check_readme(container_config)
    # For the sandbox step (which runs as root in fresh namespaces).
    out = ROOT / "target" / "packaging" / "specs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            [
                {
                    **spec.__dict__,
                    "files": {
                        path: [content.decode(), mode, uid, gid]
                        for path, (content, mode, uid, gid) in spec.files.items()
                    },
                }
                for spec in specs
            ],
            indent=1,
        )
    )


# ---- the binary -------------------------------------------------------------------


def elf(binary: Path) -> None:
    section(f"{binary} against distroless/cc-debian12")
    dynamic = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
    missing = needed - DISTROLESS_CC_LIBS
    expect(not missing, f"needs only libraries distroless/cc has: {sorted(needed)}", f"not there: {sorted(missing)}")
    symbols = subprocess.run(["objdump", "-T", str(binary)], capture_output=True, text=True, check=True).stdout
    versions = {tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_(\d+\.\d+(?:\.\d+)?)", symbols)}
    newest = max(versions) if versions else (0,)
    expect(
        newest <= DEBIAN12_GLIBC,
        f"needs glibc {'.'.join(map(str, newest))}, Debian 12 has {'.'.join(map(str, DEBIAN12_GLIBC))}",
    )


def systemd_keys(unit: Path) -> None:
    section(f"{unit.relative_to(ROOT)}: hardening keys")
    keys: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "StateDirectory": "xoauth2-proxy",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
    }.items():
        expect(value in keys.get(key, []), f"{key}={value}")
    expect(bool(keys.get("User")) or keys.get("DynamicUser") == ["yes"], "a dedicated or dynamic user")
    expect(any("serve" in v for v in keys.get("ExecStart", [])), "ExecStart runs `serve`")
    expect(any("-HUP" in v for v in keys.get("ExecReload", [])), "ExecReload sends SIGHUP")


# ---- configs through the real binary ----------------------------------------------------


def status_only(binary: Path) -> None:
    """Without namespaces: each shipped config through `status`, its secret path
    pointed at a stand-in file."""
    section("shipped configs through `xoauth2-proxy status` (no sandbox)")
    specs = json.loads((ROOT / "target" / "packaging" / "specs.json").read_text())
    for spec in specs:
        with tempfile.TemporaryDirectory() as tmp:
            config_path = spec["env"]["XOAUTH2_PROXY_CONFIG"]
            text = spec["files"][config_path][0]
            for path, (content, *_rest) in spec["files"].items():
                if path != config_path:
                    stand_in = Path(tmp) / PurePosixPath(path).name
                    stand_in.write_text(content)
                    text = text.replace(f'"{path}"', f'"{stand_in}"')
            config = Path(tmp) / "config.toml"
            config.write_text(text)
            run = subprocess.run(
                [str(binary), "status", "--config", str(config)],
                capture_output=True,
                text=True,
                env={"PATH": os.environ.get("PATH", ""), "XOAUTH2_PROXY_STATE_DIR": str(Path(tmp) / "state")},
            )
            expect(
                run.returncode == 0 and all(a in run.stdout for a in spec["accounts"]),
                f"{spec['label']}: the config is valid",
                run.stderr.strip(),
            )


# ---- the sandbox: the image's file system, the container's contract ------------------------


def libraries(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        match = re.search(r"(/\S+)", line.split("=>")[-1])
        if match:
            libs.append(Path(match.group(1)))
    return libs


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def http_get(port: int, path: str, timeout: float = 2) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        return response.status, response.read().decode(errors="replace")


def greeting(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.settimeout(5)
        return conn.recv(512).decode(errors="replace").strip()


def sandbox(binary: Path) -> None:
    if os.geteuid() != 0:
        sys.exit("sandbox: run as root inside `unshare --mount --net`")
    sh("ip", "link", "set", "lo", "up")
    specs = json.loads((ROOT / "target" / "packaging" / "specs.json").read_text())
    df = parse_dockerfile(DOCKERFILE)
    entrypoint = df.exec_form("ENTRYPOINT") or []
    state_in_image = df.env()["XOAUTH2_PROXY_STATE_DIR"]
    image_uid, image_gid = df.user() or (0, 0)
    for spec in specs:
        section(f"sandbox: {spec['label']}")
        with tempfile.TemporaryDirectory(prefix="xoauth2-proxy-image-") as tmp:
            run_spec(spec, Path(tmp), binary, entrypoint, state_in_image, image_uid, image_gid)


def run_spec(spec, tmp: Path, binary: Path, entrypoint, state_in_image, image_uid, image_gid) -> None:
    root = tmp / "root"
    # The image: what packaging/Dockerfile's runtime stage holds.
    for d in ["etc/ssl/certs", "tmp", "proc", "run/secrets", "var/lib"]:
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(CA_BUNDLE, root / CA_BUNDLE.lstrip("/"))
    (root / "etc/passwd").write_text(f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{image_uid}:{image_gid}::/home/nonroot:/sbin/nologin\n")
    (root / "etc/group").write_text(f"root:x:0:\nnonroot:x:{image_gid}:\n")
    target = root / entrypoint[0].lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, target)
    for lib in libraries(binary):
        dest = root / str(lib).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), dest)
    state = root / state_in_image.lstrip("/")
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    os.chown(state, image_uid, image_gid)
    # The engine's mounts: files (config, secret), and a new volume per volume path
    # (Docker copies the image's directory, owner and mode into a new named volume;
    # Kubernetes gives an empty directory, group fsGroup).
    for path, (content, mode, uid, gid) in spec["files"].items():
        dest = root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(content)
        os.chown(dest, uid, gid)
        os.chmod(dest, mode)
    volume_sources = []
    for i, (path, uid, gid, mode) in enumerate(spec["volumes"]):
        source = tmp / f"volume{i}"
        source.mkdir()
        os.chown(source, uid, gid)
        os.chmod(source, mode)
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        volume_sources.append((source, root / path.lstrip("/")))
    sh("mount", "--bind", str(root), str(root))
    for source, mount_point in volume_sources:
        sh("mount", "--bind", str(source), str(mount_point))
    sh("mount", "-t", "proc", "proc", str(root / "proc"))
    if spec["read_only_root"]:
        sh("mount", "-o", "remount,bind,ro", str(root))
    try:
        exercise(spec, root, volume_sources)
    finally:
        subprocess.run(["umount", "-R", str(root)], check=False)


def in_container(spec, root: Path, args: list[str] | None = None, **popen):
    argv = spec["argv"] if args is None else spec["argv"][:1] + args
    groups = ",".join(str(g) for g in spec["groups"])
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    command = [chroot, f"--userspec={spec['uid']}:{spec['gid']}", f"--groups={groups}", str(root), *argv]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", **spec["env"]}
    return subprocess.Popen(command, env=env, **popen)


def exercise(spec, root: Path, volume_sources) -> None:
    ca_pem = None
    status = in_container(spec, root, ["status"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = status.communicate(timeout=30)
    expect(
        status.returncode == 0 and all(a in out for a in spec["accounts"]),
        f"`{' '.join(spec['argv'][:1])} status` as uid {spec['uid']}: the config is valid, "
        f"the secret readable, {', '.join(spec['accounts'])} listed",
        (err or out).strip(),
    )

    log = open(root.parent / "serve.log", "w+")
    serve = in_container(spec, root, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        health = None
        while time.monotonic() < deadline and serve.poll() is None:
            try:
                health = http_get(spec["probe_port"], spec["probe_path"])
                break
            except OSError:
                time.sleep(0.1)
        expect(
            health is not None and health[0] == 200,
            f"`{' '.join(spec['argv'])}` answers GET {spec['probe_path']} on port {spec['probe_port']}",
            f"exit {serve.poll()}; log: {read_log(log)}",
        )
        if health is None:
            return
        imap = greeting(*spec["mail"]["imap"])
        expect(imap.startswith("* OK"), f"IMAP on {spec['mail']['imap']} greets: {imap[:60]}")
        smtp = greeting(*spec["mail"]["smtp"])
        expect(smtp.startswith("220"), f"SMTP on {spec['mail']['smtp']} greets: {smtp[:60]}")
        check_require_tls(spec)
        ca_pem = check_tls_listeners(spec, root)
        # (A fresh proxy's /metrics is empty; the two connections above fill it.)
        code, metrics = http_get(spec["probe_port"], "/metrics")
        expect(
            code == 200 and 'xoauth2_proxy_connections{protocol="imap"}' in metrics,
            "GET /metrics counts those connections",
            metrics[:200],
        )
        serve.send_signal(signal.SIGTERM)
        try:
            code = serve.wait(timeout=40)
        except subprocess.TimeoutExpired:
            serve.kill()
            code = None
        expect(code == 0, f"SIGTERM: drained and exited 0 (got {code})")
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    tokens = volume_sources[0][0] / "tokens"
    expect(
        tokens.is_dir() and tokens.stat().st_uid == spec["uid"] and (tokens.stat().st_mode & 0o777) == 0o700,
        f"the proxy made {spec['volumes'][0][0]}/tokens, its own, mode 0700",
    )
    text = read_log(log)
    expect("is ready" in text, "its log says it is ready")
    expect(
        PLAINTEXT_WARNING not in text,
        f"its log has no warning about a plain listener off loopback (\"{PLAINTEXT_WARNING}\")",
        text,
    )
    if spec.get("ca_export") and ca_pem:
        run_ca_export(spec["ca_export"], root.parent, volume_sources[0][0], ca_pem)


def read_until(conn, done, limit: int = 8192) -> str:
    data = b""
    while len(data) < limit:
        chunk = conn.recv(1024)
        if not chunk:
            break
        data += chunk
        if done(data.decode(errors="replace")):
            break
    return data.decode(errors="replace")


def check_require_tls(spec) -> None:
    """require_tls: the plain listener offers STARTTLS and takes no login before it."""
    if "imap" in spec["require_tls"]:
        with socket.create_connection(tuple(spec["mail"]["imap"]), timeout=5) as conn:
            conn.settimeout(5)
            read_until(conn, lambda t: "\r\n" in t)
            conn.sendall(b"a1 CAPABILITY\r\n")
            caps = read_until(conn, lambda t: "a1 " in t)
        expect(
            "LOGINDISABLED" in caps and "STARTTLS" in caps and "AUTH=" not in caps,
            f"IMAP on {spec['mail']['imap']} (require_tls): STARTTLS, LOGINDISABLED, no AUTH=",
            caps.strip()[:200],
        )
    if "smtp" in spec["require_tls"]:
        with socket.create_connection(tuple(spec["mail"]["smtp"]), timeout=5) as conn:
            conn.settimeout(5)
            read_until(conn, lambda t: "\r\n" in t)
            conn.sendall(b"EHLO sandbox\r\n")
            ehlo = read_until(conn, lambda t: re.search(r"^250 ", t, re.M) is not None)
        expect(
            "STARTTLS" in ehlo and "AUTH" not in ehlo,
            f"SMTP on {spec['mail']['smtp']} (require_tls): EHLO offers STARTTLS, no AUTH",
            ehlo.strip()[:200],
        )


def check_tls_listeners(spec, root: Path) -> str | None:
    """`tls ca` prints the CA certificate alone, and each tls_listen answers a TLS
    handshake with a certificate that verifies against it for the name NocoBase dials."""
    if not spec.get("tls"):
        return None
    run = in_container(spec, root, ["tls", "ca"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ca_pem, err = run.communicate(timeout=30)
    if not expect(
        run.returncode == 0 and "BEGIN CERTIFICATE" in ca_pem and "PRIVATE KEY" not in ca_pem,
        "`xoauth2-proxy tls ca` prints the CA certificate, and no key",
        err.strip(),
    ):
        return None
    context = ssl.create_default_context(cadata=ca_pem)
    for proto, (host, port) in spec["tls"].items():
        want = "* OK" if proto == "imap" else "220"
        try:
            with socket.create_connection((host, port), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname=spec["tls_name"]) as conn:
                    conn.settimeout(5)
                    hello = conn.recv(512).decode(errors="replace").strip()
                    version = conn.version()
        except (OSError, ssl.SSLError) as e:
            fail(f"{proto.upper()} over TLS on port {port}: the handshake, verified for {spec['tls_name']}: {e}")
            continue
        expect(
            hello.startswith(want),
            f"{proto.upper()} over TLS on port {port}: {version}, the certificate verifies against `tls ca` "
            f"for `{spec['tls_name']}`, then greets: {hello[:40]}",
        )
    return ca_pem


def run_ca_export(export: dict, tmp: Path, state_source: Path, ca_pem: str) -> None:
    """The compose file's one-shot CA service, in a chroot with busybox (what its
    image is), root with only its cap_add: it must copy the CA certificate alone."""
    busybox = shutil.which("busybox")
    if busybox is None:
        print(f"  note  no busybox here: `{export['service']}`'s script was not run")
        return
    root = tmp / "ca-export-root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    try:
        for lib in libraries(Path(busybox)):
            dest = root / str(lib).lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib.resolve(), dest)
    except subprocess.CalledProcessError:
        pass  # static
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    ca_volume = tmp / "ca-volume"
    ca_volume.mkdir()
    state_mount = root / export["state_mount"].lstrip("/")
    ca_mount = root / export["ca_mount"].lstrip("/")
    state_mount.mkdir(parents=True)
    ca_mount.mkdir(parents=True)
    sh("mount", "--bind", str(state_source), str(state_mount))
    sh("mount", "-o", "remount,bind,ro", str(state_mount))
    sh("mount", "--bind", str(ca_volume), str(ca_mount))
    keep = set(export["caps"])
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())

    def enter() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        os.chroot(root)
        os.chdir("/")
        for cap in range(last_cap + 1):
            if cap not in keep:
                libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: root keeps only cap_add
        if export["uid"]:
            os.setgid(export["uid"])
            os.setuid(export["uid"])

    try:
        # The proxy has made its CA by now: the script should find it at once.
        run = subprocess.run(
            export["argv"],
            preexec_fn=enter,
            env={"PATH": "/bin"},
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        fail(
            f"`{export['service']}` still waits after 30 s for {export['state_mount']}/{CA_CERT_IN_STATE}, "
            f"which the proxy has written: can it read the state volume with capabilities {export['caps']}?"
        )
        return
    finally:
        subprocess.run(["umount", str(state_mount)], check=False)
        subprocess.run(["umount", str(ca_mount)], check=False)
    copied = ca_volume / export["ca_file"]
    expect(
        run.returncode == 0 and copied.exists() and copied.read_text() == ca_pem,
        f"`{export['service']}` (busybox, root with capabilities {export['caps']} only) copies "
        f"the CA certificate that `tls ca` prints to {export['ca_mount']}/{export['ca_file']}",
        (run.stderr or run.stdout).strip(),
    )
    expect(
        sorted(p.name for p in ca_volume.iterdir()) == [export["ca_file"]],
        f"…and nothing else lands in that volume (no key): {sorted(p.name for p in ca_volume.iterdir())}",
    )
    if copied.exists():
        expect(copied.stat().st_mode & 0o444 == 0o444, "…readable by NocoBase whatever its user")


def read_log(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-2000:]


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "static":
        static()
    elif command == "elf":
        elf(Path(sys.argv[2]).resolve())
    elif command == "systemd-keys":
        systemd_keys(Path(sys.argv[2]).resolve())
    elif command == "status-only":
        status_only(Path(sys.argv[2]).resolve())
    elif command == "sandbox":
        sandbox(Path(sys.argv[2]).resolve())
    else:
        sys.exit(__doc__)
    if failures:
        print(f"\n{len(failures)} packaging check(s) failed:")
        for f in failures:
            print(f"  - {f}")
        sys.exit(1)


if __name__ == "__main__":
    main()
