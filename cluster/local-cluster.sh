#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: one head plus N worker nodes, each its own
# `ray start --block` process in its own session, with token authentication ON.
#
#   cluster/local-cluster.sh up [--workers N] [--dir DIR]   # start (safe to re-run)
#   cluster/local-cluster.sh status [--dir DIR]             # nodes and their resources
#   cluster/local-cluster.sh down [--dir DIR]               # stop exactly what `up` started
#
# After `up`, in the shell that submits jobs:
#   source DIR/env.sh        # RAY_ADDRESS=http://127.0.0.1:<dashboard>, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
#   ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- kesi run configs/kesi/quickstart.yaml
#   python -c 'import ray; ray.init(address="<gcs address>")'   # a driver uses the GCS address
#
# Layout of DIR (default /tmp/kesi-cluster-$UID; keep it short, Ray's unix sockets live under it):
#   auth_token   the cluster's token (mode 600; reused by a later `up` so exports stay valid)
#   state.json   pids, session ids, start times, GCS address, dashboard URL (written atomically)
#   env.sh       the exports above;   logs/   one log per `ray start`
#   ray/, r1/, r2/...   Ray's --temp-dir of the head and of each worker node
#
# Why it is built this way (Ray 2.60):
# - `ray stop` kills every Ray process on the machine, other people's included, so `down` signals
#   only the recorded `ray start --block` leaders (each shuts down its gcs_server/raylet/dashboard/
#   workers) and then sweeps whatever is left in their sessions.
# - Every port is chosen free at `up`: the defaults (6379, 8265, 10001, 52365 for every node's
#   dashboard agent) would collide between the nodes and with any other local Ray. Worker ports are
#   OS-assigned (--min/--max-worker-port 0). Nodes are started one after another: two raylets
#   starting at once in one session race for the same plasma socket name and one aborts.
# - The dashboard and the Ray client server listen on 127.0.0.1 only. Ray rewrites a node IP of
#   127.0.0.1 to the machine's address and its C++ gRPC servers (GCS, raylet, object manager) listen
#   on all interfaces; the token is what guards them.
# - Token auth: `ray start --head` only turns it on when RAY_AUTH_MODE=token (or a token already
#   exists), so every ray process here runs with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=DIR/auth_token
#   (RAY_AUTH_TOKEN, which would take precedence, is unset for them). Clients need the same two
#   variables (or RAY_AUTH_TOKEN=<token>); ~/.ray/auth_token is Ray's fallback and is not touched.
#
# Environment: RAY=/path/to/ray (default: this repo's .venv/bin/ray, else `ray` on PATH);
# KESI_CLUSTER_OBJECT_STORE_MB (default 512 per node); KESI_CLUSTER_START_TIMEOUT (default 120 s per node);
# KESI_CLUSTER_WORKER_GPUS (default 0: GPUs each worker node declares; Ray would otherwise give every
# node on this machine all of its GPUs).
set -euo pipefail

usage() {
  echo "usage: $0 up|down|status [--workers N] [--dir DIR]" >&2
  exit 2
}
die() { echo "local-cluster: error: $*" >&2; exit 1; }
log() { echo "local-cluster: $*" >&2; }

cmd=${1:-}; [ -n "$cmd" ] || usage; shift
workers=2
dir=${KESI_CLUSTER_DIR:-/tmp/kesi-cluster-$(id -u)}
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) [ $# -ge 2 ] || usage; workers=$2; shift 2 ;;
    --workers=*) workers=${1#*=}; shift ;;
    --dir) [ $# -ge 2 ] || usage; dir=$2; shift 2 ;;
    --dir=*) dir=${1#*=}; shift ;;
    -h|--help) usage ;;
    *) echo "local-cluster: unknown argument $1" >&2; usage ;;
  esac
