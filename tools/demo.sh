#!/usr/bin/env bash
# `make demo`: lab in local mode ("your device is the first coordinator") on a throwaway LAB_HOME.
# Nothing outside a temporary directory is touched; no root, no network.
set -euo pipefail
export LAB_HOME="${LAB_HOME:-$(mktemp -d /tmp/lab-demo.XXXXXX)}"
export NO_COLOR="${NO_COLOR:-}"
unset LAB_DEFINITIONS
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "LAB_HOME=$LAB_HOME"
step lab init --local
lab server add worker-5 --provider aws --labels k8s-worker,production,eu-west --environment prod --region eu-west >/dev/null
lab server add batch-worker-1 --provider aws --labels k8s-worker --environment prod --region eu-west >/dev/null
lab server add test-box-1 --provider ssh --labels k8s-worker,experimental --environment dev --region eu-west >/dev/null
lab server add db-1 --provider baremetal --labels postgres,production,eu-west --environment prod --region eu-west >/dev/null
lab server add db-2 --provider baremetal --labels postgres --environment prod --region eu-west >/dev/null
lab server add mail-1 --provider xcpng --labels mailserver,production --environment prod --region eu-west >/dev/null
lab server add mail-2 --provider aws --labels mailserver --environment prod --region us-east >/dev/null
lab server add api-1 --provider aws --labels app,production,eu-west --environment prod --region eu-west >/dev/null
lab server add stage-api --provider aws --labels app --environment staging --region eu-west >/dev/null
echo "(registered 9 servers with lab server add)"
step lab get servers
step lab get servers --label k8s-worker --environment prod --exclude batch-worker-1
step lab show server worker-5
step lab show label mailserver
step lab show group eu-infrastructure
step lab show alert memory_pressure
step lab targets server db-1
step lab get secrets --label k8s-worker
step lab show server db-1 -o json
echo
echo "Definitions live in $LAB_HOME/definitions: edit them and run the commands again."
echo "A mistake there is reported as file:line, e.g.:"
printf 'labels:\n  broken:\n    ports: [443, 70000]\n' > "$LAB_HOME/definitions/zz-broken.yaml"
lab validate || true
rm "$LAB_HOME/definitions/zz-broken.yaml"

# -- A local cluster: real processes on 127.0.0.1 (docs/CLUSTER.md) ------------------------------
CLUSTER_DIR="$(mktemp -d /tmp/lab-cluster-demo.XXXXXX)/c"
trap 'lab cluster down --dir "$CLUSTER_DIR" >/dev/null 2>&1 || true' EXIT
echo
echo "Now a cluster on this machine: a coordinator, 2 stores and 2 agents, each its own process and home."
step lab cluster up --dir "$CLUSTER_DIR" --stores 2 --agent web-1=app,production --agent db-1=postgres,production
printf '\n\033[1m$ printf %%s "correct horse battery staple" | LAB_HOME=%s lab secret set postgres/master-password\033[0m\n' "$CLUSTER_DIR/coordinator"
printf %s "correct horse battery staple" | LAB_HOME="$CLUSTER_DIR/coordinator" lab secret set postgres/master-password
for _ in $(seq 1 100); do  # delivery is a push from the stores: wait for it, at most 10 s
  LAB_HOME="$CLUSTER_DIR/db-1" lab secret get postgres/master-password >/dev/null 2>&1 && break
  sleep 0.1
done
printf '\n\033[1m$ LAB_HOME=%s lab secret get postgres/master-password\033[0m   # db-1 is labelled postgres\n' "$CLUSTER_DIR/db-1"
LAB_HOME="$CLUSTER_DIR/db-1" lab secret get postgres/master-password; echo
printf '\n\033[1m$ LAB_HOME=%s lab secret get postgres/master-password\033[0m   # web-1 is not\n' "$CLUSTER_DIR/web-1"
if LAB_HOME="$CLUSTER_DIR/web-1" lab secret get postgres/master-password; then
  echo "unexpected: web-1 got the secret" >&2; exit 1
else
  echo "(refused, exit status $?)"
fi
printf '\n\033[1m$ LAB_HOME=%s lab get servers\033[0m\n' "$CLUSTER_DIR/coordinator"
LAB_HOME="$CLUSTER_DIR/coordinator" lab get servers
step lab cluster status --dir "$CLUSTER_DIR"
echo
echo "(to keep a cluster running, start one yourself and stop it with: lab cluster down --dir DIR)"
step lab cluster down --dir "$CLUSTER_DIR"
