#!/usr/bin/env bash
# Two scaiwave servers on this machine, federating: a throwaway CA, a
# certificate for each, both servers started on loopback, then a federated
# DM between alice@A and bob@B walked through with curl, step by step.
#
#   bash examples/two-servers/run.sh [path-to-scaiwave-binary]
#
# Without a binary it runs `cargo build --release` and uses what that built.
# KEEP=1 keeps the work dir (configs, certificates, data, logs) afterwards;
# the servers are stopped either way. Needs openssl, curl and jq (installed
# with apt-get when missing and run as root). See README.md beside this file.
set -eEuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
READY_TIMEOUT=${READY_TIMEOUT:-30} # seconds for a server to answer once started
FLOW_TIMEOUT=${FLOW_TIMEOUT:-30}   # seconds for a federated event to reach the other side

STEP=0
step() {
    STEP=$((STEP + 1))
    printf '%2d. %s\n' "$STEP" "$*"
}
say() { printf '    %s\n' "$@"; }

WORK=""
PIDS=()
FAILED=0

show_logs() {
    local side
    if [[ -n $WORK && -s $WORK/openssl.log ]] && ((STEP == 1)); then
        echo "---- $WORK/openssl.log ----" >&2
        tail -n 30 "$WORK/openssl.log" >&2
    fi
    for side in a b; do
        if [[ -n $WORK && -f $WORK/$side.log ]]; then
            echo "---- last lines of $WORK/$side.log ----" >&2
            tail -n 30 "$WORK/$side.log" >&2
        fi
    done
}

# Report what failed (once), with both servers' logs, and exit non-zero;
# the EXIT trap then stops the servers.
fail() {
    if ((BASH_SUBSHELL > 0)); then exit 1; fi # the caller reports it
    if ((FAILED)); then exit 1; fi
    FAILED=1
    echo >&2
    if ((STEP > 0)); then echo "FAILED (step $STEP): $*" >&2; else echo "FAILED: $*" >&2; fi
    show_logs
    exit 1
}
# Anything else that fails: name the command (its first line, shortened).
on_err() {
    local c=${1%%$'\n'*}
    fail "command failed (line $2): ${c:0:150}"
}
trap 'on_err "$BASH_COMMAND" "$LINENO"' ERR

