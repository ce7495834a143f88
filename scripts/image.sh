#!/usr/bin/env bash
# Build an OCI image from a bento in $BENTOML_HOME with `bentoml containerize` and buildah (no daemon).
#   scripts/image.sh BENTO_TAG [IMAGE_TAG]      (IMAGE_TAG defaults to BENTO_TAG)
# 1. the base image the bento's Dockerfile starts FROM: scripts/base-image.sh (kept in the local store);
# 2. the CPU torch wheel matching the bento's torch pin, fetched by this machine's pip (its find-links or index)
#    into $WHEELS (default build/wheels), mounted at /wheels during the build (bentofile.yaml's find_links);
# 3. the build, with buildah's layer cache: a bento whose requirements did not change reuses every layer up to
#    its own files;
# 4. a check that the image's torch is the CPU build, and its size.
set -euo pipefail

bento=${1:?usage: scripts/image.sh BENTO_TAG [IMAGE_TAG]}
image=${2:-$bento}
root=$(cd "$(dirname "$0")/.." && pwd)
wheels=${WHEELS:-$root/build/wheels}
# chroot isolation: the Dockerfile's RUN steps need no OCI runtime, cgroups or network namespace of their own and
# use the host's network to reach PyPI and Debian's archive, the least a build machine must allow
export BUILDAH_ISOLATION=chroot BENTOML_DO_NOT_TRACK=true

bento_dir=$(bentoml get "$bento" -o path)
# without it uv would take PyPI's CUDA torch: a bento packaged before bentofile.yaml had find_links
grep -qx -- '--find-links /wheels' "$bento_dir/env/python/requirements.txt" || {
    echo "$bento does not look for torch in /wheels: package it again (make run, or dvc repro package)" >&2
    exit 1
}
"$root/scripts/base-image.sh" "$(awk '$1 == "FROM" {print $2; exit}' "$bento_dir/env/docker/Dockerfile")"

torch_pin=$(grep -E '^torch==' "$bento_dir/env/python/requirements.txt")
mkdir -p "$wheels"
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --dest "$wheels" "$torch_pin+cpu"

bentoml containerize "$bento" --backend buildah --image-tag "$image" \
    --opt volume="$wheels:/wheels:ro" --opt layers

# nvidia-ml-py (NVML bindings BentoML reads GPU metrics with) carries no CUDA library; the nvidia-* CUDA wheels do
"$root/scripts/run-image.sh" --rm --entrypoint /app/.venv/bin/python "$image" -c '
import importlib.metadata, torch
cuda = sorted(name for name in (d.metadata["Name"].lower() for d in importlib.metadata.distributions())
              if name.startswith("nvidia-") and name != "nvidia-ml-py")
assert torch.version.cuda is None and not cuda, f"CUDA in the image: torch {torch.__version__}, {cuda}"
print("torch", torch.__version__, "(no CUDA)")'
podman image inspect --format "image $image: {{.Size}} bytes" "$image"
