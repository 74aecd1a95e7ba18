#!/bin/sh
# Compile the native thin client (native/fan-client.c) into OUT, with the
# package's version built in (the server answers a client of another
# version with FALLBACK). Used by tools/setup.sh, build.spec and the tests.
# Usage: native/build.sh OUT
set -eu
out=${1:?usage: native/build.sh OUT}
here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$here/../cni_fan/__init__.py")
[ -n "$version" ] || { echo "native/build.sh: no __version__ in cni_fan/__init__.py" >&2; exit 1; }
cc=${CC:-cc}
tmp="$out.tmp-$$"
trap 'rm -f "$tmp"' EXIT
$cc -std=c99 -O2 -Wall -Wextra -Werror -DCNI_FAN_VERSION="\"$version\"" -o "$tmp" "$here/fan-client.c"
mv -f "$tmp" "$out"
