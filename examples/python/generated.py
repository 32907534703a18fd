"""Generates the Python protobuf modules from Protos/ (protoc --python_out) into a
cache directory and puts it on sys.path. Nothing generated is committed."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = os.path.join(HERE, "..", "..", "Protos")
OUT = os.path.join(HERE, "gen")


def load():
    os.makedirs(OUT, exist_ok=True)
    protos = sorted(f for f in os.listdir(PROTOS) if f.endswith(".proto"))
    newest = max(os.path.getmtime(os.path.join(PROTOS, f)) for f in protos)
    stamp = os.path.join(OUT, ".stamp")
    if not os.path.exists(stamp) or os.path.getmtime(stamp) < newest:
        subprocess.run(["protoc", "-I" + PROTOS, "-I/usr/include", "--python_out=" + OUT] + protos, check=True)
        open(stamp, "w").close()
    if OUT not in sys.path:
        sys.path.insert(0, OUT)
