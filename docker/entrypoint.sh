#!/bin/sh
# Entry point of the dpflow image.
#   dpflow-entrypoint sshd       serve ssh on port 2222 as the dpflow user, so that
#                                mpiexec on another node can start ranks here
#   dpflow-entrypoint CMD ...    run CMD (dpflow train ..., mpiexec ..., pytest ...)
set -eu

ssh_dir="$HOME/.ssh"

# Every node must share one key pair. The MPI Operator mounts it from a Secret; under
# compose, ~/.ssh is a volume shared by all nodes and the first node to start creates the
# pair. flock keeps two nodes starting at once from both creating it.
create_key_pair() {
    [ -e "$ssh_dir/id_rsa" ] && return 0
    if [ ! -w "$ssh_dir" ]; then
        echo "dpflow-entrypoint: $ssh_dir has no id_rsa and is read-only; mount a key pair there (id_rsa, id_rsa.pub, authorized_keys)" >&2
        exit 1
    fi
    (
        flock 9
        if [ ! -e "$ssh_dir/id_rsa" ]; then
            ssh-keygen -q -t ed25519 -N '' -C "dpflow-nodes" -f "$ssh_dir/id_rsa.tmp"
            cp "$ssh_dir/id_rsa.tmp.pub" "$ssh_dir/authorized_keys"
            mv "$ssh_dir/id_rsa.tmp.pub" "$ssh_dir/id_rsa.pub"
            mv "$ssh_dir/id_rsa.tmp" "$ssh_dir/id_rsa"
        fi
    ) 9> "$ssh_dir/.lock"
}

if [ "${1:-}" = sshd ]; then
    create_key_pair
    # -D: stay in the foreground as the container's main process; -e: log to stderr,
    # which is the container's log.
    exec /usr/sbin/sshd -D -e -f /etc/dpflow/sshd_config
fi
exec "$@"
