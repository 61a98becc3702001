#!/usr/bin/env bash
# Builds the CPU image and runs it the way the Helm chart's CPU profile does (make image-test; docs/operations.md
# "Building and running it here"): the chart's ConfigMap and Secret as the environment, a named volume on /data,
# a read-only root with tmpfs scratch, the model prepared by `models prepare` first (the chart's init container),
# then `serve` until /readyz answers; one chat and one MCQ; SIGTERM with a chat still in flight; exit code 0 and
# the generation log's rows read back from the volume by a fresh container.
#
# Needs podman (DESIGN.md §4: runc, ulimits in /etc/containers/containers.conf) and, for the chart's settings,
# .tools/bin/helm and .venv (make setup). Where no registry answers, the base is a Debian bookworm made here by
# debootstrap (BASE_IMAGE=localhost/debian:bookworm-local, the default); elsewhere BASE_IMAGE=python:3.11-slim-bookworm.
# Where download.pytorch.org does not answer, the CPU torch wheel comes from TORCH_WHEELS (default: pip's
# find-links), with the host's CA bundle for an intercepting egress proxy.
#
#   scripts/image-test.sh                  build (cached layers reused), run, check, remove container and volume
#   KEEP=1 scripts/image-test.sh           leave the volume (and the stopped container) for a look afterwards
#   KUBE_PLAY=1 scripts/image-test.sh      also `helm template | podman kube play` the CPU profile (not Kubernetes)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/zephyr:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm-local}
VOLUME=${VOLUME:-zephyr-image-test}
NAME=${NAME:-zephyr-image-test}
PORT=${PORT:-18080}
READY_TIMEOUT=${READY_TIMEOUT:-600}
HELM=${HELM:-.tools/bin/helm}
PY=${PY:-.venv/bin/python}
KEEP=${KEEP:-0}
KUBE_PLAY=${KUBE_PLAY:-0}
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}

work=$(mktemp -d /tmp/zephyr-image-test.XXXXXX)
chmod 700 "$work"
timings=()
say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'image-test: FAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

