#!/usr/bin/env bash
# Installs the Debian packages Arbiter needs, when they are missing.
#   protobuf-c-compiler libprotobuf-c-dev  protoc-c and libprotobuf-c (the contracts)
#   protobuf-compiler libprotobuf-dev      protoc and google/protobuf/*.proto (code generation, examples)
#   python3-protobuf                       the code generator and the Python example
#   libsqlite3-dev                         the services' stores
#   liblz4-dev                             compressing the decision log's records (Storage.BlobCompression)
#   golang-go golang-github-containerd-ttrpc-dev   containerd's ttrpc, for the interop test and benchmark
#   docker-compose                         validating docker/compose.yaml
#   curl iproute2                          probing the admin ports, finding free ports (ss)
#   python3-aiosmtpd                       the SMTP server the routing tests deliver to
set -euo pipefail
packages=(protobuf-c-compiler libprotobuf-c-dev protobuf-compiler libprotobuf-dev python3-protobuf
          libsqlite3-dev liblz4-dev golang-go golang-github-containerd-ttrpc-dev docker-compose curl iproute2 python3-aiosmtpd)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
