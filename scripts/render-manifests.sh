#!/usr/bin/env bash
# Renders the plain manifests (deploy/kubernetes/, one file per chart template) from the Helm
# chart with its default values: `kubectl apply -f deploy/kubernetes/` installs what
# `helm install` would, minus what needs the snapshot CRDs. Edit the chart, then run this.
#   scripts/render-manifests.sh [OUT_DIR]      (default deploy/kubernetes)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-deploy/kubernetes}
helm=${HELM:-}
if [ -z "$helm" ]; then
  if [ -x .venv/bin/helm ]; then helm=.venv/bin/helm; else helm=helm; fi
fi
rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
"$helm" template lanes deploy/helm/lanes --namespace lanes-system --set createNamespace=true --include-crds >"$rendered"
mkdir -p "$out"
rm -f "$out"/*.yaml
# Each document starts with `---` and `# Source: lanes/templates/FILE` (or lanes/crds/FILE);
# documents of one template go to deploy/kubernetes/FILE (a CRD to 00-crd-FILE, applied
# first), in the order Helm would apply them.
awk -v out="$out" '
  /^---$/ { pending = 1; next }
  pending && /^# Source: lanes\/crds\// {
    file = out "/00-crd-" substr($0, length("# Source: lanes/crds/") + 1)
  }
  pending && /^# Source: lanes\/templates\// {
    file = out "/" substr($0, length("# Source: lanes/templates/") + 1)
  }
  pending && /^# Source: lanes\/(crds|templates)\// {
    if (!(file in seen)) {
      seen[file] = 1
      print "# Rendered from deploy/helm/lanes by scripts/render-manifests.sh: edit the chart." > file
    }
    print "---" > file
    pending = 0
    next
  }
  { print > file }
' "$rendered"
