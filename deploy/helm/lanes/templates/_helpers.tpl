{{/* Labels of every object; a component's pods are selected by name + component. */}}
{{- define "lanes.labels" -}}
app.kubernetes.io/name: lanes
app.kubernetes.io/component: {{ . }}
{{- end }}

{{- define "lanes.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{/* "true" when a profile of the config is on lane `.lane` (dict: root, lane). */}}
{{- define "lanes.hasLane" -}}
{{- $found := false }}
{{- range $name, $profile := .root.Values.config.profiles }}
{{- if eq (toString $profile.lane) $.lane }}{{ $found = true }}{{ end }}
{{- end }}
{{- $found }}
{{- end }}

{{/* "true" when the lane is node-local: provisioned by each node's plugin. */}}
{{- define "lanes.nodeLocal" -}}
{{- has (toString .) (list "local" "fast-rwo") }}
{{- end }}

{{/* The Secrets the config's dataset buckets name (credentials: {secretName}), one per line. */}}
{{- define "lanes.credentialSecrets" -}}
{{- $datasets := .Values.config.datasets | default dict }}
{{- range $name, $bucket := ($datasets.buckets | default dict) }}
{{- with $bucket.credentials }}{{ with .secretName }}
{{ . }}
{{- end }}{{ end }}
{{- end }}
{{- end }}

{{/* The downward-API environment every Lanes container gets. */}}
{{- define "lanes.podEnv" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{/* Cluster-wide rules of csi-provisioner and csi-resizer (both roles run them). */}}
{{- define "lanes.sidecarRules" -}}
- apiGroups: [""]
  resources: ["persistentvolumes"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "update"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims/status"]
  verbs: ["patch"]
- apiGroups: ["storage.k8s.io"]
  resources: ["storageclasses", "csinodes"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["nodes", "pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["list", "watch", "create", "update", "patch"]
- apiGroups: ["storage.k8s.io"]
  resources: ["volumeattachments"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* "true" when snapshots are on: asked for, or (auto) the cluster has the snapshot API. */}}
{{- define "lanes.snapshots" -}}
{{- $asked := toString .Values.snapshots.enabled }}
{{- if eq $asked "auto" }}
{{- .Capabilities.APIVersions.Has "snapshot.storage.k8s.io/v1" }}
{{- else }}
{{- eq $asked "true" }}
{{- end }}
{{- end }}
