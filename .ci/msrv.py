"""Fails if a package of the resolved graph declares a rust-version newer
than the workspace's (reads `cargo metadata --all-features` on stdin)."""
import json
import sys


def version(v):
    return tuple(int(x) for x in (v.split(".") + ["0", "0"])[:3])


meta = json.load(sys.stdin)
members = set(meta["workspace_members"])
resolved = {node["id"] for node in meta["resolve"]["nodes"]}
packages = [p for p in meta["packages"] if p["id"] in resolved]
declared = min(version(p["rust_version"]) for p in packages if p["id"] in members)
newer = sorted(
    (version(p["rust_version"]), p["name"], p["version"])
    for p in packages
    if p.get("rust_version") and version(p["rust_version"]) > declared
)
for need, name, v in newer:
    need = ".".join(map(str, need))
    have = ".".join(map(str, declared))
    print(f"{name} {v} needs rust {need}, newer than the declared {have}", file=sys.stderr)
sys.exit(1 if newer else 0)
