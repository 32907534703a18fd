#!/usr/bin/env bash
# Builds the Go ttrpc examples (examples/go, GOPATH layout) offline against the
# Debian-packaged containerd/ttrpc 1.1.1 sources in /usr/share/gocode
# (package golang-github-containerd-ttrpc-dev). Binaries: .build-go/bin/
#   ttrpc-interop    conformance checks against arbiter-echo
#   ttrpc-refserver  containerd's Go ttrpc server with grpc.health.v1.Health
#   ttrpc-bench      closed-loop Health/Check load client
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GOCODE="${GOCODE:-/usr/share/gocode}"
OUT="$ROOT/.build-go/bin"

if ! command -v go >/dev/null 2>&1; then
    echo "build-go-examples: 'go' not found on PATH (Debian: apt-get install golang-go)" >&2
    exit 1
fi
for dep in github.com/containerd/ttrpc github.com/gogo/protobuf/proto \
           google.golang.org/grpc/status google.golang.org/genproto/googleapis/rpc/status; do
    if [ ! -d "$GOCODE/src/$dep" ]; then
        echo "build-go-examples: Go sources for $dep not found under $GOCODE/src" >&2
        echo "  (Debian: apt-get install golang-github-containerd-ttrpc-dev)" >&2
        exit 1
    fi
done

mkdir -p "$OUT" "$ROOT/.build-go/cache"
export GO111MODULE=off
export GOPATH="$ROOT/examples/go:$GOCODE"
export GOCACHE="$ROOT/.build-go/cache"
export GOFLAGS=
export GOPROXY=off
export CGO_ENABLED="${CGO_ENABLED:-0}"

cd "$ROOT/examples/go/src/arbiter.example"
for cmd in ttrpc-interop ttrpc-refserver ttrpc-bench; do
    go build -o "$OUT/$cmd" "arbiter.example/cmd/$cmd"
    echo "built $OUT/$cmd"
done
