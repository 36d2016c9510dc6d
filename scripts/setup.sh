#!/usr/bin/env bash
# Install what dt-bastion needs on Debian/Ubuntu, then the Python virtual environment.
# Idempotent and quick when everything is present: `make demo` and `make test` run it
# every time, so a fresh clone on a fresh machine needs no other step.
set -euo pipefail
cd "$(dirname "$0")/.."

# swtpm: the software TPM tests and the demo use. libtss2-dev + pkg-config + gcc:
# tpm2-pytss builds from source against the system TSS. openssh-*: the real ssh,
# ssh-keygen and sshd the tests interoperate with. systemd: only for
# `systemd-analyze` to check the shipped unit (nothing is booted). putty-tools: PuTTY's
# plink and puttygen, the second SSH client the interop tests jump through the bastion.
# haproxy: the load balancer (send-proxy-v2) the several-bastions tests put in front;
# they start their own on a free loopback port, never the package's service.
# postgresql: the server binaries the PostgreSQL store's tests start in a temp dir
# (tests/postgres.py); the service the package enables is not needed and not used.
# tpm2-tools: tpm2_eventlog, the independent reference the boot event log parser's
# tests (tests/test_eventlog.py) compare events and replayed PCR values with.
PACKAGES=(swtpm swtpm-tools libtss2-dev pkg-config gcc openssh-client openssh-server systemd
    sqlite3 putty-tools haproxy postgresql tpm2-tools)

need_python_pkgs() {
    python3 -c 'import venv, ensurepip' 2>/dev/null || echo python3-venv
    python3 -c 'import sysconfig, os, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)' 2>/dev/null || echo python3-dev
}

missing=()
for pkg in "${PACKAGES[@]}" $(need_python_pkgs); do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "setup: need root or sudo to install ${missing[*]}" >&2; exit 1; }
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    # --no-install-recommends keeps out services we would never start (e.g. a TPM broker).
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
    # Debian starts (and enables) haproxy.service on install, listening on nothing we
    # use; the tests run their own haproxy, so keep the package's service off.
    if [[ " ${missing[*]} " == *" haproxy "* ]] && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now haproxy.service >/dev/null 2>&1 || true
    fi
fi

# sshd refuses to start without its privilege-separation directory.
if [ ! -d /run/sshd ]; then
    if [ "$(id -u)" -eq 0 ]; then mkdir -p /run/sshd; chmod 0755 /run/sshd; else sudo mkdir -p /run/sshd; fi
fi

VENV=.venv
STAMP="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
fi
# Reinstall only when the dependency list changed since the last install.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "setup: installing dt-bastion and its Python dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
    touch "$STAMP"
fi
