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

{{/* By digest when one is given: a tag rebuilt under the same name (0.1.0-cpu across many commits) changes no pod
template, so `helm upgrade` rolled nothing out and IfNotPresent nodes kept the old build. */}}
{{- define "zephyr.image" -}}
{{- if .Values.image.digest -}}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" (toString .Values.image.digest)) -}}
{{- fail (printf "image.digest must be sha256:<64 hex digits>, as `docker buildx imagetools inspect` prints it") -}}
{{- end -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) -}}
{{- printf "%s:%s" .Values.image.repository (toString $tag) -}}
{{- end -}}
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

{{/* The settings: the ConfigMap, and the operator's own sources. */}}
{{- define "zephyr.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "zephyr.fullname" . }}
  {{- with .Values.extraEnvFrom }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The container environment: settings from the ConfigMap, secrets from the Secret. */}}
{{- define "zephyr.env" -}}
{{ include "zephyr.envFrom" . }}
env:
  {{- include "zephyr.credentials" . | nindent 2 }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The environment of the init container: the settings, without the chart's credentials (preparing the model
needs none of the keys, the database URL or the session secret). */}}
{{- define "zephyr.prepareEnv" -}}
{{ include "zephyr.envFrom" . }}
{{- with .Values.extraEnv }}
env:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "zephyr.credentials" -}}
# Optional: keys may come from config.ZEPHYR_API_KEYS_FILE alone (the server refuses to start with none at all).
- name: ZEPHYR_API_KEYS
  valueFrom:
    secretKeyRef: {name: {{ include "zephyr.secretName" . }}, key: ZEPHYR_API_KEYS, optional: true}
- name: ZEPHYR_DB_URL
  valueFrom:
    secretKeyRef: {name: {{ include "zephyr.secretName" . }}, key: ZEPHYR_DB_URL, optional: true}
- name: ZEPHYR_SESSION_SECRET
  valueFrom:
    secretKeyRef: {name: {{ include "zephyr.secretName" . }}, key: ZEPHYR_SESSION_SECRET}
# The key of a remote review candidate's server (ZEPHYR_REVIEW_CANDIDATE=remote): a credential, so never in the
# ConfigMap.
- name: ZEPHYR_REVIEW_CANDIDATE_API_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "zephyr.secretName" . }}, key: ZEPHYR_REVIEW_CANDIDATE_API_KEY, optional: true}
# uvicorn takes the client's address (per-address limits) and scheme (the cookie's Secure flag) from
# X-Forwarded-* headers sent by these peers only: the ingress controller.
- name: FORWARDED_ALLOW_IPS
  value: {{ .Values.forwardedAllowIps | quote }}
{{- end -}}

{{/* API keys as one ZEPHYR_API_KEYS value: a list (`--set 'secrets.apiKeys={student:K1,reviewer:K2}'`), or a
comma-separated string (whose commas `--set` needs escaped: `student:K1\,reviewer:K2`). */}}
{{- define "zephyr.apiKeys" -}}
{{- if kindIs "slice" .Values.secrets.apiKeys -}}
{{- join "," .Values.secrets.apiKeys -}}
{{- else -}}
{{- .Values.secrets.apiKeys | default "" -}}
{{- end -}}
{{- end -}}

{{/* The most replicas the release may run at once, and the fewest it keeps. */}}
{{- define "zephyr.maxReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.maxReplicas }}{{ else }}{{ .Values.replicaCount }}{{ end -}}
{{- end -}}
{{- define "zephyr.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.minReplicas }}{{ else }}{{ .Values.replicaCount }}{{ end -}}
{{- end -}}

{{/* Whether the registry volume can be mounted by one node only (a pod on another node waits for it). */}}
{{- define "zephyr.singleNodeVolume" -}}
{{- if and .Values.persistence.enabled (not (has "ReadWriteMany" .Values.persistence.accessModes)) }}true{{ end -}}
{{- end -}}

{{/* Whether the server's Secret names a database for the log: secrets.dbUrl, or an existingSecret the operator says
holds ZEPHYR_DB_URL (the chart cannot read it when rendered without a cluster). Not said: SQLite, the safe guess. */}}
{{- define "zephyr.databaseNamed" -}}
{{- if or .Values.secrets.dbUrl (and .Values.secrets.existingSecret .Values.secrets.existingSecretHoldsDbUrl) }}true{{ end -}}
{{- end -}}

{{/* Whether the generation log is a SQLite file on the registry volume. Two pods must never write it at once. */}}
{{- define "zephyr.sqliteOnVolume" -}}
{{- if and .Values.persistence.enabled (not (include "zephyr.databaseNamed" .)) }}true{{ end -}}
{{- end -}}

{{/* The grace period the pod's shutdown needs: the preStop sleep, the drain, uvicorn's last 5 s, the log's last
flush (at most 10 s) and the engine's shutdown (10 s); a value set lower than the parts before the engine fails. */}}
{{- define "zephyr.terminationGracePeriod" -}}
{{- $drain := int (.Values.config.ZEPHYR_DRAIN_SECONDS | default 30) -}}
{{- $needed := add (int .Values.preStopSleepSeconds) $drain 5 10 -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) (int $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds %d is shorter than the shutdown it must cover: preStopSleepSeconds + config.ZEPHYR_DRAIN_SECONDS + 15 = %d (leave it empty to derive it)" (int .Values.terminationGracePeriodSeconds) (int $needed)) -}}
{{- end -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add $needed 10 -}}
{{- end -}}
{{- end -}}

{{/* What the pods must restart for when it changes: the Secret's contents, digested under the session secret
(never a plain digest of the keys, which a weak key could be guessed back from); an existingSecret is the operator's to roll. */}}
{{- define "zephyr.secretChecksum" -}}
{{- if .Values.secrets.existingSecret -}}
existing-secret
{{- else -}}
{{- printf "%s\n%s\n%s\n%s" (include "zephyr.sessionSecret" .) (include "zephyr.apiKeys" .) (.Values.secrets.dbUrl | default "") (.Values.secrets.reviewCandidateApiKey | default "") | sha256sum -}}
{{- end -}}
{{- end -}}

{{/* The secret that keys API-key digests and signs review cookies: given, kept from the last release, or new;
made once per render (kept in the values while rendering), so the Secret and the checksum read the same one. */}}
{{- define "zephyr.sessionSecret" -}}
{{- if .Values.secrets.sessionSecret -}}
{{- .Values.secrets.sessionSecret -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "zephyr.fullname" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data "ZEPHYR_SESSION_SECRET") -}}
{{- index $existing.data "ZEPHYR_SESSION_SECRET" | b64dec -}}
{{- else -}}
{{- if not (hasKey .Values.secrets "madeThisRender") -}}
{{- $_ := set .Values.secrets "madeThisRender" (randAlphaNum 48) -}}
{{- end -}}
{{- .Values.secrets.madeThisRender -}}
{{- end -}}
{{- end -}}
{{- end -}}
