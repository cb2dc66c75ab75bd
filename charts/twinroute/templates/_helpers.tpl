{{- define "twinroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "twinroute.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "twinroute.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "twinroute.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "twinroute.labels" -}}
app.kubernetes.io/name: {{ include "twinroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "twinroute.operatorSelector" -}}
app.kubernetes.io/name: {{ include "twinroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "twinroute.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "twinroute.schedulerRole" -}}
{{- printf "%s-scheduler" (include "twinroute.fullname" .) -}}
{{- end -}}

{{/* The rules the operator needs in a namespace it watches: exactly the API calls it makes
     (twinroute/operator/apply.py and kopf with scanning disabled). */}}
{{- define "twinroute.operatorRules" -}}
# kopf: watch pools, add/remove its finalizer and progress annotations.
- apiGroups: [twinroute.io]
  resources: [modelpools]
  verbs: [list, watch, patch]
# The operator writes each pool's status.
- apiGroups: [twinroute.io]
  resources: [modelpools/status]
  verbs: [patch]
# kopf posts Events about pools.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Children of a pool, its token Secret among them.
- apiGroups: [""]
  resources: [configmaps, services, serviceaccounts, secrets]
  verbs: [list, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, create, patch, delete]
# Pools with several scheduler replicas keep one through voluntary disruptions.
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [list, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [rolebindings]
  verbs: [list, create, patch, delete]
# A pool fronted by an existing GIE gateway (gateway.kind inferencePool) owns an InferencePool;
# the CRD is the Gateway API Inference Extension's (without it, the list finds nothing).
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [list, create, patch, delete]
# Binding each pool's scheduler to the read-only discovery role, without holding its rights.
- apiGroups: [rbac.authorization.k8s.io]
  resources: [clusterroles]
  verbs: [bind]
  resourceNames: [{{ include "twinroute.schedulerRole" . }}]
# Status endpoints, and marking the pods a scale-in removes (pod-deletion-cost) after draining.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, patch]
{{- end -}}

{{/* The operator's key (key `key`): each pool's token is derived from it. */}}
{{- define "twinroute.poolTokenKeySecret" -}}
{{- printf "%s-pool-token-key" (include "twinroute.fullname" .) -}}
{{- end -}}

{{/* The schedulers' kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt). */}}
{{- define "twinroute.tlsSecret" -}}
{{- default (printf "%s-scheduler-tls" (include "twinroute.fullname" .)) .Values.security.tls.existingSecret -}}
{{- end -}}

{{/* Where generated Secrets go: the release namespace and every watched one. */}}
{{- define "twinroute.secretNamespaces" -}}
{{- if not .Values.watchNamespaces -}}
{{- fail "security: a generated Secret needs watchNamespaces (it is created in each of them); when every namespace is watched, create the Secret in each pool namespace and name it in existingSecret" -}}
{{- end -}}
{{- prepend .Values.watchNamespaces .Release.Namespace | uniq | join "," -}}
{{- end -}}
