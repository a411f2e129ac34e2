#!/usr/bin/env python3
"""Compares the .npy files of two `neo-run dump` folders (e.g. x86_64 and aarch64 runs of the
same artifact on the same image): max abs difference per file, exit 1 above the tolerance.
Standard library only (f32 little-endian arrays, as neo-run writes them).

  python3 scripts/compare_npy.py DIR_A DIR_B [--tol 1e-4]
"""
import argparse, ast, os, struct, sys

def load(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY":
        sys.exit(f"error: {path} is not a .npy file")
    major = data[6]
    (hlen,) = struct.unpack("<H" if major == 1 else "<I", data[8:10] if major == 1 else data[8:12])
    start = (10 if major == 1 else 12) + hlen
    header = ast.literal_eval(data[(10 if major == 1 else 12):start].decode("latin1"))
    if header["descr"] != "<f4":
        sys.exit(f"error: {path}: only <f4 arrays are compared, got {header['descr']}")
    n = (len(data) - start) // 4
    return header["shape"], struct.unpack(f"<{n}f", data[start:start + 4 * n])

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a"); ap.add_argument("b")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    names = sorted(f for f in os.listdir(args.a) if f.endswith(".npy"))
    if not names:
        sys.exit(f"error: no .npy files in {args.a}")
    worst = 0.0
    for name in names:
        sa, va = load(os.path.join(args.a, name))
        sb, vb = load(os.path.join(args.b, name))
        if sa != sb:
            sys.exit(f"error: {name}: shapes differ {sa} vs {sb}")
        diff = max(abs(x - y) for x, y in zip(va, vb))
        worst = max(worst, diff)
        print(f"{name}: {len(va)} values, max abs diff {diff:.3g}")
    if worst > args.tol:
        sys.exit(f"error: max abs diff {worst:.3g} above {args.tol}")

main()
