{{/*
Chart name, truncated to a DNS label.
*/}}
{{- define "reranker-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: "<release>-<chart>", or the release name when it already contains the chart name.
*/}}
{{- define "reranker-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value.
*/}}
{{- define "reranker-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "reranker-operator.labels" -}}
helm.sh/chart: {{ include "reranker-operator.chart" . }}
{{ include "reranker-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: reranker-stack
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels of the operator pod.
*/}}
{{- define "reranker-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reranker-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "reranker-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "reranker-operator.fullname" .) .Values.serviceAccount.name }}
{{- else if .Values.serviceAccount.name }}
{{- .Values.serviceAccount.name }}
{{- else }}
{{- /* Never fall back to the namespace's "default" ServiceAccount: every pod of the namespace
runs as it, and the operator's RBAC (cluster-wide by default) would be bound to it. */}}
{{- fail "serviceAccount.create is false and serviceAccount.name is empty: set serviceAccount.name to the existing ServiceAccount the operator runs as (the chart does not fall back to the namespace's \"default\" ServiceAccount, which every pod in the namespace uses and which would receive the operator's RBAC)" }}
{{- end }}
{{- end }}

{{/*
Operator image reference: repository:tag, plus @digest when a digest is set.
*/}}
{{- define "reranker-operator.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- if .Values.image.digest }}
{{- $ref = printf "%s@%s" $ref .Values.image.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{/*
Name of the ConfigMap holding the operator's config file.
*/}}
{{- define "reranker-operator.configMapName" -}}
{{- include "reranker-operator.suffixedName" (list . "config") }}
{{- end }}

{{/*
"<fullname>-<suffix>" within 63 characters (a DNS-1123 and DNS-1035 label, as a Service name must
be): the full name is shortened before the suffix is appended, so the suffix is never cut off.
Call with (list . "suffix").
*/}}
{{- define "reranker-operator.suffixedName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $prefix := include "reranker-operator.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix $suffix }}
{{- end }}

{{/*
Labels of the operator pod: the chart's labels, then podLabels. podLabels may not set the selector
labels (a duplicate key, or a pod template the Deployment's selector no longer matches); other
keys the chart sets are replaced by the user's.
*/}}
{{- define "reranker-operator.podLabels" -}}
{{- $labels := include "reranker-operator.labels" . | fromYaml }}
{{- $selector := include "reranker-operator.selectorLabels" . | fromYaml }}
{{- range $key, $value := .Values.podLabels }}
{{- if hasKey $selector $key }}
{{- fail (printf "podLabels may not set %s: the chart sets it, and the Deployment's selector (immutable) uses it; remove it from podLabels (nameOverride changes app.kubernetes.io/name)" $key) }}
{{- end }}
{{- $_ := set $labels $key $value }}
{{- end }}
{{- toYaml $labels }}
{{- end }}

{{/*
The operator's config file (operator/reranker_operator/config.py), rendered from the values.
Empty strings become null where the operator reads null as "none" / "cluster default".
*/}}
{{- define "reranker-operator.config" -}}
runtimeImage: {{ .Values.runtimeImage | quote }}
runtimeImageCPU: {{ .Values.runtimeImageCPU | quote }}
imagePullPolicy: {{ .Values.runtimeImagePullPolicy | quote }}
imagePullSecrets:
{{- range .Values.runtimeImagePullSecrets }}
  - {{ .name | quote }}
{{- else }} []
{{- end }}
accelerators:
{{- range $type, $p := .Values.accelerators }}
{{- if $p }}
  {{ $type }}:
    resourceName: {{ if $p.resourceName }}{{ $p.resourceName | quote }}{{ else }}null{{ end }}
    nodeSelectorTerms:
    {{- if $p.nodeSelectorTerms }}
      {{- toYaml $p.nodeSelectorTerms | nindent 6 }}
    {{- else }} []
    {{- end }}
    nodeSelector:
    {{- if $p.nodeSelector }}
      {{- toYaml $p.nodeSelector | nindent 6 }}
    {{- else }} {}
    {{- end }}
    tolerations:
    {{- if $p.tolerations }}
      {{- toYaml $p.tolerations | nindent 6 }}
    {{- else }} []
    {{- end }}
    {{- with $p.runtimeClassName }}
    runtimeClassName: {{ . | quote }}
    {{- end }}
{{- end }}
{{- end }}
engineCache:
  mode: {{ .Values.engineCache.mode }}
  size: {{ .Values.engineCache.size | quote }}
  storageClassName: {{ if .Values.engineCache.storageClassName }}{{ .Values.engineCache.storageClassName | quote }}{{ else }}null{{ end }}
  accessMode: {{ .Values.engineCache.accessMode }}
  retention: {{ .Values.engineCache.retention }}
  keepEngines: {{ .Values.engineCache.keepEngines | int }}
buildJob:
  backoffLimit: {{ .Values.buildJob.backoffLimit | int }}
  activeDeadlineSeconds: {{ .Values.buildJob.activeDeadlineSeconds | int }}
  ttlSecondsAfterFinished: {{ .Values.buildJob.ttlSecondsAfterFinished | int }}
podSecurityContext:
  {{- toYaml .Values.runtimePodSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .Values.runtimeTerminationGracePeriodSeconds | int }}
unschedulableTimeoutSeconds: {{ .Values.unschedulableTimeoutSeconds | int }}
monitoring:
  kind: {{ if .Values.monitoring.kind }}{{ .Values.monitoring.kind }}{{ else }}null{{ end }}
  interval: {{ .Values.monitoring.interval | quote }}
  labels:
  {{- if .Values.monitoring.labels }}
    {{- toYaml .Values.monitoring.labels | nindent 4 }}
  {{- else }} {}
  {{- end }}
autoscaling:
  concurrencyMetric: {{ .Values.concurrencyMetric | quote }}
proxy:
  {{- with .Values.proxy }}
  httpProxy: {{ if .httpProxy }}{{ .httpProxy | quote }}{{ else }}null{{ end }}
  httpsProxy: {{ if .httpsProxy }}{{ .httpsProxy | quote }}{{ else }}null{{ end }}
  noProxy: {{ if .noProxy }}{{ .noProxy | quote }}{{ else }}null{{ end }}
  caConfigMap: {{ if .caConfigMap }}{{ .caConfigMap | quote }}{{ else }}null{{ end }}
  caConfigMapKey: {{ .caConfigMapKey | quote }}
  {{- end }}
{{- end }}

{{/*
RBAC rules for the namespaced resources the operator reads and writes: exactly the verbs its code
uses (operator/reranker_operator/reconcile.py through kube.py, and kopf). kopf and kube.py never
PUT, so there is no "update" except for rerankers/finalizers. Children are deleted by the garbage
collector through owner references, so only PDBs and HPAs (removed when no longer wanted) have
"delete". Keep in sync with the operator (tests/chart/test_chart.py checks the kinds).
*/}}
{{- define "reranker-operator.namespacedRules" -}}
# Rerankers: kopf lists and watches them and patches its annotations.
- apiGroups: ["reranker.dev"]
  resources: ["rerankers"]
  verbs: ["get", "list", "watch", "patch"]
# Reranker status (the status subresource): phase, conditions, endpoint.
- apiGroups: ["reranker.dev"]
  resources: ["rerankers/status"]
  verbs: ["patch"]
# Children carry owner references with blockOwnerDeletion, which needs this where the
# OwnerReferencesPermissionEnforcement admission plugin is on (e.g. OpenShift).
- apiGroups: ["reranker.dev"]
  resources: ["rerankers/finalizers"]
  verbs: ["update"]
# Engine-build Jobs and runtime Deployments: watched by kopf (label-selected), created, and
# Deployments patched when the spec (or the engine) changes. Build Jobs are deleted when they
# cannot help any more (superseded, failed under an older spec, their engine pruned).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Services: created, patched, and watched (a LoadBalancer's address arrives on its status).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Ingresses (spec.ingress): created, patched, deleted when the field is removed, and watched
# (one deleted by hand is put back).
- apiGroups: ["networking.k8s.io"]
  resources: ["ingresses"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Gateway API HTTPRoutes (spec.httpRoute): the same. Where the Gateway API is not installed, the
# operator's reads of them answer 404, which it takes as "none".
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "create", "patch", "delete"]
# Engine-cache PVCs (Shared mode): created, annotated, and watched (an unbound claim).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
# PDBs and HPAs: created, patched, and deleted when no longer wanted (1 replica, no autoscaling);
# both are watched (one deleted by hand is put back; the HPA's ScalingActive goes into status).
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Build and runtime pods (read-only): what the scheduler and kubelet report (Unschedulable,
# ImagePullBackOff, OOMKilled, a build's termination message).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
{{- if eq .Values.monitoring.kind "ServiceMonitor" }}
# One ServiceMonitor per Reranker (monitoring.kind ServiceMonitor).
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "create", "patch"]
{{- else if eq .Values.monitoring.kind "PodMonitoring" }}
# One PodMonitoring per Reranker (monitoring.kind PodMonitoring, GKE managed Prometheus).
- apiGroups: ["monitoring.googleapis.com"]
  resources: ["podmonitorings"]
  verbs: ["get", "create", "patch"]
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) .Values.watchNamespaces }}
# kopf peering between the operator replicas, in each watched namespace.
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
# Events about Rerankers (kopf and the operator post core/v1 Events); a build Job's are read
# (listed by field selector) while it has no pod: FailedCreate says a quota refused it.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- end }}
