#!/usr/bin/env bash
# Copies the Reranker CRD (crds/) into the Helm chart, which installs it from its own crds/ folder
# (Helm installs chart CRDs before templates and keeps them on uninstall). The two files must stay
# identical; tests/chart/test_chart.py fails when they drift.
#
#   scripts/sync-crd.sh           copy crds/ -> charts/reranker-operator/crds/
#   scripts/sync-crd.sh --check   exit 1 (and show the diff) when the copies differ
set -euo pipefail
cd "$(dirname "$0")/.."

src=crds/rerankers.reranker.dev.yaml
dst=charts/reranker-operator/crds/rerankers.reranker.dev.yaml

if [ "${1:-}" = "--check" ]; then
  if ! diff -u "$src" "$dst"; then
    echo "$dst differs from $src: run scripts/sync-crd.sh" >&2
    exit 1
  fi
  exit 0
fi

mkdir -p "$(dirname "$dst")"
cp "$src" "$dst"
echo "synced $src -> $dst"
