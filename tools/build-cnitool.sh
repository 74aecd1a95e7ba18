#!/usr/bin/env bash
# Builds cnitool offline from Debian's source package (golang-github-appc-cni)
# against Debian's libcni, the way FACTS.md section 5 describes; cached.
set -euo pipefail
CACHE=$(realpath -m "${1:-.cache}")
OUT="$CACHE/bin/cnitool"
[ -x "$OUT" ] && exit 0
mkdir -p "$CACHE/bin" "$CACHE/cnitool-src"
if ! apt-get source --print-uris golang-github-appc-cni >/dev/null 2>&1 \
   || [ -z "$(apt-get source --print-uris golang-github-appc-cni 2>/dev/null)" ]; then
    echo "setup: adding a deb-src entry for bookworm to fetch cnitool's source" >&2
    cat > /etc/apt/sources.list.d/cni-fan-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq
fi
cd "$CACHE/cnitool-src"
if ! ls -d golang-github-appc-cni-*/cnitool >/dev/null 2>&1; then
    apt-get source -qq golang-github-appc-cni >/dev/null 2>&1
fi
src=$(ls -d golang-github-appc-cni-*/cnitool | head -n1)
mkdir -p "$CACHE/gopath"
(cd "$src" && GO111MODULE=off GOPATH="$CACHE/gopath:/usr/share/gocode" \
    GOCACHE="$CACHE/gocache" go build -o "$OUT" .)
echo "setup: built $OUT" >&2
