#!/usr/bin/env bash
# Builds target/debian/scaiwave_<version>-1_amd64.deb: the static release
# binary, the unit, the commented config, completions and man pages.
# Installs cargo-deb when missing. The completions and man pages are
# written by build.rs into its OUT_DIR, whose path only cargo knows: it
# is read from cargo's build-script-executed message and copied to
# target/packaging/, where Cargo.toml's [package.metadata.deb] looks.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu

if ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  nice -n 19 cargo install cargo-deb --locked
fi

echo "== building the release binary (static, $target)"
messages="$(mktemp)"
trap 'rm -f "$messages"' EXIT
nice -n 19 cargo build --release --locked --message-format=json-render-diagnostics >"$messages"
# The one build-script-executed message of this package (ids look like
# path+file:///…#scaiwave@0.1.0); the JSON is one object per line.
out_dir="$(grep '"reason":"build-script-executed"' "$messages" |
  grep -E '"package_id":"[^"]*[#/]scaiwave[@#:]' |
  sed -n 's/.*"out_dir":"\([^"]*\)".*/\1/p' | tail -n 1)"
if [ -z "$out_dir" ] || [ ! -d "$out_dir/man" ]; then
  echo "build-deb: no OUT_DIR with man pages found in cargo's messages" >&2
  exit 1
fi
echo "== completions and man pages from $out_dir"
rm -rf target/packaging
mkdir -p target/packaging/man
cp -r "$out_dir/completions" target/packaging/
for page in "$out_dir"/man/*.1; do
  # -n: no name or time in the header, so the .deb is reproducible.
  gzip -9n -c "$page" >"target/packaging/man/$(basename "$page").gz"
done

echo "== cargo deb"
mkdir -p target/debian
# --no-build: the binary above is the one shipped; --no-strip: the
# release profile stripped it already.
deb="$(cargo deb --no-build --no-strip --target "$target" --output target/debian/ | tail -n 1)"
echo "built $deb"
