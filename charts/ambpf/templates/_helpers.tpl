{{/* Resource name prefix: the release name, unless it already says ambpf. */}}
{{- define "ambpf.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ambpf.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: include with (list . "agent"). */}}
{{- define "ambpf.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ $.Chart.Name }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "ambpf.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ambpf.agentName" -}}{{ include "ambpf.fullname" . }}-agent{{- end -}}
{{- define "ambpf.proxyName" -}}{{ include "ambpf.fullname" . }}-proxy{{- end -}}

{{- define "ambpf.caSecret" -}}
{{- default (printf "%s-ca" (include "ambpf.fullname" .)) .Values.ca.existingSecret -}}
{{- end -}}

{{/* Validated mTLS mode. */}}
{{- define "ambpf.mtlsMode" -}}
{{- if not (has .Values.mtlsMode (list "STRICT" "PERMISSIVE")) -}}
{{- fail (printf "mtlsMode must be STRICT or PERMISSIVE, not %q" .Values.mtlsMode) -}}
{{- end -}}
{{- .Values.mtlsMode -}}
{{- end -}}

{{/* Flags of ambpf-cni-install shared by its install, watch and uninstall runs. */}}
{{- define "ambpf.cniInstallArgs" -}}
- --cni-bin-dir=/host/cni/bin
- --cni-conf-dir=/host/cni/net.d
- --agent-socket={{ .Values.hostPaths.agentRun }}/agent.sock
- --dns-capture={{ .Values.dnsCapture }}
- --poll-interval={{ .Values.cni.pollInterval }}
- --log-level={{ .Values.logLevel }}
{{- end -}}

{{- define "ambpf.caName" -}}{{ include "ambpf.fullname" . }}-ca{{- end -}}

{{/*
The CA's namespace: ca.namespace (an existing namespace of its own, so the
agents' and proxies' namespace holds no CA key), or the release's.
*/}}
{{- define "ambpf.caNamespace" -}}{{ default .Release.Namespace .Values.ca.namespace }}{{- end -}}

{{/* The CA service's address as the proxies dial it. */}}
{{- define "ambpf.caAddress" -}}
{{- if .Values.ca.clusterIP -}}
{{- printf "%s:%d" .Values.ca.clusterIP (int .Values.ca.port) -}}
{{- else -}}
{{- printf "%s:%d" (include "ambpf.caServerName" .) (int .Values.ca.port) -}}
{{- end -}}
{{- end -}}

{{/* The name the CA's serving certificate is checked for: its Service's DNS name. */}}
{{- define "ambpf.caServerName" -}}
{{- printf "%s.%s.svc" (include "ambpf.caName" .) (include "ambpf.caNamespace" .) -}}
{{- end -}}
