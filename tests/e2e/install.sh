#!/usr/bin/env bash
# Installs what the end-to-end suite (tests/e2e/run.py) needs on a fresh Debian 12
# machine, as root: Dovecot (IMAP + LMTP), Postfix, openssl, Node.js with the client
# libraries NocoBase uses (imapflow, nodemailer), and a `vmail` user for the mailboxes.
# Idempotent; the system services it installs are never started (the suite runs its
# own instances from its own configs, on its own ports).
set -euo pipefail
cd "$(dirname "$0")/../.."

export DEBIAN_FRONTEND=noninteractive
packages=(dovecot-core dovecot-imapd dovecot-lmtpd postfix openssl ca-certificates)
command -v node >/dev/null && command -v npm >/dev/null || packages+=(nodejs npm)
command -v python3 >/dev/null || packages+=(python3)
command -v script >/dev/null || packages+=(bsdutils)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if ((${#missing[@]})); then
  # Keep the packages' maintainer scripts from starting the system services on ports
  # 25/143/993 (invoke-rc.d asks policy-rc.d; 101 = "action not allowed").
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  trap 'if [[ -n $own_policy ]]; then rm -f "$policy"; fi' EXIT
  # Postfix asks how to configure the system MTA: not at all (the suite brings its own).
  echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
  echo 'postfix postfix/mailname string localhost' | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Dovecot will not open mailboxes as root.
id vmail >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin vmail

# imapflow and nodemailer, pinned by the lock file; skipped when `cargo test` has
# installed them from this lock file already (testkit/src/node.rs writes the stamp).
stamp=tests/node/node_modules/.installed-from-lock
digest=$(sha256sum tests/node/package-lock.json | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]]; then
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
  echo "$digest" >"$stamp"
fi
