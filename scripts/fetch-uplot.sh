#!/bin/sh
# Fetch the status page's charting library, uPlot (MIT, https://github.com/leeoniya/uPlot),
# at the exact version pinned here, from the npm registry with npm itself, check the
# tarball against the pinned integrity hash, and put its browser build, its stylesheet and
# its license into the package's static files. Run by `make venv` and the Docker build;
# the files are never committed (.gitignore). Usage: scripts/fetch-uplot.sh [DEST_DIR]
set -eu
VERSION=1.6.32
INTEGRITY=sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==
DEST=${1:-$(dirname "$0")/../uproxy/status/static/vendor}

if [ -f "$DEST/uPlot.VERSION" ] && [ "$(cat "$DEST/uPlot.VERSION")" = "$VERSION" ]; then
  exit 0
fi
command -v npm >/dev/null 2>&1 || {
  echo "uproxy: the status page's charts need npm to fetch uPlot (apt-get install npm)" >&2
  exit 2
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent --ignore-scripts "uplot@$VERSION" >/dev/null)
tarball="$work/uplot-$VERSION.tgz"
got=$(node -e 'const c=require("crypto"),f=require("fs");
  process.stdout.write("sha512-"+c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"))' "$tarball")
if [ "$got" != "$INTEGRITY" ]; then
  echo "uproxy: uplot-$VERSION.tgz does not match the pinned integrity ($got)" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$work" package/dist/uPlot.iife.min.js package/dist/uPlot.min.css \
  package/LICENSE
mkdir -p "$DEST"
cp "$work/package/dist/uPlot.iife.min.js" "$work/package/dist/uPlot.min.css" "$DEST/"
cp "$work/package/LICENSE" "$DEST/uPlot.LICENSE"
echo "$VERSION" > "$DEST/uPlot.VERSION"
echo "uPlot $VERSION -> $DEST"
