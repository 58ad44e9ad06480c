#!/usr/bin/env bash
# Prints the path of a Jaeger v2 (v1.76.0) all-in-one binary, building it on first use.
#
# No container runtime or package registry here ships Jaeger, and
# `go install github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0` is refused (its go.mod has a
# `replace` directive). What works: download the module through the Go proxy, copy it somewhere
# writable, `go build ./cmd/jaeger` in it (~5 min on 2 cores the first time, ~120 MB binary).
# The binary is cached outside the repository and reused:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/llm-resilience/jaeger-1.76.0   (override: JAEGER_BIN=path)
#
# Exit status: 0 with the path on stdout; 0 with nothing on stdout when there is no Go toolchain
# (tests/test_jaeger.py then skips and says why); non-zero when a build was tried and failed.
set -euo pipefail

VERSION=1.76.0
if [ -n "${JAEGER_BIN:-}" ]; then
    [ -x "$JAEGER_BIN" ] || { echo "scripts/jaeger.sh: JAEGER_BIN=$JAEGER_BIN is not an executable" >&2; exit 1; }
    echo "$JAEGER_BIN"
    exit 0
fi
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/llm-resilience"
BIN="$CACHE/jaeger-$VERSION"
if [ -x "$BIN" ]; then
    echo "$BIN"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    echo "scripts/jaeger.sh: no Go toolchain on PATH: cannot build Jaeger $VERSION (the real-Jaeger test will skip)" >&2
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/jaeger-$VERSION.lock"
flock 9  # two test runs at once build it once
if [ -x "$BIN" ]; then
    echo "$BIN"
    exit 0
fi
echo "scripts/jaeger.sh: building Jaeger $VERSION into $BIN (first time: ~5 min)" >&2
SRC=$(go mod download -json "github.com/jaegertracing/jaeger@v$VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
[ -d "$SRC" ] || { echo "scripts/jaeger.sh: go mod download gave no module directory" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$SRC/." "$WORK"
chmod -R u+w "$WORK"
# -trimpath: the build cache then does not depend on the temporary directory (a rebuild reuses it)
(cd "$WORK" && go build -trimpath -o "$BIN.partial" ./cmd/jaeger) >&2
mv "$BIN.partial" "$BIN"
echo "$BIN"