cleanup() {
  local rc=$?
  [ -n "${curl_pid:-}" ] && kill "$curl_pid" 2>/dev/null || true
  declare -F kube_down >/dev/null && kube_down
  if [ "$KEEP" != 1 ]; then
    podman rm -f "$NAME" >/dev/null 2>&1 || true
    podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
  elif podman container exists "$NAME"; then
    echo "kept: container $NAME (podman logs $NAME), volume $VOLUME" >&2
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

command -v podman >/dev/null || die "podman is not installed (DESIGN.md §4: apt-get install -y podman buildah runc debootstrap)"
[ -x "$HELM" ] || die "$HELM is missing: make $HELM"
[ -x "$PY" ] || die "$PY is missing: make setup"

# --- the base image -------------------------------------------------------------------------------------------
if [ "$BASE_IMAGE" = localhost/debian:bookworm-local ] && ! podman image exists "$BASE_IMAGE"; then
  say "making $BASE_IMAGE with debootstrap"
  command -v debootstrap >/dev/null || die "debootstrap is not installed"
  # A missing /etc/apt/sources.list (deb822 hosts keep only sources.list.d/) makes grep fail: not an error here.
  mirror=${DEBIAN_MIRROR:-$( { grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ \
                               2>/dev/null || true; } | sed -n 1p | tr -d ' ')}
  mirror=${mirror:-http://deb.debian.org/debian}
  t=$(now)
  rootfs="$work/rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  tar -C "$rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  timings+=("base image (debootstrap + import): $(since "$t") s")
fi

# --- the build ------------------------------------------------------------------------------------------------
build_args=(--format docker --build-arg "PYTHON_IMAGE=$BASE_IMAGE")
if [ -n "$TORCH_INDEX_URL" ] && ! curl -fsS -m 10 -o /dev/null "$TORCH_INDEX_URL/torch/" 2>/dev/null; then
  # PyTorch's index does not answer: give pip the wheel and the host's CA bundle through a pip.conf on /mnt
  # (a folder every Debian image has, so the bind mount leaves nothing behind in the layers).
  wheels=${TORCH_WHEELS:-${PIP_FIND_LINKS:-$(pip3 config get global.find-links 2>/dev/null || true)}}
  wheel=$(ls "$wheels"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n1 || true)
  [ -n "$wheel" ] || die "$TORCH_INDEX_URL does not answer and no torch-2.13.0+cpu cp311 wheel is in TORCH_WHEELS='$wheels'"
  mkdir -p "$work/mnt/wheels"
  ln "$wheel" "$work/mnt/wheels/" 2>/dev/null || cp "$wheel" "$work/mnt/wheels/"
  {
    echo "[global]"
    echo "find-links = /mnt/wheels"
    [ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$work/mnt/ca.crt" \
      && echo "cert = /mnt/ca.crt"
  } >"$work/mnt/pip.conf"
  chmod -R a+rX "$work/mnt"
  chmod a+x "$work"
  build_args+=(--build-arg TORCH_INDEX_URL= --build-arg PIP_CONFIG_FILE=/mnt/pip.conf -v "$work/mnt:/mnt:ro")
  echo "torch from $wheel (download.pytorch.org does not answer)" >&2
fi
say "building $IMAGE from $BASE_IMAGE"
t=$(now)
podman build "${build_args[@]}" -t "$IMAGE" . >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; die "build failed"; }
timings+=("build: $(since "$t") s ($(grep -c -- '--> Using cache' "$work/build.log" || true) cached steps)")
size=$(podman image inspect -f '{{.Size}}' "$IMAGE")
timings+=("image size: $(python3 -c "print(f'{$size / 1e9:.2f} GB')")")

# --- the chart's settings -------------------------------------------------------------------------------------
say "rendering the chart's CPU profile into the container's environment"
student_key="student-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
"$HELM" template zephyr helm/zephyr -f helm/zephyr/values-cpu.yaml \
  --set "secrets.apiKeys=student:$student_key" >"$work/chart.yaml"
"$PY" - "$work/chart.yaml" >"$work/env" <<'EOF'
import sys

import yaml

env = {}
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc:
        continue
    if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "zephyr":
        env.update(doc["data"])
    elif doc["kind"] == "Secret":
        env.update(doc.get("stringData") or {})
    elif doc["kind"] == "Deployment":
        for var in doc["spec"]["template"]["spec"]["containers"][0].get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
for name, value in env.items():
    print(f"{name}={value}")
EOF
chmod 600 "$work/env"
grep -q '^ZEPHYR_API_KEYS=' "$work/env" || die "the chart rendered no ZEPHYR_API_KEYS"

# As the chart runs it: read-only root, scratch on tmpfs (the chart's emptyDirs), the registry on the volume.
podman rm -f "$NAME" >/dev/null 2>&1 || true
podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
podman volume create "$VOLUME" >/dev/null
run_args=(--read-only --tmpfs /tmp --tmpfs /home/zephyr/.cache --shm-size 1g -v "$VOLUME:/data"
          --env-file "$work/env" --health-interval disable)

say "models prepare (the chart's init container)"
t=$(now)
podman run --rm "${run_args[@]}" "$IMAGE" models prepare >"$work/prepare.log" 2>&1 \
  || { tail -30 "$work/prepare.log" >&2; die "models prepare failed"; }
timings+=("models prepare: $(since "$t") s")

say "serve, waiting for /readyz"
t=$(now)
podman run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" "${run_args[@]}" "$IMAGE" >/dev/null
base="http://127.0.0.1:$PORT"
deadline=$(( $(date +%s) + READY_TIMEOUT ))
until [ "$(curl -s -m 5 -o /dev/null -w '%{http_code}' "$base/readyz")" = 200 ]; do
  [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] \
    || { podman logs "$NAME" 2>&1 | tail -40 >&2; die "the server exited before it was ready"; }
  [ "$(date +%s)" -lt "$deadline" ] || { podman logs "$NAME" 2>&1 | tail -40 >&2; die "not ready in ${READY_TIMEOUT}s"; }
  sleep 1
done
timings+=("start to ready: $(since "$t") s")
podman healthcheck run "$NAME" >/dev/null || die "the image's HEALTHCHECK failed"

post() {  # post PATH JSON OUTFILE: prints the status code
  curl -s -m 300 -o "$3" -w '%{http_code}' "$base$1" -H "authorization: Bearer $student_key" \
    -H 'content-type: application/json' -d "$2"
}
say "one chat, one MCQ"
t=$(now)
code=$(post /v1/chat/completions \
  '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 32}' \
  "$work/chat.json")
[ "$code" = 200 ] || { cat "$work/chat.json" >&2; die "chat answered $code"; }
"$PY" -c "import json, sys; c = json.load(open(sys.argv[1]))['choices'][0]['message']['content']; assert c.strip(), 'empty'; print('chat:', c[:100])" \
  "$work/chat.json" || die "chat answer has no content"
timings+=("chat (32 tokens): $(since "$t") s")
t=$(now)
code=$(post /mcq \
  '{"question": "Which gas do plants take in for photosynthesis?", "options": ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"]}' \
  "$work/mcq.json")
[ "$code" = 200 ] || { cat "$work/mcq.json" >&2; die "mcq answered $code"; }
"$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); assert r['answer'] in 'ABCD', r; print('mcq:', r['answer'], r['option'])" \
  "$work/mcq.json" || die "mcq answer is not a letter"
timings+=("mcq: $(since "$t") s")

say "SIGTERM with a chat in flight"
post /v1/chat/completions \
  '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Explain how a rainbow forms."}], "max_tokens": 96}' \
  "$work/inflight.json" >"$work/inflight.code" &
curl_pid=$!
# SIGTERM once the chat is generating (its first token out), not after a guessed second: on a busy host it may not
# have arrived yet (a refused connection), or have finished already (no drain to test).
generating=
for _ in $(seq 600); do
  # captured first: under pipefail, grep -q leaving early would fail curl's write, and the match with it
  if metrics=$(curl -s -m 2 "$base/metrics") && grep -q '^zephyr_requests_running [1-9]' <<<"$metrics"; then
    generating=1
    break
  fi
  sleep 0.1
done
[ -n "$generating" ] || die "the chat in flight never started generating"
t=$(now)
podman kill --signal TERM "$NAME" >/dev/null
exit_code=$(timeout 120 podman wait "$NAME") || die "the container did not stop within 120 s of SIGTERM"
timings+=("SIGTERM to exit: $(since "$t") s")
wait "$curl_pid" || true
curl_pid=
[ "$exit_code" = 0 ] || { podman logs "$NAME" 2>&1 | tail -30 >&2; die "exit code $exit_code after SIGTERM"; }
[ "$(cat "$work/inflight.code")" = 200 ] || die "the chat in flight at SIGTERM got $(cat "$work/inflight.code"), not 200"
echo "exit code 0; the chat in flight at SIGTERM was answered (200)" >&2

say "the generation log, read from the volume by a fresh container"
podman run --rm --health-cmd none -v "$VOLUME:/data" --entrypoint python "$IMAGE" -c '
import sqlite3
db = sqlite3.connect("file:/data/zephyr.db?mode=ro", uri=True)
rows = db.execute("SELECT route, status, count(*) FROM generations WHERE purpose = ? GROUP BY route, status",
                  ("served",)).fetchall()
print("generations:", rows)
counts = {(route, status): n for route, status, n in rows}
assert counts.get(("chat", "ok"), 0) >= 2, "want both chats logged ok"
assert counts.get(("mcq", "ok"), 0) >= 1, "want the MCQ logged ok"
' || die "the generation log on the volume lacks the requests"

# --- helm template | podman kube play (optional) --------------------------------------------------------------
# Not Kubernetes: podman runs the Deployment's pod (init container, env from the ConfigMap and Secret, the PVC as a
# volume, the securityContext) and ignores the Service, PDB and ServiceAccount; no probes, no rolling update, no
# preStop hook, no resource limits enforced by a kubelet. Two podman 4.3 bugs are worked around on the rendered
# YAML: a Secret it stores is then unreadable by secretKeyRef (podman#16269), so the Secret becomes a podman secret
# holding base64 JSON; and init containers inherit the pod's restartPolicy Always, so `models prepare` would run
# in a loop (fixed in podman by #18481), so the pod gets OnFailure. And podman makes each emptyDir a named volume
# (named as in the pod, so prefixed here) that takes the mode of the image's folder: /dev/shm would be root 0755,
# where Kubernetes gives 0777, and podman's own /dev/shm is 64 MB where vLLM needs 160 MiB, so the shm emptyDir
# becomes a hostPath folder (mode 1777) under this run's scratch folder.
if [ "$KUBE_PLAY" = 1 ]; then
  say "helm template (CPU profile) | podman kube play"
  podman rm -f "$NAME" >/dev/null 2>&1 || true
  release=zephyr-image-kube  # holds the chart's name, so every object (pod, volume, secret) is named this
  "$HELM" template "$release" helm/zephyr -f helm/zephyr/values-cpu.yaml --set "secrets.apiKeys=student:$student_key" \
    --set "image.repository=${IMAGE%:*},image.tag=${IMAGE##*:},image.pullPolicy=Never" >"$work/kube-chart.yaml"
  "$PY" -c '
import base64, json, sys
import yaml
docs = [doc for doc in yaml.safe_load_all(open(sys.argv[1])) if doc]
secret = next(doc for doc in docs if doc["kind"] == "Secret")
json.dump({k: base64.b64encode(v.encode()).decode() for k, v in secret["stringData"].items()}, open(sys.argv[3], "w"))
for doc in docs:
    if doc["kind"] == "Deployment":
        pod = doc["spec"]["template"]["spec"]
        pod["restartPolicy"] = "OnFailure"
        empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v} - {"shm"}
        for v in pod["volumes"]:
            if v["name"] == "shm":
                v.pop("emptyDir")
                v["hostPath"] = {"path": sys.argv[5], "type": "Directory"}
            elif v["name"] in empty:
                v["name"] = sys.argv[4] + "-" + v["name"]
        for c in pod["containers"] + pod.get("initContainers", []):
            for m in c["volumeMounts"]:
                if m["name"] in empty:
                    m["name"] = sys.argv[4] + "-" + m["name"]
yaml.safe_dump_all([doc for doc in docs if doc["kind"] != "Secret"], open(sys.argv[2], "w"))
' "$work/kube-chart.yaml" "$work/kube.yaml" "$work/kube-secret.json" "$release" "$work/shm"
  mkdir -m 1777 "$work/shm"
  chmod 600 "$work/kube-secret.json"
  kube_down() {
    podman kube down "$work/kube.yaml" >/dev/null 2>&1 || true
    podman secret rm "$release" >/dev/null 2>&1 || true
    podman volume rm -f "$release-tmp" "$release-cache" >/dev/null 2>&1 || true
    [ "$KEEP" = 1 ] || podman volume rm -f "$release" >/dev/null 2>&1 || true
  }
  kube_down
  podman volume rm -f "$release" >/dev/null 2>&1 || true  # kube play will not reuse a volume for the PVC
  podman secret create "$release" "$work/kube-secret.json" >/dev/null
  t=$(now)
  # kube play returns once the init container (models prepare) has finished and the server container started.
  podman kube play "$work/kube.yaml" >"$work/kube.log" 2>&1 || { cat "$work/kube.log" >&2; kube_down; die "kube play failed"; }
  timings+=("kube play (init container: models prepare): $(since "$t") s")
  ctr="$release-pod-0-zephyr"
  # No published port (the chart has a Service, not a hostPort): ask from inside the container.
  in_pod() {
    podman exec -e "KEY=$student_key" "$ctr" python -c '
import os, sys, urllib.request
req = urllib.request.Request("http://127.0.0.1:8000" + sys.argv[1], data=sys.argv[2].encode() or None,
                             headers={"authorization": "Bearer " + os.environ["KEY"], "content-type": "application/json"})
print(urllib.request.urlopen(req, timeout=300).read().decode())' "$@"
  }
  t=$(now)
  deadline=$(( $(date +%s) + READY_TIMEOUT ))
  until in_pod /readyz "" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { podman logs "$ctr" 2>&1 | tail -40 >&2; kube_down; die "kube play: not ready"; }
    sleep 2
  done
  timings+=("kube play: server start to ready: $(since "$t") s")
  in_pod /mcq '{"question": "Is ice frozen water?", "options": ["Yes", "No"]}' >"$work/kube-mcq.json" \
    || { kube_down; die "kube play: /mcq failed"; }
  echo "kube play: mcq $(head -c 120 "$work/kube-mcq.json")" >&2
  ro_user=$(podman inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}' "$ctr")
  [ "$ro_user" = "true 10001:10001" ] || { kube_down; die "kube play: read-only root and user are '$ro_user'"; }
  kube_down
fi

say "PASS"
printf '  %s\n' "${timings[@]}" >&2
