#!/usr/bin/env bash
# Checks what can be checked of docker/ without a Docker engine: the compose file is
# valid (docker-compose config), every service has its own volume, the Dockerfile's
# build step is the README's build command, and the packages it installs are the ones
# scripts/install-deps.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "check-docker: $*" >&2; exit 1; }

docker-compose -f docker/compose.yaml config -q || fail "docker/compose.yaml is not valid"
config=$(docker-compose -f docker/compose.yaml config)
for service in identity profile decision routing; do
  echo "$config" | grep -q "^  $service:" || fail "compose has no $service service"
  echo "$config" | grep -q "$service-data:/var/lib/arbiter" || fail "$service has no volume of its own"
done

python3 -m json.tool docker/arbiter.json >/dev/null || fail "docker/arbiter.json is not valid JSON"
echo "$config" | grep -q "ARBITER_CONFIG: /etc/arbiter/arbiter.json" || fail "routing does not read docker/arbiter.json"

build="swift build -c release --static-swift-stdlib"
grep -qF "$build" docker/Dockerfile || fail "the Dockerfile does not build with '$build'"
grep -qF "$build" README.md || fail "README.md does not document the image build '$build'"
# `swift build` keeps only the last of several --product options: one product per build.
if sed -e ':a' -e '/\\$/N; s/\\\n//; ta' docker/Dockerfile | grep -E -- '--product[^|&;]*--product' >/dev/null; then
  fail "the Dockerfile passes several --product options to one swift build (only the last is built)"
fi
grep -q '^HEALTHCHECK' docker/Dockerfile || fail "the Dockerfile has no HEALTHCHECK"
grep -q '/readyz' docker/Dockerfile || fail "the Dockerfile's HEALTHCHECK does not probe /readyz"
grep -q '^USER ' docker/Dockerfile || fail "the Dockerfile runs as root"

for package in $(sed -n 's/.*apt-get install -y --no-install-recommends \(lib[a-z0-9-]*-dev\( lib[a-z0-9-]*-dev\)*\).*/\1/p' docker/Dockerfile); do
  grep -qw -- "$package" scripts/install-deps.sh || fail "the Dockerfile installs $package, scripts/install-deps.sh does not"
done
echo "check-docker: compose valid; Dockerfile builds as the README says"
