#!/usr/bin/env bash
# bench.sh: run the same loads against chatd and against Mosquitto 2
# (persistence on) on this machine, and write the comparison to
# docs/benchmarks.md (or $BENCH_OUT).
#
# Everything runs on loopback. The script starts chatd, a second chatd
# with delivered receipts on, and Mosquitto itself; the idle-connection
# and restart runs have loadtest start fresh servers (--server-cmd), which
# loadtest stops. On exit the script stops only the processes it started,
# by PID.
#
# Runs: idle connections (server memory per connection, at
# BENCH_IDLE_CONNS and at BENCH_IDLE_MAX connections), chat as fast as
# flow control allows (throughput), chat at BENCH_RATE and at
# BENCH_RATE_HIGH (latency; the high rate also against the receipts-on
# chatd), drain, and a restart with BENCH_RESTART_MESSAGES queued (chatd
# only; 0 skips it).
#
# Settings (environment): BENCH_USERS (200), BENCH_DURATION (20s), BENCH_RATE (2000),
# BENCH_RATE_HIGH (5000), BENCH_MESSAGES (100000), BENCH_SIZE (256), BENCH_RECEIPTS (false),
# BENCH_IDLE_CONNS (10000), BENCH_IDLE_MAX (19000), BENCH_IDLE_SETTLE (30s),
# BENCH_IDLE_RATE (1000 connections/s), BENCH_IDLE_KEEPALIVE (60s),
# BENCH_RESTART_MESSAGES (10000000), BENCH_RESTART_RECIPIENTS (100; raised when one
# user's share would pass CHATD_QUEUE_MAX_QUEUE_MESSAGES, 1000000 by default),
# BENCH_OUT (docs/benchmarks.md),
# CHATD_PORT (21883), CHATD_HTTP_PORT (21880), MOSQUITTO_PORT (21884),
# CHATD_RECEIPTS_PORT (21885), CHATD_RECEIPTS_HTTP_PORT (21881),
# FRESH_PORT (21886) and FRESH_HTTP_PORT (21882) for the servers loadtest starts,
# CHATD_BIN (a chatd binary to use instead of building ./cmd/chatd).
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

users=${BENCH_USERS:-200}
duration=${BENCH_DURATION:-20s}
rate=${BENCH_RATE:-2000}
rate_high=${BENCH_RATE_HIGH:-5000}
messages=${BENCH_MESSAGES:-100000}
size=${BENCH_SIZE:-256}
idle_conns=${BENCH_IDLE_CONNS:-10000}
idle_max=${BENCH_IDLE_MAX:-19000}
idle_settle=${BENCH_IDLE_SETTLE:-30s}
idle_rate=${BENCH_IDLE_RATE:-1000}
idle_keepalive=${BENCH_IDLE_KEEPALIVE:-60s}
restart_messages=${BENCH_RESTART_MESSAGES:-10000000}
restart_recipients=${BENCH_RESTART_RECIPIENTS:-100}
out=${BENCH_OUT:-docs/benchmarks.md}
chatd_port=${CHATD_PORT:-21883}
chatd_http=${CHATD_HTTP_PORT:-21880}
mosq_port=${MOSQUITTO_PORT:-21884}
receipts_port=${CHATD_RECEIPTS_PORT:-21885}
receipts_http=${CHATD_RECEIPTS_HTTP_PORT:-21881}
fresh_port=${FRESH_PORT:-21886}
fresh_http=${FRESH_HTTP_PORT:-21882}

work=$(mktemp -d "${TMPDIR:-/tmp}/chatd-bench.XXXXXX")
chatd_pid=""
receipts_pid=""
mosq_pid=""

