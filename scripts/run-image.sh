#!/usr/bin/env bash
# `podman run` with what these machines need, then the caller's arguments: runc (the OCI runtime Debian's podman
# is set up with here), open-file and process limits under the machine's hard limits (podman's defaults exceed
# them and the container fails to start), and the host's network, so a server inside binds 127.0.0.1 itself.
#   scripts/run-image.sh [podman run options] IMAGE [command]
exec podman run --runtime runc --ulimit nofile=16384:16384 --ulimit nproc=8192:8192 --network host "$@"