stop_servers() {
    local pid deadline
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # A server flushes and exits 0 on SIGTERM; give it 15 s, then kill it.
    deadline=$((SECONDS + 15))
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

cleanup() {
    local rc=$?
    trap - ERR
    stop_servers
    if [[ -n $WORK ]]; then
        if [[ ${KEEP:-0} == 1 ]]; then
            echo "Kept the work dir: $WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- tools ---------------------------------------------------------------

need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null && continue
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            echo "(installing $tool with apt-get)"
            apt-get install -y -qq "$tool" >/dev/null ||
                { apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null; } ||
                fail "could not install $tool"
        else
            fail "$tool is needed; install it (e.g. apt-get install $tool)"
        fi
    done
}
need openssl curl jq

BIN=${1:-}
if [[ -z $BIN ]]; then
    command -v cargo >/dev/null || fail "no scaiwave binary given, and no cargo to build one"
    echo "Building scaiwave (cargo build --release) ..."
    # cargo names the executable it built, wherever the target dir (or a
    # build.target in .cargo/config.toml) puts it.
    BIN=$(cd "$REPO" && cargo build --release --bin scaiwave --message-format=json-render-diagnostics |
        jq -r 'select(.reason == "compiler-artifact" and .target.name == "scaiwave"
                      and (.target.kind | index("bin"))) | .executable // empty' | tail -n 1) ||
        fail "cargo build --release failed (its messages are above)"
    [[ -n $BIN ]] || fail "cargo build did not name a scaiwave executable"
fi
[[ -x $BIN ]] || fail "$BIN is not an executable scaiwave binary"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/scaiwave-two-servers.XXXXXX")
echo "Work dir: $WORK"
# The admin CLI reaches each server through <data_dir>/admin.sock, and a
# Unix socket path is at most 107 bytes.
((${#WORK} < 90)) || fail "the work dir path is too long for a Unix socket; set TMPDIR=/tmp"
echo

# ---- 1. certificates -----------------------------------------------------

step "Make a throwaway CA and a certificate from it for a.test and for b.test"
(
    cd "$WORK"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout ca.key -out ca.crt -days 2 -subj "/CN=scaiwave two-servers example CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>>openssl.log
    for host in a.test b.test; do
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout "$host.key" -out "$host.csr" -subj "/CN=$host" 2>>openssl.log
        # The SAN is the host part only: a certificate never names a port.
        printf '%s\n' "subjectAltName=DNS:$host" "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$host.ext"
        openssl x509 -req -in "$host.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
            -days 2 -extfile "$host.ext" -out "$host.crt" 2>>openssl.log
        rm "$host.csr" "$host.ext"
    done
)
say "CA: $WORK/ca.crt (both servers trust it through tls.trust_roots)"

# ---- 2. configs and start ------------------------------------------------

# Ports something already listens on, from /proc (no ss or netstat needed).
listening_ports() {
    local f sl local_addr rest
    for f in /proc/net/tcp /proc/net/tcp6; do
        [[ -r $f ]] || continue
        while read -r sl local_addr _ state rest; do
            if [[ $state == 0A ]]; then printf '%d\n' "0x${local_addr##*:}"; fi
        done <"$f"
    done
    return 0
}
# A free port below the kernel's ephemeral range (32768-60999), where
# servers bound to port 0 (such as parallel test runs) never land.
pick_port() {
    local used port
    used=" $(listening_ports | tr '\n' ' ') $* "
    while :; do
        port=$((20000 + RANDOM % 12000))
        [[ $used == *" $port "* ]] || break
    done
    echo "$port"
}

# Write $side.toml from the template beside this script: the example ports
# 8501 (A) and 8502 (B) become the ones picked (comments are left as they are).
render() {
    sed -e "/^[[:space:]]*#/!{s/8501/$A_PORT/g; s/8502/$B_PORT/g}" "$HERE/$1.toml" >"$WORK/$1.toml"
}

start() { # start a|b
    # NO_COLOR: plain text in the log file, without terminal colour codes.
    (cd "$WORK" && NO_COLOR=1 exec "$BIN" serve --config "$1.toml" >"$1.log" 2>&1) &
    PIDS+=($!)
    eval "${1^^}_PID=$!"
}

# Wait until server $1 answers its descriptor over HTTPS with a signing key
# and its admin token exists. 0: ready; 1: it exited because its port was
# taken meanwhile (pick again); otherwise fail.
wait_ready() {
    local side=$1 pid port deadline
    pid=$(eval echo "\$${side^^}_PID")
    port=$(eval echo "\$${side^^}_PORT")
    deadline=$((SECONDS + READY_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            grep -q "cannot listen on" "$WORK/$side.log" && return 1
            fail "server ${side^^} exited during start-up (log: $WORK/$side.log)"
        fi
        if [[ -s $WORK/$side-data/admin-token ]] &&
            curl -sf --max-time 2 --cacert "$WORK/ca.crt" --resolve "$side.test:$port:127.0.0.1" \
                "https://$side.test:$port/.well-known/scaiwave/server" 2>/dev/null |
            jq -e '.public_key != ""' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    fail "server ${side^^} did not answer https://$side.test:$port within ${READY_TIMEOUT}s"
}

step "Pick two free loopback ports, write a.toml and b.toml, start both servers"
for attempt in 1 2 3; do
    A_PORT=$(pick_port)
    B_PORT=$(pick_port "$A_PORT")
    render a
    render b
    start a
    start b
    if wait_ready a && wait_ready b; then
        break
    fi
    # Something took a port between the pick and the bind: start afresh.
    ((attempt < 3)) || fail "could not find two free ports in 3 attempts"
    say "a port was taken meanwhile; picking others"
    stop_servers
    rm -rf "$WORK/a-data" "$WORK/b-data"
done
A=a.test:$A_PORT
B=b.test:$B_PORT
say "A = $A (pid $A_PID, log $WORK/a.log)" "B = $B (pid $B_PID, log $WORK/b.log)"

# ---- helpers for the HTTP API --------------------------------------------

# call a|b METHOD PATH TOKEN [JSON]: sets STATUS and BODY. curl dials
# 127.0.0.1 for the server's name (--resolve) and checks its certificate
# against the example CA (--cacert), as a peer does.
call() {
    local side=$1 method=$2 path=$3 token=$4 data=${5-} port args
    port=$(eval echo "\$${side^^}_PORT")
    args=(-sS --max-time 15 --cacert "$WORK/ca.crt" --resolve "$side.test:$port:127.0.0.1"
        -X "$method" -o "$WORK/body.json" -w '%{http_code}')
    [[ -n $token ]] && args+=(-H "Authorization: Bearer $token")
    [[ -n $data ]] && args+=(-H 'Content-Type: application/json' --data "$data")
    STATUS=$(curl "${args[@]}" "https://$side.test:$port$path") ||
        fail "$method https://$side.test:$port$path: curl could not reach the server"
    BODY=$(cat "$WORK/body.json")
}
# expect STATUS... : the last call answered one of these, or fail.
expect() {
    local s
    for s in "$@"; do [[ $STATUS == "$s" ]] && return 0; done
    fail "expected HTTP $*, got $STATUS: $BODY"
}
# admin a|b ARGS...: the admin CLI, which reaches the running server
# through the admin socket in its data dir.
admin() {
    local side=$1
    shift
    (cd "$WORK" && "$BIN" admin "$@" --config "$side.toml" 2>"$WORK/admin.err") ||
        { cat "$WORK/admin.err" >&2; return 1; }
}
# A room id or FQID percent-encoded for a URL path: every byte outside
# RFC 3986's unreserved set (jq 1.6's @uri leaves !*'() as they are).
enc() {
    jq -rn --arg s "$1" '$s | @uri | gsub("!"; "%21") | gsub("[*]"; "%2A")
        | gsub("[\u0027]"; "%27") | gsub("[(]"; "%28") | gsub("[)]"; "%29")'
}

# poll SECONDS WHAT COMMAND...: run COMMAND until it succeeds, for at most
# SECONDS, or fail naming WHAT.
poll() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@"; do
        ((SECONDS < deadline)) || fail "$what: not within ${limit}s (last answer: HTTP $STATUS $BODY)"
        sleep 0.2
    done
}

# ---- 3. descriptors and admin tokens ------------------------------------

step "Read each server's first admin token and check its descriptor"
ADMIN_A=$(cat "$WORK/a-data/admin-token")
ADMIN_B=$(cat "$WORK/b-data/admin-token")
for side in a b; do
    call "$side" GET /.well-known/scaiwave/server ""
    expect 200
    say "$(jq -r '"https://\(.server_name)/.well-known/scaiwave/server: key \(.key_id), protocols \(.protocol_versions | join(","))"' <<<"$BODY")"
done
say "admin tokens: $WORK/a-data/admin-token, $WORK/b-data/admin-token"

# ---- 4. participants -----------------------------------------------------

step "Create alice on A and bob on B (POST /v1/admin/participants, admin token)"
call a POST /v1/admin/participants "$ADMIN_A" '{"local_id": "alice", "display_name": "Alice", "power_level": "member"}'
expect 200
ALICE=$(jq -r .fqid <<<"$BODY")
ALICE_TOKEN=$(jq -r .token <<<"$BODY")
call b POST /v1/admin/participants "$ADMIN_B" '{"local_id": "bob", "display_name": "Bob", "power_level": "member"}'
expect 200
BOB=$(jq -r .fqid <<<"$BODY")
BOB_TOKEN=$(jq -r .token <<<"$BODY")
say "$ALICE and $BOB"

# ---- 5. policy -----------------------------------------------------------

step "Set each side's policy to allow only the other (scaiwave admin federation policy set)"
admin a federation policy set "{\"default_mode\": \"invite_only\", \"allowed_peers\": [\"$B\"]}" >"$WORK/policy-a.json"
admin b federation policy set "{\"default_mode\": \"invite_only\", \"allowed_peers\": [\"$A\"]}" >"$WORK/policy-b.json"
say "A: $(jq -c '{default_mode, allowed_peers}' "$WORK/policy-a.json")"
say "B: $(jq -c '{default_mode, allowed_peers}' "$WORK/policy-b.json")"

# ---- 6. check ------------------------------------------------------------

step "Run the handshake check on each side against the other (scaiwave admin federation check)"
for pair in "a $B" "b $A"; do
    side=${pair%% *}
    peer=${pair#* }
    say "on ${side^^}: scaiwave admin federation check $peer"
    out=$(admin "$side" federation check "$peer")
    printf '      %s\n' "${out//$'\n'/$'\n'      }"
    # The last line sums it up (the command exits 0 either way).
    [[ $(tail -n 1 <<<"$out") == "$peer: all checks passed" ]] ||
        fail "federation check on ${side^^} against $peer did not pass"
done

# ---- 7. the DM -----------------------------------------------------------

step "alice starts a federated DM with $BOB (POST /v1/me/federated-dms)"
call a POST /v1/me/federated-dms "$ALICE_TOKEN" "{\"fqid\": \"$BOB\"}"
expect 200
ROOM=$(jq -r .room_id <<<"$BODY")
[[ $(jq -r '"\(.room_type) \(.federated)"' <<<"$BODY") == "dm true" ]] ||
    fail "expected a federated dm room: $BODY"
say "room $ROOM (hosted by A; the invite is queued for B)"

step "bob sees the invitation (GET /v1/me/invitations on B)"
invited() {
    call b GET /v1/me/invitations "$BOB_TOKEN"
    [[ $STATUS == 200 ]] || return 1
    INVITE=$(jq -r --arg r "$ROOM" '.invitations[] | select(.room_id == $r) | .invite_id' <<<"$BODY")
    [[ -n $INVITE ]]
}
poll "$FLOW_TIMEOUT" "bob's invitation to $ROOM" invited
say "invite $INVITE from $(jq -r --arg r "$ROOM" '.invitations[] | select(.room_id == $r) | .inviter' <<<"$BODY")"

step "bob accepts (POST /v1/me/invitations/{invite_id}/accept); A lists him as joined"
call b POST "/v1/me/invitations/$INVITE/accept" "$BOB_TOKEN"
# 200 joined, or 202 pending if A could not be reached at once (B retries).
expect 200 202
say "B answered: $(jq -c . <<<"$BODY")"
joined() {
    call a GET "/v1/rooms/$(enc "$ROOM")/members" "$ALICE_TOKEN"
    [[ $STATUS == 200 ]] &&
        jq -e --arg f "$BOB" '.members[] | select(.fqid == $f and .membership == "join")' <<<"$BODY" >/dev/null
}
poll "$FLOW_TIMEOUT" "bob joined on A" joined
say "members on A: $(jq -r '[.members[] | "\(.fqid) (\(.membership)\(if .foreign then ", foreign" else "" end))"] | join(", ")' <<<"$BODY")"

# has a|b TOKEN SENDER TEXT: the room's messages on that side include TEXT from SENDER.
has() {
    call "$1" GET "/v1/rooms/$(enc "$ROOM")/messages" "$2"
    [[ $STATUS == 200 ]] &&
        jq -e --arg s "$3" --arg b "$4" '.messages[] | select(.sender == $s and .body == $b)' <<<"$BODY" >/dev/null
}

HELLO="Hello Bob, this is Alice on A"
step "alice sends \"$HELLO\" (POST /v1/rooms/{room_id}/messages on A)"
call a POST "/v1/rooms/$(enc "$ROOM")/messages" "$ALICE_TOKEN" "$(jq -n --arg b "$HELLO" '{body: $b}')"
expect 200
say "event $(jq -r '"\(.event_id), \(.state)"' <<<"$BODY")"

step "bob reads it on B (GET /v1/rooms/{room_id}/messages, polled)"
poll "$FLOW_TIMEOUT" "alice's message on B" has b "$BOB_TOKEN" "$ALICE" "$HELLO"
say "$(jq -r --arg b "$HELLO" '.messages[] | select(.body == $b) | "seq \(.seq) \(.sender): \(.body)"' <<<"$BODY")"

REPLY="Hi Alice, Bob here on B"
step "bob replies \"$REPLY\" (POST /v1/rooms/{room_id}/messages on B)"
call b POST "/v1/rooms/$(enc "$ROOM")/messages" "$BOB_TOKEN" "$(jq -n --arg b "$REPLY" '{body: $b}')"
expect 200
say "event $(jq -r '"\(.event_id), \(.state)"' <<<"$BODY")"

step "alice reads the reply on A (polled)"
poll "$FLOW_TIMEOUT" "bob's reply on A" has a "$ALICE_TOKEN" "$BOB" "$REPLY"
say "$(jq -r --arg b "$REPLY" '.messages[] | select(.body == $b) | "seq \(.seq) \(.sender): \(.body)"' <<<"$BODY")"

step "Both sides hold the same conversation in the host's order; peers are healthy"
call a GET "/v1/rooms/$(enc "$ROOM")/messages" "$ALICE_TOKEN"
expect 200
ON_A=$(jq -c '[.messages[] | {seq, sender, body}]' <<<"$BODY")
call b GET "/v1/rooms/$(enc "$ROOM")/messages" "$BOB_TOKEN"
expect 200
ON_B=$(jq -c '[.messages[] | {seq, sender, body}]' <<<"$BODY")
[[ $ON_A == "$ON_B" ]] || fail "the two sides differ: A $ON_A, B $ON_B"
jq -r '.[] | "seq \(.seq) \(.sender): \(.body)"' <<<"$ON_A" | while read -r line; do say "$line"; done
for pair in "a $ADMIN_A $B" "b $ADMIN_B $A"; do
    read -r side token peer <<<"$pair"
    call "$side" GET /v1/admin/federation/peers "$token"
    expect 200
    row=$(jq -c --arg p "$peer" '.peers[] | select(.server_name == $p) | {status, last_error, queue_depth}' <<<"$BODY")
    say "${side^^}'s row for $peer: $row"
    [[ $(jq -r .status <<<"$row") == ok ]] || fail "${side^^} reports $peer as not ok: $row"
done

echo
echo "OK: federated DM works"
