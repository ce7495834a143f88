#!/usr/bin/env bash
# Run an image built by scripts/image.sh, probe it over HTTP on 127.0.0.1 and stop it.
#   scripts/image-smoke.sh IMAGE_TAG
# The container serves on a free loopback port (BENTOML_HOST/BENTOML_PORT are read by the image's `bentoml
# serve`) with a fresh API token; once /readyz answers, /recommend is asked for user 1's top 5 (the popular movies
# when the model does not know user 1) and /similar for the movies like its first answer, and the answers are printed.
set -euo pipefail

image=${1:?usage: scripts/image-smoke.sh IMAGE_TAG}
root=$(cd "$(dirname "$0")/.." && pwd)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
# conf/serve's auth_token_env; `-e NAME` passes its value from this environment, off the command line
REELRANK_API_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
export REELRANK_API_TOKEN

container=$("$root/scripts/run-image.sh" --detach -e BENTOML_HOST=127.0.0.1 -e BENTOML_PORT="$port" \
    -e REELRANK_API_TOKEN "$image")
trap 'podman rm -f "$container" > /dev/null' EXIT
echo "container ${container:0:12} of $image on $url"
start=$SECONDS
until curl -sf "$url/readyz" > /dev/null; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$container")" != true ] || ((SECONDS - start > 300)); then
        podman logs "$container" | tail -40
        echo "not ready after $((SECONDS - start)) s" >&2
        exit 1
    fi
    sleep 1
done
echo "GET /readyz: 200 after $((SECONDS - start)) s"

post() {
    echo "POST $1 $2" >&2
    curl -sf "$url$1" -H "Authorization: Bearer $REELRANK_API_TOKEN" -H 'Content-Type: application/json' -d "$2"
}
recommended=$(post /recommend '{"user_id": 1, "k": 5}')
echo "$recommended"
first=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["items"][0]["movie_id"])' <<< "$recommended")
post /similar "{\"movie_id\": $first, \"k\": 5}"
echo
