"""Generates the Python protobuf modules from Protos/ and puts them on sys.path.

    protoc -I<repo>/Protos -I/usr/include --python_out=examples/python/gen <repo>/Protos/*.proto

Nothing generated is committed (gen/ is git-ignored). load() regenerates only when the
.proto files or protoc changed. Run this file to generate by hand:

    /usr/bin/python3 examples/python/generated.py [OUT_DIR]
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = os.environ.get("ARBITER_PROTOS", os.path.normpath(os.path.join(HERE, "..", "..", "Protos")))
OUT = os.path.join(HERE, "gen")


def _protoc():
    protoc = shutil.which("protoc") or "/usr/bin/protoc"
    if not os.path.exists(protoc):
        sys.exit("protoc not found: apt-get install protobuf-compiler libprotobuf-dev python3-protobuf")
    return protoc


def _include_dir(protoc):
    """The directory holding google/protobuf/any.proto (status.proto imports it)."""
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(protoc)))
    for candidate in (os.path.join(prefix, "include"), "/usr/include", "/usr/local/include"):
        if os.path.exists(os.path.join(candidate, "google", "protobuf", "any.proto")):
            return candidate
    sys.exit("google/protobuf/any.proto not found: apt-get install libprotobuf-dev")


def generate(out=OUT):
    """Runs protoc over every Protos/*.proto into `out`, unless it is up to date."""
    protoc = _protoc()
    protos = sorted(name for name in os.listdir(PROTOS) if name.endswith(".proto"))
    version = subprocess.run([protoc, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(version.encode())
    for name in protos:
        with open(os.path.join(PROTOS, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    stamp = os.path.join(out, ".stamp")
    if os.path.exists(stamp) and open(stamp).read() == digest.hexdigest():
        return out
    os.makedirs(out, exist_ok=True)
    # Generate into a scratch directory, then move: a concurrent run never sees half a file.
    scratch = tempfile.mkdtemp(dir=out, prefix=".protoc-")
    try:
        subprocess.run([protoc, "-I" + PROTOS, "-I" + _include_dir(protoc), "--python_out=" + scratch] + protos,
                       check=True)
        for name in os.listdir(scratch):
            os.replace(os.path.join(scratch, name), os.path.join(out, name))
        with open(os.path.join(scratch, "stamp"), "w") as f:
            f.write(digest.hexdigest())
        os.replace(os.path.join(scratch, "stamp"), stamp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def load(out=OUT):
    """Generates if needed and makes `import echo_pb2`, `import ttrpc_pb2`, ... work."""
    generate(out)
    if out not in sys.path:
        sys.path.insert(0, out)


if __name__ == "__main__":
    print(generate(sys.argv[1] if len(sys.argv) > 1 else OUT))
