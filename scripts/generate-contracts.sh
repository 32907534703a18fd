#!/usr/bin/env bash
# Regenerates every file made from Protos/: the protoc-c C code in
# Sources/CContracts and the Swift value types in Sources/Contracts/Generated.
#   scripts/generate-contracts.sh          rewrite the generated files
#   scripts/generate-contracts.sh --check  fail if they differ from Protos/ (CI)
# Needs protoc-c (protobuf-c-compiler), protoc (protobuf-compiler),
# libprotobuf-dev (google/protobuf/any.proto) and python3-protobuf.
set -euo pipefail
cd "$(dirname "$0")/.."

check=0
[ "${1:-}" = "--check" ] && check=1

for tool in protoc-c protoc /usr/bin/python3; do
  command -v "$tool" >/dev/null || { echo "generate-contracts: $tool is missing (apt-get install protobuf-c-compiler protobuf-compiler python3-protobuf libprotobuf-dev)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out="$work/out"
mkdir -p "$out/c/include/google/protobuf" "$out/swift" "$work/protoc-c"

protos=(Protos/*.proto)
protoc-c -IProtos -I/usr/include --c_out="$work/protoc-c" "${protos[@]}" google/protobuf/any.proto
( cd "$work/protoc-c" && find . -name '*.pb-c.h' ) | while read -r h; do cp "$work/protoc-c/$h" "$out/c/include/$h"; done
( cd "$work/protoc-c" && find . -name '*.pb-c.c' ) | while read -r c; do mkdir -p "$out/c/$(dirname "$c")"; cp "$work/protoc-c/$c" "$out/c/$c"; done

protoc -IProtos -I/usr/include --include_imports --include_source_info \
  --descriptor_set_out="$work/set.pb" "${protos[@]}"
/usr/bin/python3 scripts/gen_swift_contracts.py "$work/set.pb" "$out/swift" "$out/c"

if [ $check = 1 ]; then
  status=0
  # Each header names the protoc-c that wrote it (`#elif 1004001 < PROTOBUF_C_MIN_COMPILER_VERSION`):
  # another protoc-c version (Debian 13 has 1.5) differs there alone when it generates the same code.
  diff -r -I '^#elif [0-9]* < PROTOBUF_C_MIN_COMPILER_VERSION$' "$out/c" Sources/CContracts || status=1
  diff -r "$out/swift" Sources/Contracts/Generated || status=1
  if [ $status != 0 ]; then
    echo "generate-contracts: generated code is out of date with Protos/; run scripts/generate-contracts.sh and commit" >&2
    exit 1
  fi
  echo "generate-contracts: generated code matches Protos/"
else
  rm -rf Sources/CContracts Sources/Contracts/Generated
  mkdir -p Sources/Contracts
  cp -r "$out/c" Sources/CContracts
  cp -r "$out/swift" Sources/Contracts/Generated
  echo "generate-contracts: wrote Sources/CContracts and Sources/Contracts/Generated"
fi
