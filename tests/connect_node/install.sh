#!/usr/bin/env bash
# Installs the pinned npm packages of tests/connect_node (package-lock.json) with `npm ci` into
# .cache/connect-node/<hash of package.json and the lockfile>/node_modules, once, and prints that directory.
# Used by .ci/run and by tests/test_connect_node.py. Exits non-zero if the install fails.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
key=$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -c1-16)
dir="$root/.cache/connect-node/$key"
if [ ! -f "$dir/.installed" ]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$here/package.json" "$here/package-lock.json" "$dir/"
    # --ignore-scripts: @bufbuild/buf's postinstall only checks for the binary its platform package ships.
    (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
    touch "$dir/.installed"
fi
echo "$dir/node_modules"