cleanup() {
	local pid
	for pid in "$chatd_pid" "$receipts_pid" "$mosq_pid"; do
		if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
			kill -TERM "$pid" 2>/dev/null || true
		fi
	done
	for pid in "$chatd_pid" "$receipts_pid" "$mosq_pid"; do
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

for p in "$chatd_port" "$chatd_http" "$mosq_port" "$receipts_port" "$receipts_http" "$fresh_port" "$fresh_http"; do
	if ! port_free "$p"; then
		log "port $p is in use; set CHATD_PORT, CHATD_HTTP_PORT, MOSQUITTO_PORT, CHATD_RECEIPTS_PORT, CHATD_RECEIPTS_HTTP_PORT, FRESH_PORT or FRESH_HTTP_PORT"
		exit 1
	fi
done

# Open files: an idle-connection run holds one socket per connection in
# the load tester and one in the server, separate processes, plus what
# else each has open (the server's store files, listeners and log; the
# load tester's few files), which fd_reserve covers. Raise the soft limit
# to the hard one: the servers started here inherit it, and so do those
# loadtest starts (a Go program raises its own limit and hands its
# children the one it was given).
fd_reserve=512
hard_nofile=$(ulimit -Hn)
if [[ "$hard_nofile" == unlimited ]]; then
	hard_nofile=$(cat /proc/sys/fs/nr_open 2>/dev/null || echo 1048576)
fi
ulimit -n "$hard_nofile" 2>/dev/null || log "cannot raise the open-file limit to $hard_nofile"
nofile=$(ulimit -n)
for var in idle_conns idle_max; do
	if ((${!var} + fd_reserve > nofile)); then
		log "$var=${!var} needs $((${!var} + fd_reserve)) open files per process, the limit is $nofile: using $((nofile - fd_reserve))"
		printf -v "$var" '%d' $((nofile - fd_reserve))
	fi
done

# The restart run spreads its messages over enough offline users that
# none passes chatd's per-user queue cap.
queue_cap=${CHATD_QUEUE_MAX_QUEUE_MESSAGES:-1000000}
if ((restart_messages > 0)); then
	min_recipients=$(((restart_messages + queue_cap - 1) / queue_cap))
	if ((restart_recipients < min_recipients)); then
		log "BENCH_RESTART_RECIPIENTS=$restart_recipients would queue more than $queue_cap messages for one user: using $min_recipients"
		restart_recipients=$min_recipients
	fi
	if ((restart_recipients > restart_messages)); then
		restart_recipients=$restart_messages
	fi
fi

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
# BENCH_RECEIPTS=true to measure chatd with them. The second chatd below
# has them on whatever this says.
export CHATD_RECEIPTS_DELIVERED=${BENCH_RECEIPTS:-false}
# The drain and restart scenarios queue from a few senders at full speed,
# far above a phone's rate: lift the per-user publish limits (Mosquitto
# has none).
export CHATD_LIMITS_PUBLISH_RATE=${CHATD_LIMITS_PUBLISH_RATE:-1000000}
export CHATD_LIMITS_PUBLISH_BYTES_RATE=${CHATD_LIMITS_PUBLISH_BYTES_RATE:-1073741824}
# The runs against the first chatd say so when it has receipts on.
main_label=()
if [[ "$CHATD_RECEIPTS_DELIVERED" == true ]]; then
	main_label=(--label "receipts on")
fi

log "starting chatd on 127.0.0.1:$chatd_port"
mkdir -p "$work/chatd-data"
chatd_cmd=(chatd serve --data-dir "$work/chatd-data" --listen "127.0.0.1:$chatd_port" --http "127.0.0.1:$chatd_http")
"$work/chatd" "${chatd_cmd[@]:1}" >"$work/chatd.log" 2>&1 &
chatd_pid=$!
wait_port "$chatd_port" "$chatd_pid" chatd

# chatd's default configuration: delivered receipts on, each one a second
# durable message. Only the high-rate run drives it.
log "starting chatd with delivered receipts on 127.0.0.1:$receipts_port"
mkdir -p "$work/chatd-receipts-data"
receipts_cmd=(chatd serve --data-dir "$work/chatd-receipts-data" --listen "127.0.0.1:$receipts_port" --http "127.0.0.1:$receipts_http")
CHATD_RECEIPTS_DELIVERED=true "$work/chatd" "${receipts_cmd[@]:1}" >"$work/chatd-receipts.log" 2>&1 &
receipts_pid=$!
wait_port "$receipts_port" "$receipts_pid" chatd-receipts

# mosquitto_conf PORT DIR: a Mosquitto configuration listening on PORT
# and saving to DIR, which it creates for the mosquitto user (Mosquitto
# started as root drops to it) to write.
mosquitto_conf() {
	mkdir -p "$2"
	if id mosquitto >/dev/null 2>&1; then
		chown mosquitto "$2"
	fi
	cat <<MOSQUITTO_CONF
listener $1 127.0.0.1
allow_anonymous true
persistence true
persistence_location $2/
max_queued_messages 10000000
max_inflight_messages 64
set_tcp_nodelay true
connection_messages false
log_type error
log_type warning
MOSQUITTO_CONF
}

log "starting mosquitto on 127.0.0.1:$mosq_port"
mosquitto_conf "$mosq_port" "$work/mosquitto-data" >"$work/mosquitto.conf"
"$mosquitto" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
mosq_pid=$!
wait_port "$mosq_port" "$mosq_pid" mosquitto

commands=()
statuses=()
# shown_args ARGS...: the arguments as a reader would type them: scratch
# paths as $TMP, binaries by name, the script's servers' PIDs by name,
# and arguments with spaces quoted.
shown_args() {
	local a out=()
	for a in "$@"; do
		a=${a//$work\/chatd serve/chatd serve}
		a=${a//$mosquitto -c/mosquitto -c}
		a=${a//$work/\$TMP}
		if [[ "$a" == *" "* ]]; then
			a="\"$a\""
		fi
		out+=("$a")
	done
	local s="${out[*]}"
	s=${s//--server-pid $chatd_pid/--server-pid \$CHATD_PID}
	s=${s//--server-pid $receipts_pid/--server-pid \$CHATD_RECEIPTS_PID}
	s=${s//--server-pid $mosq_pid/--server-pid \$MOSQUITTO_PID}
	printf '%s' "$s"
}

# run [--progress] NAME ARGS...: one load-test run, its JSON report in
# $work/NAME.json; with --progress its live progress goes to stderr.
run() {
	local quiet=(--quiet)
	if [[ "$1" == --progress ]]; then
		quiet=()
		shift
	fi
	local name=$1
	shift
	local args=("$@" --json "$work/$name.json" "${quiet[@]}")
	commands+=("loadtest $(shown_args "${args[@]}")")
	log "loadtest ${args[*]}"
	local status=0
	"$work/loadtest" "${args[@]}" >"$work/$name.txt" || status=$?
	statuses+=("$name: exit $status")
	cat "$work/$name.txt" >&2
}

pairs=()
# pair OURS THEIRS: compare the reports of runs OURS and THEIRS ("-" for
# none); a run that wrote no report shows as "–", a pair with neither is
# left out.
pair() {
	local a="$work/$1.json" b="$work/$2.json"
	[[ -s "$a" ]] || a=-
	[[ -s "$b" ]] || b=-
	if [[ "$a" != - || "$b" != - ]]; then
		pairs+=("$a" "$b")
	fi
}

# Idle connections, each run on fresh servers that loadtest starts and
# stops, so that no earlier run's memory or sessions count: the server's
# memory per connection, read $idle_settle after the last one is up. The
# ramp is bounded at its expected time plus 30 s.
idle_sizes=()
for n in "$idle_conns" "$idle_max"; do
	if ((n > 0)); then
		idle_sizes+=("$n")
	fi
done
for n in "${idle_sizes[@]}"; do
	idle=(run connect --users "$n" --connect-rate "$idle_rate" --duration "$(((n + idle_rate - 1) / idle_rate + 30))s"
		--hold "$idle_settle" --keepalive "$idle_keepalive" --broker "tcp://127.0.0.1:$fresh_port")
	run "idle-$n-chatd" "${idle[@]}" "${main_label[@]}" --server-log "$work/idle-$n-chatd.log" \
		--server-cmd "$work/chatd serve --data-dir $work/idle-$n-chatd-data --listen 127.0.0.1:$fresh_port --http 127.0.0.1:$fresh_http"
	mosquitto_conf "$fresh_port" "$work/idle-$n-mosquitto-data" >"$work/mosquitto-idle-$n.conf"
	run "idle-$n-mosquitto" "${idle[@]}" --plain --server-log "$work/idle-$n-mosquitto.log" \
		--server-cmd "$mosquitto -c $work/mosquitto-idle-$n.conf"
done

chat=(--users "$users" --duration "$duration" --size "$size")
drain=(--messages "$messages" --size "$size" --duration 120s)
run chat-chatd run chat --broker "tcp://127.0.0.1:$chatd_port" --server-pid "$chatd_pid" "${chat[@]}" "${main_label[@]}"
run chat-mosquitto run chat --plain --broker "tcp://127.0.0.1:$mosq_port" --server-pid "$mosq_pid" "${chat[@]}"
run rate-chatd run chat --broker "tcp://127.0.0.1:$chatd_port" --server-pid "$chatd_pid" "${chat[@]}" --rate "$rate" "${main_label[@]}"
run rate-mosquitto run chat --plain --broker "tcp://127.0.0.1:$mosq_port" --server-pid "$mosq_pid" "${chat[@]}" --rate "$rate"
run high-chatd run chat --broker "tcp://127.0.0.1:$chatd_port" --server-pid "$chatd_pid" "${chat[@]}" --rate "$rate_high" "${main_label[@]}"
run high-mosquitto run chat --plain --broker "tcp://127.0.0.1:$mosq_port" --server-pid "$mosq_pid" "${chat[@]}" --rate "$rate_high"
run high-receipts run chat --broker "tcp://127.0.0.1:$receipts_port" --server-pid "$receipts_pid" "${chat[@]}" --rate "$rate_high" \
	--label "receipts on"
run drain-chatd run drain --broker "tcp://127.0.0.1:$chatd_port" --server-pid "$chatd_pid" "${drain[@]}" "${main_label[@]}"
run drain-mosquitto run drain --plain --broker "tcp://127.0.0.1:$mosq_port" --server-pid "$mosq_pid" "${drain[@]}"

# Restart with many queued messages, on a fresh chatd that loadtest
# starts, SIGKILLs, starts again and stops. The bound allows 5000 msg/s
# for queueing and draining together, plus five minutes.
if ((restart_messages > 0)); then
	run --progress restart-chatd run restart --broker "tcp://127.0.0.1:$fresh_port" \
		--messages "$restart_messages" --recipients "$restart_recipients" --size "$size" \
		--duration "$((restart_messages / 5000 + 300))s" "${main_label[@]}" --server-log "$work/restart-chatd.log" \
		--server-cmd "$work/chatd serve --data-dir $work/restart-chatd-data --listen 127.0.0.1:$fresh_port --http 127.0.0.1:$fresh_http"
fi

for n in "${idle_sizes[@]}"; do
	pair "idle-$n-chatd" "idle-$n-mosquitto"
done
pair chat-chatd chat-mosquitto
pair rate-chatd rate-mosquitto
pair high-chatd high-mosquitto
pair high-receipts high-mosquitto
pair drain-chatd drain-mosquitto
pair restart-chatd -
"$work/loadtest" compare --ours chatd --theirs "mosquitto" "${pairs[@]}" >"$work/table.md"

model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
mosq_version=$("$mosquitto" -h 2>/dev/null | head -n1 || true)
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "uncommitted")
receipts_note="without delivered receipts"
if [[ "$CHATD_RECEIPTS_DELIVERED" == true ]]; then
	receipts_note="with delivered receipts (labelled \"receipts on\")"
fi

mkdir -p "$(dirname "$out")"
# The hand-written analysis at the end of the file (from its "## Analysis"
# heading on) outlives the regenerated numbers.
analysis=""
if [[ -f "$out" ]]; then
	analysis=$(sed -n '/^## Analysis/,$p' "$out")
fi
{
	echo "# Benchmarks: chatd vs Mosquitto"
	echo
	echo "Generated by \`loadtest/bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), chatd at $commit."
	echo "Both servers ran on the same machine as the load tester, over loopback;"
	echo "the load tester drives both with the same simulated phones (paho, QoS 1,"
	echo "persistent sessions), Mosquitto in plain MQTT mode (no tokens, no envelope)."
	echo "chatd runs $receipts_note unless a row says otherwise."
	echo
	if ((${#idle_sizes[@]} > 0)); then
		names=()
		for n in "${idle_sizes[@]}"; do
			names+=("**connect ×$n**")
		done
		echo "- ${names[*]}: that many idle phones connect at ${idle_rate}/s (persistent"
		echo "  session, subscribed to their inbox, keepalive $idle_keepalive; authenticated for chatd)"
		echo "  to a freshly started server, and stay connected. The server's resident memory"
		echo "  is read before the first connection and $idle_settle after the last one's CONNACK:"
		echo "  the growth divided by the connections is the **KiB per connection, settled**."
		echo "  Connected and failed count the connections that did and did not open. Open"
		echo "  files: $nofile per process here; each side needs one per connection plus up to"
		echo "  $fd_reserve for the rest."
	fi
	echo "- **chat**: $users users send $size-byte messages to random other users for"
	echo "  $duration, as fast as flow control allows (16 unacknowledged publishes per"
	echo "  sender): throughput, and latency when saturated."
	echo "- **chat @${rate}/s**: the same at a fixed total rate: latency under a moderate load."
	echo "- **chat @${rate_high}/s**: the same at ${rate_high} messages per second: the send→deliver"
	echo "  p99 at the target rate. **chat @${rate_high}/s (receipts on)** is a second chatd with"
	echo "  delivered receipts on, the default configuration (each delivery also queues a"
	echo "  durable receipt to its sender), in the same table against the same Mosquitto run;"
	echo "  its send→delivered receipt p99 is the sender's second tick."
	echo "- **server CPU per delivered message (µs)**, in every chat row: the server's CPU"
	echo "  time over the whole run (connecting and the grace period included) divided by"
	echo "  the messages delivered."
	echo "- **drain**: $messages messages queued for an offline user by 4 senders, then"
	echo "  it connects: the durable write rate, and how fast its queue drains."
	if ((restart_messages > 0)); then
		echo "- **restart, $restart_messages queued** (chatd only): 4 senders queue $restart_messages"
		echo "  $size-byte messages for $restart_recipients offline users (round robin, under chatd's"
		echo "  per-user cap of $queue_cap) on a freshly started chatd, which is then SIGKILLed"
		echo "  (a crash) and started again. Measured from the new process's start: until"
		echo "  its MQTT port accepts connections, until a recipient reconnecting at once has"
		echo "  its CONNACK and its first queued message. Then every recipient drains its"
		echo "  queue: lost counts messages PUBACKed before the kill and never delivered."
		echo "  Mosquitto is not measured: a SIGKILL loses whatever it has not saved since"
		echo "  its last snapshot."
	fi
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
	echo "for latencies, times, CPU and memory. Note what the numbers buy: chatd PUBACKs a"
	echo "message only once it is on disk; Mosquitto keeps it in memory and saves"
	echo "snapshots every 30 minutes. Mosquitto runs with \`set_tcp_nodelay true\`:"
	echo "its default (Nagle's algorithm on) adds 15-40 ms to each delivery at low"
	echo "rates, which would flatter chatd."
	echo
	cat "$work/table.md"
	echo
	echo "Exit status of each run (0 = every connection opened and every PUBACKed"
	echo "message delivered once, in order):"
	echo
	for s in "${statuses[@]}"; do
		echo "- $s"
	done
	echo
	echo "## Commands"
	echo
	echo "\`\$TMP\` is a scratch directory; the runs that pass \`--server-cmd\` start and"
	echo "stop their own server."
	echo
	echo '```sh'
	echo "ulimit -n $nofile"
	echo "export CHATD_AUTH_SECRET=...   # any secret"
	echo "export CHATD_RECEIPTS_DELIVERED=$CHATD_RECEIPTS_DELIVERED"
	echo "export CHATD_LIMITS_PUBLISH_RATE=$CHATD_LIMITS_PUBLISH_RATE CHATD_LIMITS_PUBLISH_BYTES_RATE=$CHATD_LIMITS_PUBLISH_BYTES_RATE"
	echo "${chatd_cmd[*]//$work/\$TMP} & CHATD_PID=\$!"
	echo "CHATD_RECEIPTS_DELIVERED=true ${receipts_cmd[*]//$work/\$TMP} & CHATD_RECEIPTS_PID=\$!"
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
	if ((${#idle_sizes[@]} > 0)); then
		echo
		echo "and each \`\$TMP/mosquitto-idle-N.conf\` the same but for"
		echo "\`listener $fresh_port 127.0.0.1\` and \`persistence_location \$TMP/idle-N-mosquitto-data/\`."
	fi
	if [[ -n "$analysis" ]]; then
		echo
		printf '%s\n' "$analysis"
	fi
} >"$out"
log "wrote $out"
