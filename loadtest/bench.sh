#!/usr/bin/env bash
# bench.sh: run the same chat and drain load against chatd and against
# Mosquitto 2 (persistence on) on this machine, and write the comparison
# to docs/benchmarks.md (or $BENCH_OUT).
#
# Everything runs on loopback. The script starts both servers itself and,
# on exit, stops only the processes it started.
#
# Runs: chat as fast as flow control allows (throughput), chat at a fixed
# rate (latency under a moderate load), and drain.
#
# Settings (environment): BENCH_USERS (200), BENCH_DURATION (20s), BENCH_RATE (2000),
# BENCH_MESSAGES (100000), BENCH_SIZE (256), BENCH_RECEIPTS (false), BENCH_OUT (docs/benchmarks.md),
# CHATD_PORT (21883), CHATD_HTTP_PORT (21880), MOSQUITTO_PORT (21884),
# CHATD_BIN (a chatd binary to use instead of building ./cmd/chatd).
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

users=${BENCH_USERS:-200}
duration=${BENCH_DURATION:-20s}
rate=${BENCH_RATE:-2000}
messages=${BENCH_MESSAGES:-100000}
size=${BENCH_SIZE:-256}
out=${BENCH_OUT:-docs/benchmarks.md}
chatd_port=${CHATD_PORT:-21883}
chatd_http=${CHATD_HTTP_PORT:-21880}
mosq_port=${MOSQUITTO_PORT:-21884}

work=$(mktemp -d "${TMPDIR:-/tmp}/chatd-bench.XXXXXX")
chatd_pid=""
mosq_pid=""

cleanup() {
	local pid
	for pid in "$chatd_pid" "$mosq_pid"; do
		if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
			kill -TERM "$pid" 2>/dev/null || true
		fi
	done
	for pid in "$chatd_pid" "$mosq_pid"; do
		if [[ -n "$pid" ]]; then
			# Give each server 10 s to save and exit, then force it.
			for _ in $(seq 100); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.1
			done
			kill -KILL "$pid" 2>/dev/null || true
			wait "$pid" 2>/dev/null || true
		fi
	done
	rm -rf "$work"
}
trap cleanup EXIT

log() { printf 'bench: %s\n' "$*" >&2; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
	local port=$1 pid=$2 name=$3
	for _ in $(seq 300); do
		if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
			return 0
		fi
		if ! kill -0 "$pid" 2>/dev/null; then
			log "$name exited before listening on $port; its log:"
			cat "$work/$name.log" >&2 || true
			exit 1
		fi
		sleep 0.1
	done
	log "$name not listening on $port after 30 s"
	exit 1
}

for p in "$chatd_port" "$chatd_http" "$mosq_port"; do
	if ! port_free "$p"; then
		log "port $p is in use; set CHATD_PORT, CHATD_HTTP_PORT or MOSQUITTO_PORT"
		exit 1
	fi
done

log "building loadtest${CHATD_BIN:+ (chatd: $CHATD_BIN)}${CHATD_BIN:- and chatd}"
if [[ -n "${CHATD_BIN:-}" ]]; then
	cp "$CHATD_BIN" "$work/chatd"
else
	go build -o "$work/chatd" ./cmd/chatd
fi
go build -o "$work/loadtest" ./cmd/loadtest

mosquitto=$(command -v mosquitto || true)
if [[ -z "$mosquitto" && -x /usr/sbin/mosquitto ]]; then
	mosquitto=/usr/sbin/mosquitto
fi
if [[ -z "$mosquitto" ]]; then
	log "installing mosquitto from Debian"
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto
	mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
fi

export CHATD_AUTH_SECRET=${CHATD_AUTH_SECRET:-bench-$(od -An -N16 -tx1 /dev/urandom | tr -d " \n")}
# Mosquitto sends no delivered receipts; for a like-for-like comparison
# chatd does not either (each one is a second durable message). Set
# BENCH_RECEIPTS=true to measure chatd with them.
export CHATD_RECEIPTS_DELIVERED=${BENCH_RECEIPTS:-false}
# The drain scenario queues from a few senders at full speed, far above a
# phone's rate: lift the per-user publish limits (Mosquitto has none).
export CHATD_LIMITS_PUBLISH_RATE=${CHATD_LIMITS_PUBLISH_RATE:-1000000}
export CHATD_LIMITS_PUBLISH_BYTES_RATE=${CHATD_LIMITS_PUBLISH_BYTES_RATE:-1073741824}

log "starting chatd on 127.0.0.1:$chatd_port"
mkdir -p "$work/chatd-data"
chatd_cmd=(chatd serve --data-dir "$work/chatd-data" --listen "127.0.0.1:$chatd_port" --http "127.0.0.1:$chatd_http")
"$work/chatd" "${chatd_cmd[@]:1}" >"$work/chatd.log" 2>&1 &
chatd_pid=$!
wait_port "$chatd_port" "$chatd_pid" chatd

log "starting mosquitto on 127.0.0.1:$mosq_port"
mkdir -p "$work/mosquitto-data"
# Mosquitto started as root drops to the mosquitto user, which must be
# able to write its persistence file.
if id mosquitto >/dev/null 2>&1; then
	chown mosquitto "$work/mosquitto-data"
