#!/usr/bin/env bash
# Password-less ssh to this machine plus pdsh, for the test that launches two "nodes" with
# `deepspeed --hostfile` (tests/test_fsdp2.py). Root on Debian/Ubuntu only; idempotent.
# Without it that one test skips, saying why.
set -euo pipefail
command -v pdsh >/dev/null && command -v sshd >/dev/null || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q openssh-server openssh-client pdsh >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && apt-get install -y -q openssh-server openssh-client pdsh >/dev/null; }
}
mkdir -p /run/sshd ~/.ssh
chmod 700 ~/.ssh
[ -f ~/.ssh/id_ed25519 ] || ssh-keygen -q -t ed25519 -N "" -f ~/.ssh/id_ed25519
grep -qF "$(cat ~/.ssh/id_ed25519.pub)" ~/.ssh/authorized_keys 2>/dev/null ||
    cat ~/.ssh/id_ed25519.pub >> ~/.ssh/authorized_keys
chmod 600 ~/.ssh/authorized_keys
pgrep -x sshd >/dev/null || "$(command -v sshd || echo /usr/sbin/sshd)"
for host in localhost 127.0.0.1; do
    ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=5 "$host" true
done
echo "ssh to localhost and pdsh: ready"
