{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "kubeha.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name used as the prefix of every resource name. Kept to 54 characters so
that "-operator" still fits the 63-character limit.
*/}}
{{- define "kubeha.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "kubeha.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "kubeha.labels" -}}
helm.sh/chart: {{ include "kubeha.chart" . }}
{{ include "kubeha.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the chart's pods. Workloads add app.kubernetes.io/component.
*/}}
{{- define "kubeha.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeha.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Image reference of a component: include "kubeha.image" (list $ .Values.agent.image).
[image.registry/]repository, then @digest when a digest is set, else :tag
(default: the chart's appVersion).
*/}}
{{- define "kubeha.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- $repository := $image.repository }}
{{- with $root.Values.image.registry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
Service account names.
*/}}
{{- define "kubeha.operatorServiceAccountName" -}}
{{- default (printf "%s-operator" (include "kubeha.fullname" .)) .Values.serviceAccount.operator }}
{{- end }}

{{- define "kubeha.agentServiceAccountName" -}}
{{- default (printf "%s-agent" (include "kubeha.fullname" .)) .Values.serviceAccount.agent }}
{{- end }}

{{/*
Log format, checked so a typo fails at render time instead of in the pod.
*/}}
{{- define "kubeha.logFormat" -}}
{{- if not (has . (list "text" "json")) }}
{{- fail (printf "logFormat must be text or json, not %q" .) }}
{{- end }}
{{- . }}
{{- end }}

{{/*
Environment shared by both containers: the log filter (RUST_LOG) and the
user's extra variables. include "kubeha.env" .Values.agent
*/}}
{{- define "kubeha.env" -}}
- name: RUST_LOG
  value: {{ .logLevel | quote }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The metrics container port and the probes on it, shared by both containers.
*/}}
{{- define "kubeha.metricsPortAndProbes" -}}
ports:
  - name: metrics
    containerPort: {{ . }}
    protocol: TCP
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  initialDelaySeconds: 5
  periodSeconds: 10
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
  periodSeconds: 5
{{- end }}
