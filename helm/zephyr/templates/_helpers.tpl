{{- define "zephyr.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "zephyr.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "zephyr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "zephyr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "zephyr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zephyr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "zephyr.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "zephyr.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "zephyr.fullname" .) -}}
{{- end -}}

{{- define "zephyr.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "zephyr.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* The container environment: settings from the ConfigMap, secrets from the Secret. */}}
{{- define "zephyr.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "zephyr.fullname" . }}
env:
  - name: ZEPHYR_API_KEYS
    valueFrom:
      secretKeyRef: {name: {{ include "zephyr.secretName" . }}, key: ZEPHYR_API_KEYS}
  - name: ZEPHYR_DB_URL
    valueFrom:
      secretKeyRef: {name: {{ include "zephyr.secretName" . }}, key: ZEPHYR_DB_URL, optional: true}
  - name: ZEPHYR_SESSION_SECRET
    valueFrom:
      secretKeyRef: {name: {{ include "zephyr.secretName" . }}, key: ZEPHYR_SESSION_SECRET}
  # uvicorn takes the client's address (per-address limits) and scheme (the cookie's Secure flag) from
  # X-Forwarded-* headers sent by these peers only: the ingress controller.
  - name: FORWARDED_ALLOW_IPS
    value: {{ .Values.forwardedAllowIps | quote }}
{{- end -}}