done
[[ "$workers" =~ ^[0-9]+$ ]] && [ "$workers" -ge 1 ] && [ "$workers" -le 16 ] \
  || { echo "local-cluster: --workers must be an integer in 1..16, got '$workers'" >&2; exit 2; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

here=$(cd "$(dirname "$0")" && pwd)
if [ -n "${RAY:-}" ]; then ray_bin=$RAY
elif [ -x "$here/../.venv/bin/ray" ]; then ray_bin=$(cd "$here/../.venv/bin" && pwd)/ray
else ray_bin=$(command -v ray) || die "no 'ray' found: install ray[default] or set RAY=/path/to/ray"
fi
py=$(dirname "$ray_bin")/python
[ -x "$py" ] || py=$(command -v python3)

token=$dir/auth_token
state=$dir/state.json
envfile=$dir/env.sh
tmpdir=$dir/ray
logdir=$dir/logs
obj_mb=${KESI_CLUSTER_OBJECT_STORE_MB:-512}
start_timeout=${KESI_CLUSTER_START_TIMEOUT:-120}
worker_gpus=${KESI_CLUSTER_WORKER_GPUS:-0}

# The environment every ray process (and the jobs they run) inherits: token auth on, our token,
# and ray's bin dir first on PATH so a job's `python` / `kesi` entrypoint is the one that has ray.
ray_env=(env -u RAY_AUTH_TOKEN -u RAY_ADDRESS -u RAY_API_SERVER_ADDRESS
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token" RAY_USAGE_STATS_ENABLED=0
  PATH="$(dirname "$ray_bin"):$PATH")

# Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat); empty if gone.
start_time() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  s=${s##*) }            # drop "pid (comm) ", comm may contain spaces
  set -- $s
  echo "${20}"
}

# state.json -> "pid sid starttime name" lines (the one reader of the state file).
read_nodes() {
  "$py" - "$state" <<'EOF'
import json, sys
for n in json.load(open(sys.argv[1]))["nodes"]:
    print(n["pid"], n["sid"], n["start_time"], n["name"])
EOF
}
state_field() {
  "$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$state" "$1"
}

# PIDs of live processes in session SID that started no earlier than its leader (guards pid reuse).
session_pids() {
  local sid=$1 t0=$2 pid s t
  ps -eo pid=,sid= | while read -r pid s; do
    [ "$s" = "$sid" ] || continue
    t=$(start_time "$pid"); [ -n "$t" ] || continue
    [ "$t" -ge "$t0" ] && echo "$pid"
  done
  return 0
}

leader_alive() {  # pid starttime
  local t; t=$(start_time "$1")
  [ -n "$t" ] && [ "$t" = "$2" ]
}

all_alive() {
  [ -f "$state" ] || return 1
  local pid sid t0 name
  while read -r pid sid t0 name; do
    leader_alive "$pid" "$t0" || return 1
  done < <(read_nodes)
}

print_exports() {
  local gcs dash
  gcs=$(state_field gcs_address); dash=$(state_field dashboard_url)
  cat <<EOF
Ray cluster up: head + $(($(read_nodes | wc -l) - 1)) worker nodes (state: $state)
  GCS address (ray.init, ray start --address, kesi cluster.address): $gcs
  dashboard / job API: $dash
To submit jobs from a shell, run these exports (or: source $envfile):
  export RAY_ADDRESS=$dash
  export RAY_AUTH_MODE=token                     # clients send a token only in token mode
  export RAY_AUTH_TOKEN_PATH=$token   # read when RAY_AUTH_TOKEN is unset
  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python your_script.py
EOF
}

cmd_down() {
  if [ ! -f "$state" ] && [ ! -s "$dir/starting.pid" ]; then
    log "nothing recorded in $state; nothing to stop"; return 0
  fi
  local pid sid t0 name left deadline
  local -a sids=() t0s=()
  if [ -f "$state" ]; then
    # Workers first, head last, so worker raylets do not spin reconnecting to a dead GCS.
    while read -r pid sid t0 name; do
      sids+=("$sid"); t0s+=("$t0")
      if leader_alive "$pid" "$t0"; then
        [ "$name" = head ] || kill -TERM "$pid" 2>/dev/null || true
      fi
    done < <(read_nodes)
    while read -r pid sid t0 name; do
      [ "$name" = head ] && leader_alive "$pid" "$t0" && { sleep 1; kill -TERM "$pid" 2>/dev/null || true; }
    done < <(read_nodes)
  fi
  # A node an `up` killed with SIGKILL was still starting: stop it if it is still ours.
  if [ -s "$dir/starting.pid" ]; then
    read -r pid name <"$dir/starting.pid"
    t0=$(start_time "$pid")
    if [ -n "$t0" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--temp-dir $(node_tmp "$name") " \
        && [ "$(ps -o sid= -p "$pid" | tr -d ' ')" = "$pid" ]; then
      sids+=("$pid"); t0s+=("$t0")
      kill -TERM "$pid" 2>/dev/null || true
    fi
  fi
  remaining() {
    local i
    for i in "${!sids[@]}"; do session_pids "${sids[$i]}" "${t0s[$i]}"; done
  }
  deadline=$((SECONDS + 30))
  while left=$(remaining) && [ -n "$left" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  if [ -n "$left" ]; then
    log "still running after SIGTERM, sending SIGKILL: $(echo $left)"
    kill -KILL $left 2>/dev/null || true
    deadline=$((SECONDS + 15))
    while left=$(remaining) && [ -n "$left" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
    [ -z "$left" ] || die "processes survived SIGKILL: $(echo $left)"
  fi
  rm -f "$state" "$envfile" "$dir/starting.pid"
  log "stopped (logs kept in $logdir)"
}

# Free TCP ports on 127.0.0.1, all held open at once so they are distinct.
free_ports() {
  "$py" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Ray's --temp-dir of a node: DIR/ray for the head, DIR/rN for workerN. One per node, as on separate
# machines: nodes sharing one would share runtime_resources/, and a worker node's runtime-env agent
# would delete a job's unpacked working_dir (the driver's cwd on the head) once its tasks there end.
node_tmp() {
  if [ "$1" = head ]; then echo "$tmpdir"; else echo "$dir/r${1#worker}"; fi
}

# Start one `ray start --block` in a new session; sets node_info="pid sid starttime".
# Runs in the main shell (not in $(...)) so an INT/TERM trap fires at once, not after the node is up.
start_node() {
  local name=$1; shift
  local logf=$logdir/$name.log pid sid t deadline
  : >"$logf"
  # A plain command (no function, no subshell) so $! is the pid that setsid makes a session leader.
  "${ray_env[@]}" setsid "$ray_bin" start --block --disable-usage-stats --temp-dir "$(node_tmp "$name")" \
    --object-store-memory $((obj_mb * 1024 * 1024)) --min-worker-port 0 --max-worker-port 0 \
    "$@" </dev/null >>"$logf" 2>&1 &
  pid=$!
  echo "$pid $name" >"$dir/starting.pid"   # so an interrupted or failed `up` can stop it too
  deadline=$((SECONDS + start_timeout))
  until grep -q "Ray runtime started" "$logf"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 15 "$logf" >&2
      log "error: node '$name' exited during start; full log: $logf"
      return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      tail -n 15 "$logf" >&2
      log "error: node '$name' not up after ${start_timeout}s; full log: $logf"
      return 1
    fi
    sleep 0.5
  done
  sid=$(ps -o sid= -p "$pid" | tr -d ' ')
  if [ "$sid" != "$pid" ]; then log "error: node '$name' (pid $pid) is not a session leader"; return 1; fi
  t=$(start_time "$pid")
  node_info="$pid $sid $t"
}

# `up` failed or was interrupted: record every node that was started, then stop them all.
nodes=()
abort_up() {
  trap - INT TERM
  local extra=() spid sname t
  if [ -s "$dir/starting.pid" ]; then
    read -r spid sname <"$dir/starting.pid"
    t=$(start_time "$spid")
    [[ -z "$t" || " ${nodes[*]} " == *" $spid $spid "* ]] || extra=("$sname $spid $spid $t")
  fi
  rm -f "$dir/starting.pid"
  if [ $((${#nodes[@]} + ${#extra[@]})) -gt 0 ]; then
    write_state "" "" "${nodes[@]}" "${extra[@]}"
    cmd_down
  fi
  exit "${1:-1}"
}

cmd_up() {
  if [ -f "$state" ]; then
    if all_alive; then
      local have; have=$(($(read_nodes | wc -l) - 1))
      if [ "$have" != "$workers" ]; then
        echo "local-cluster: already up with $have workers (asked for $workers): run '$0 down --dir $dir' first" >&2
        exit 2
      fi
      log "already up"
      print_exports
      return 0
    fi
    log "a previous cluster in $dir is partly dead; stopping what is left of it"
    cmd_down
  fi
  # Unix socket paths are limited to 107 bytes: DIR/ray/session_<date>_<pid>/sockets/plasma_store.N
  [ ${#tmpdir} -le 40 ] || die "--dir $dir is too long for Ray's unix sockets (keep it under ~36 characters, e.g. /tmp/kc)"
  mkdir -p "$logdir" "$tmpdir"
  chmod 700 "$dir"
  if [ ! -s "$token" ]; then
    (umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$token.tmp" && mv "$token.tmp" "$token")
  fi

  local ports gcs_port dash_port client_port
  read -r -a ports <<<"$(free_ports $((3 + workers + 1)))"
  gcs_port=${ports[0]}; dash_port=${ports[1]}; client_port=${ports[2]}

  local gcs i dash="http://127.0.0.1:$dash_port"
  trap 'abort_up 130' INT TERM
  start_node head --head --port "$gcs_port" --num-cpus 0 --num-gpus 0 \
    --resources '{"kesi_head": 1}' \
    --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" --ray-client-server-port "$client_port" \
    --dashboard-agent-listen-port "${ports[3]}" || abort_up 1
  nodes+=("head $node_info")
  gcs=$(cat "$tmpdir/ray_current_cluster")
  write_state "$gcs" "$dash" "${nodes[@]}"   # after every node: `down` can always clean up
  rm -f "$dir/starting.pid"
  for i in $(seq 1 "$workers"); do
    start_node "worker$i" --address "$gcs" --num-cpus 1 --num-gpus "$worker_gpus" \
      --resources "{\"kesi_worker_$i\": 1}" --dashboard-agent-listen-port "${ports[$((3 + i))]}" \
      || abort_up 1
    nodes+=("worker$i $node_info")
    write_state "$gcs" "$dash" "${nodes[@]}"
    rm -f "$dir/starting.pid"
  done
  trap - INT TERM
  print_exports
}

write_state() {
  local gcs=$1 dash=$2; shift 2
  "$py" - "$state" "$dir" "$token" "$tmpdir" "$gcs" "$dash" "$@" <<'EOF'
import json, os, sys
state, d, token, tmpdir, gcs, dash, *nodes = sys.argv[1:]
rows = []
for n in nodes:
    name, pid, sid, t0 = n.split()
    rows.append({"name": name, "pid": int(pid), "sid": int(sid), "start_time": int(t0)})
doc = {"dir": d, "gcs_address": gcs, "dashboard_url": dash, "token_path": token,
       "temp_dir": tmpdir, "nodes": rows}
for path, text in ((state, json.dumps(doc, indent=2) + "\n"),
                   (os.path.join(d, "env.sh"),
                    f"# source me: job submission to the local cluster in {d}\n"
                    f"export RAY_ADDRESS={dash}\nexport RAY_AUTH_MODE=token\n"
                    f"export RAY_AUTH_TOKEN_PATH={token}\nunset RAY_AUTH_TOKEN\n")):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
EOF
}

cmd_status() {
  if [ ! -f "$state" ]; then echo "not running (no $state)"; exit 1; fi
  local pid sid t0 name ok=1
  while read -r pid sid t0 name; do
    if leader_alive "$pid" "$t0"; then echo "$name: running (pid $pid)"
    else echo "$name: NOT running (pid $pid)"; ok=0
    fi
  done < <(read_nodes)
  [ $ok = 1 ] || { echo "cluster is partly down: run '$0 down --dir $dir' then up"; exit 1; }
  echo "GCS address: $(state_field gcs_address)   dashboard: $(state_field dashboard_url)"
  # The state API reads the GCS directly (`ray status` lags a few seconds behind new nodes).
  "${ray_env[@]}" "$ray_bin" list nodes --detail --address "$(state_field dashboard_url)"
}

case "$cmd" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) usage ;;
esac