fi
cat >"$work/mosquitto.conf" <<EOF
listener $mosq_port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $work/mosquitto-data/
max_queued_messages 10000000
max_inflight_messages 64
set_tcp_nodelay true
connection_messages false
log_type error
log_type warning
EOF
"$mosquitto" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
mosq_pid=$!
wait_port "$mosq_port" "$mosq_pid" mosquitto

commands=()
statuses=()
# run NAME ARGS...: one load-test run, its JSON report in $work/NAME.json.
run() {
	local name=$1
	shift
	local args=("$@" --json "$work/$name.json" --quiet)
	local shown="loadtest ${args[*]//$work/\$TMP}"
	shown=${shown//--server-pid $chatd_pid/--server-pid \$CHATD_PID}
	shown=${shown//--server-pid $mosq_pid/--server-pid \$MOSQUITTO_PID}
	commands+=("$shown")
	log "loadtest ${args[*]}"
	local status=0
	"$work/loadtest" "${args[@]}" >"$work/$name.txt" || status=$?
	statuses+=("$name: exit $status")
	cat "$work/$name.txt" >&2
}

chat=(--users "$users" --duration "$duration" --size "$size")
drain=(--messages "$messages" --size "$size" --duration 120s)
run chat-chatd run chat --broker "tcp://127.0.0.1:$chatd_port" --server-pid "$chatd_pid" "${chat[@]}"
run chat-mosquitto run chat --plain --broker "tcp://127.0.0.1:$mosq_port" --server-pid "$mosq_pid" "${chat[@]}"
run rate-chatd run chat --broker "tcp://127.0.0.1:$chatd_port" --server-pid "$chatd_pid" "${chat[@]}" --rate "$rate"
run rate-mosquitto run chat --plain --broker "tcp://127.0.0.1:$mosq_port" --server-pid "$mosq_pid" "${chat[@]}" --rate "$rate"
run drain-chatd run drain --broker "tcp://127.0.0.1:$chatd_port" --server-pid "$chatd_pid" "${drain[@]}"
run drain-mosquitto run drain --plain --broker "tcp://127.0.0.1:$mosq_port" --server-pid "$mosq_pid" "${drain[@]}"

"$work/loadtest" compare --ours chatd --theirs "mosquitto" \
	"$work/chat-chatd.json" "$work/chat-mosquitto.json" \
	"$work/rate-chatd.json" "$work/rate-mosquitto.json" \
	"$work/drain-chatd.json" "$work/drain-mosquitto.json" >"$work/table.md"

model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
mosq_version=$("$mosquitto" -h 2>/dev/null | head -n1 || true)
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "uncommitted")

mkdir -p "$(dirname "$out")"
{
	echo "# Benchmarks: chatd vs Mosquitto"
	echo
	echo "Generated by \`loadtest/bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), chatd at $commit."
	echo "Both servers ran on the same machine as the load tester, over loopback;"
	echo "the load tester drives both with the same simulated phones (paho, QoS 1,"
	echo "persistent sessions), Mosquitto in plain MQTT mode (no tokens, no envelope)."
	echo
	echo "- **chat**: $users users send $size-byte messages to random other users for"
	echo "  $duration, as fast as flow control allows (16 unacknowledged publishes per"
	echo "  sender): throughput, and latency when saturated."
	echo "- **chat @${rate}/s**: the same at a fixed total rate: latency under a moderate load."
	echo "- **drain**: $messages messages queued for an offline user by 4 senders, then"
	echo "  it connects: the durable write rate, and how fast its queue drains."
	echo
	echo "## Machine"
	echo
	echo "- CPUs: $(nproc) × ${model:-unknown}"
	echo "- Memory: $mem"
	echo "- $(go version)"
	echo "- ${mosq_version:-mosquitto}"
	echo
	echo "## Results"
	echo
	echo "A ratio above 1 means chatd's number is higher: better for rates, worse"
	echo "for latencies, CPU and memory. Note what the numbers buy: chatd PUBACKs a"
	echo "message only once it is on disk; Mosquitto keeps it in memory and saves"
	echo "snapshots every 30 minutes. Mosquitto runs with \`set_tcp_nodelay true\`:"
	echo "its default (Nagle's algorithm on) adds 15-40 ms to each delivery at low"
	echo "rates, which would flatter chatd."
	echo
	cat "$work/table.md"
	echo
	echo "Exit status of each run (0 = every PUBACKed message delivered once, in order):"
	echo
	for s in "${statuses[@]}"; do
		echo "- $s"
	done
	echo
	echo "## Commands"
	echo
	echo '```sh'
	echo "export CHATD_AUTH_SECRET=...   # any secret"
	echo "${chatd_cmd[*]//$work/\$TMP} & CHATD_PID=\$!"
	echo "mosquitto -c \$TMP/mosquitto.conf & MOSQUITTO_PID=\$!"
	for c in "${commands[@]}"; do
		echo "$c"
	done
	echo '```'
	echo
	echo "with \`\$TMP/mosquitto.conf\`:"
	echo
	echo '```'
	sed "s|$work|\$TMP|g" "$work/mosquitto.conf"
	echo '```'
} >"$out"
log "wrote $out"
