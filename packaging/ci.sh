#!/usr/bin/env bash
# CI of the shipped artefacts (issue 12): the static release binary and the
# .deb, checked the way an operator's machine would see them. Installs the
# tools it uses when they are missing (CI is root on a clean Debian 12).
# Every step prints its name; any failure stops the script with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "== ci: $*"; }
fail() {
  echo "ci: FAIL: $*" >&2
  exit 1
}

target=x86_64-unknown-linux-gnu
binary="target/$target/release/scaiwave"
size_max=$((12 * 1024 * 1024))
exposure_max=2.0

step "tools"
missing=()
command -v file >/dev/null 2>&1 || missing+=(file)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v dpkg-deb >/dev/null 2>&1 || missing+=(dpkg)
command -v git >/dev/null 2>&1 || missing+=(git)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

step "static release binary"
nice -n 19 cargo build --release --locked
[ -x "$binary" ] || fail "$binary was not built"
described="$(file -b "$binary")"
echo "file: $described"
case "$described" in
  *"statically linked"* | *"static-pie linked"*) ;;
  *) fail "$binary is not statically linked: $described" ;;
esac
case "$described" in
  *"not stripped"*) fail "$binary is not stripped: $described" ;;
  *stripped*) ;;
  *) fail "file does not say $binary is stripped: $described" ;;
esac
linked="$(ldd "$binary" 2>&1 || true)"
echo "ldd: $linked"
case "$linked" in
  *"not a dynamic executable"* | *"statically linked"*) ;;
  *) fail "ldd finds shared libraries in $binary: $linked" ;;
esac
size="$(stat -c %s "$binary")"
echo "size: $size bytes (at most $size_max)"
[ "$size" -le "$size_max" ] || fail "$binary is $size bytes, over 12 MiB"

step "--version names the revision"
version="$("$binary" --version)"
echo "$version"
rev="$(git rev-parse --short=12 HEAD)"
case "$version" in
  "scaiwave "*"(rev $rev)") ;;
  *) fail "--version says '$version', expected the revision $rev" ;;
esac

step "the .deb"
bash packaging/build-deb.sh
debs="$(ls -t target/debian/scaiwave_*_amd64.deb)" || fail "no .deb in target/debian/"
deb="${debs%%$'\n'*}"
[ -f "$deb" ] || fail "no .deb in target/debian/"
echo "$deb: $(stat -c %s "$deb") bytes"
dpkg-deb --info "$deb"

step "the .deb's files and modes"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
unit=""
for dir in usr/lib/systemd/system lib/systemd/system; do
  [ -f "$root/$dir/scaiwave.service" ] && unit="$dir/scaiwave.service"
done
[ -n "$unit" ] || fail "the .deb has no scaiwave.service"
expect() { # path mode
  [ -f "$root/$1" ] || fail "the .deb has no /$1"
  mode="$(stat -c %a "$root/$1")"
  [ "$mode" = "$2" ] || fail "/$1 has mode $mode, expected $2"
  echo "ok /$1 $mode"
}
expect usr/bin/scaiwave 755
expect "$unit" 644
expect etc/scaiwave/scaiwave.toml 640
expect usr/share/bash-completion/completions/scaiwave 644
expect usr/share/zsh/vendor-completions/_scaiwave 644
expect usr/share/fish/vendor_completions.d/scaiwave.fish 644
expect usr/share/man/man1/scaiwave.1.gz 644
cmp -s "$root/usr/bin/scaiwave" "$binary" || fail "the .deb's binary is not the one built"
# Each text is read whole before grep looks at it: `producer | grep -q`
# can kill the producer with SIGPIPE, which pipefail reports as failure.
conffiles="$(dpkg-deb -I "$deb" conffiles)" || fail "the .deb marks no conffiles"
grep -qx /etc/scaiwave/scaiwave.toml <<<"$conffiles" ||
  fail "/etc/scaiwave/scaiwave.toml is not a conffile"
for script in postinst prerm postrm; do
  dpkg-deb -I "$deb" "$script" >/dev/null || fail "the .deb has no $script"
done
postinst="$(dpkg-deb -I "$deb" postinst)"
grep -q 'adduser --system' <<<"$postinst" || fail "postinst makes no user"
grep -q 'deb-systemd-helper' <<<"$postinst" || fail "postinst enables no unit"
grep -q 'deb-systemd-invoke $_dh_action' <<<"$postinst" || fail "postinst starts no unit"
grep -q '_dh_action=start' <<<"$postinst" || fail "postinst starts no unit"
grep -q '/run/systemd/system' <<<"$postinst" || fail "postinst starts the unit without systemd"
# The unit runs as scaiwave: the user must exist before it is started.
user_line="$(grep -m 1 -n 'adduser --system' <<<"$postinst" | cut -d: -f1)"
start_line="$(grep -m 1 -n 'deb-systemd-invoke' <<<"$postinst" | cut -d: -f1)"
[ "$user_line" -lt "$start_line" ] || fail "postinst starts the unit before making its user"
prerm="$(dpkg-deb -I "$deb" prerm)"
grep -q 'deb-systemd-invoke stop' <<<"$prerm" || fail "prerm does not stop the unit"
man="$(gzip -dc "$root/usr/share/man/man1/scaiwave.1.gz")"
grep -qF "$rev" <<<"$man" || fail "the man page does not name the revision $rev"
grep -q 'admin' "$root/usr/share/bash-completion/completions/scaiwave" ||
  fail "the bash completion does not know the admin command"
# The packaged binary runs on the packaged config (its data_dir moved to
# the scratch dir, so nothing is created on this machine).
identity="$(SCAIWAVE_DATA_DIR="$root/data" "$root/usr/bin/scaiwave" \
  --config "$root/etc/scaiwave/scaiwave.toml" admin --json federation key show)" ||
  fail "the packaged binary does not run on the packaged config"
grep -q '"key_id"' <<<"$identity" || fail "no key in: $identity"
echo "ok the packaged binary opens a database with the packaged config"

step "systemd-analyze verify"
# verify wants ExecStart's binary to exist: point it at the extracted one.
checked="$root/check/scaiwave.service"
mkdir -p "$root/check"
sed "s#^ExecStart=/usr/bin/scaiwave #ExecStart=$root/usr/bin/scaiwave #" "$root/$unit" >"$checked"
grep -q "^ExecStart=$root/usr/bin/scaiwave " "$checked" || fail "ExecStart is not /usr/bin/scaiwave"
verify="$(systemd-analyze verify "$checked" 2>&1)" || fail "systemd-analyze verify: $verify"
# verify also reports other units of the machine; only ours matters.
if echo "$verify" | grep -F "scaiwave.service"; then
  fail "systemd-analyze verify complains about the unit"
fi
echo "verify: no complaint about scaiwave.service"

step "systemd-analyze security"
security="$(systemd-analyze security --offline=true "$checked" 2>&1)" ||
  fail "systemd-analyze security failed: $security"
overall="$(echo "$security" | grep 'Overall exposure level')" ||
  fail "no overall exposure level in: $security"
echo "$overall"
score="$(echo "$overall" | sed -n 's/.*: *\([0-9][0-9]*\.[0-9]*\).*/\1/p')"
[ -n "$score" ] || fail "cannot read the exposure score from: $overall"
awk -v s="$score" -v m="$exposure_max" 'BEGIN { exit !(s <= m) }' ||
  fail "exposure $score is over $exposure_max"

echo "ci: packaging OK (binary $size bytes, exposure $score)"
