{{/*
Names, labels and the pieces every pod shares: the image, the model volume, Redis and tracing
environment, TANDEM_* settings as variables.
*/}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The worker roles the chart knows, in order. */}}
{{- define "tandem.workerRoles" -}}
prefill decode aggregated
{{- end -}}

{{/* Labels of every object; `component` (router, prefill, decode, ...) when given. */}}
{{- define "tandem.labels" -}}
{{ include "tandem.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end -}}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* The label selector (a string) of this release's worker pods: what discovery watches. */}}
{{- define "tandem.workerSelector" -}}
app.kubernetes.io/name={{ include "tandem.name" . }},app.kubernetes.io/instance={{ .Release.Name }},tandem.ai/role in (prefill,decode,aggregated)
{{- end -}}

{{- define "tandem.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-demo" "" (eq .Values.model.source "image"))) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "tandem.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create -}}
{{- printf "%s-%s" (include "tandem.fullname" .root) .who -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/* Where the model folder is inside a Tandem container. */}}
{{- define "tandem.modelPath" -}}
{{- if eq .Values.model.source "image" -}}
/opt/tandem/models/{{ .Values.model.folder }}
{{- else -}}
/models/{{ .Values.model.folder }}
{{- end -}}
{{- end -}}

{{/* A settings map as TANDEM_<FIELD> variables; whole numbers stay integers (YAML numbers
reach templates as floats, and 1e+09 is not an int to Python). */}}
{{- define "tandem.settingsEnv" -}}
{{- range $key, $value := . }}
- name: TANDEM_{{ upper $key }}
  value: {{ if and (kindIs "float64" $value) (eq $value (floor $value)) }}{{ int64 $value | quote }}{{ else }}{{ $value | toString | quote }}{{ end }}
{{- end }}
{{- end -}}

{{- define "tandem.redisSecretName" -}}
{{- if eq .Values.redis.mode "internal" -}}
{{- .Values.redis.internal.auth.existingSecret | default (printf "%s-redis" (include "tandem.fullname" .)) -}}
{{- else -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "tandem.redisSecretKey" -}}
{{- if eq .Values.redis.mode "internal" -}}
{{- .Values.redis.internal.auth.secretKey -}}
{{- else -}}
{{- .Values.redis.external.secretKey -}}
{{- end -}}
{{- end -}}

{{/* The Redis URL every process gets, with $(REDIS_PASSWORD) for Kubernetes to expand and the
TLS files as query arguments (redis-py passes them to its SSL connection). */}}
{{- define "tandem.redisUrl" -}}
{{- $secret := include "tandem.redisSecretName" . -}}
{{- $url := printf "redis://%s-redis:6379/0" (include "tandem.fullname" .) -}}
{{- if eq .Values.redis.mode "external" -}}
{{- $url = .Values.redis.external.url -}}
{{- end -}}
{{- if $secret -}}
{{- $url = regexReplaceAll "^(rediss?://)" $url "${1}:$(REDIS_PASSWORD)@" -}}
{{- end -}}
{{- $tls := .Values.redis.external.tls -}}
{{- if and (eq .Values.redis.mode "external") $tls.existingSecret -}}
{{- $args := list (printf "ssl_ca_certs=/etc/tandem/redis-tls/%s" $tls.caKey) -}}
{{- if $tls.certKey -}}
{{- $args = append $args (printf "ssl_certfile=/etc/tandem/redis-tls/%s" $tls.certKey) -}}
{{- $args = append $args (printf "ssl_keyfile=/etc/tandem/redis-tls/%s" $tls.keyKey) -}}
{{- end -}}
{{- $url = printf "%s?%s" $url (join "&" $args) -}}
{{- end -}}
{{- $url -}}
{{- end -}}

{{/* The Secret of every pod's certificate, key and CA (tls.enabled). */}}
{{- define "tandem.tlsSecretName" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "tandem.fullname" .)) -}}
{{- end -}}

{{/* A process's TLS choice: the mounted files, or plaintext chosen explicitly. */}}
{{- define "tandem.tlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: TANDEM_TLS_CERT
  value: /etc/tandem/tls/tls.crt
- name: TANDEM_TLS_KEY
  value: /etc/tandem/tls/tls.key
- name: TANDEM_TLS_CA
  value: /etc/tandem/tls/ca.crt
{{- else }}
- name: TANDEM_INSECURE_PLAINTEXT
  value: "1"
{{- end }}
{{- end -}}

{{/* Environment every Tandem process shares: settings, Redis, TLS, tracing, caches. */}}
{{- define "tandem.commonEnv" -}}
{{- $secret := include "tandem.redisSecretName" . }}
{{- if $secret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "tandem.redisSecretKey" . }}
{{- end }}
- name: TANDEM_REDIS_URL
  value: {{ include "tandem.redisUrl" . | quote }}
- name: TANDEM_NAMESPACE
  value: {{ .Values.redis.keyPrefix | default .Release.Name | quote }}
{{- include "tandem.tlsEnv" . }}
# the root filesystem is read-only: caches (Triton's kernels, XDG) go to the /tmp emptyDir
- name: HOME
  value: /tmp/home
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: TRITON_CACHE_DIR
  value: /tmp/triton
{{- if .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.tracing.otlpEndpoint | quote }}
{{- if .Values.tracing.tls.existingSecret }}
- name: OTEL_EXPORTER_OTLP_CERTIFICATE
  value: /etc/tandem/otlp-tls/{{ .Values.tracing.tls.caKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Volumes every Tandem pod has: /tmp, the model, TLS material. */}}
{{- define "tandem.volumes" -}}
- name: tmp
  emptyDir: {}
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    type: Directory
{{- else if eq $m.source "initContainer" }}
- name: model
  emptyDir:
    sizeLimit: {{ $m.initContainer.sizeLimit }}
{{- end }}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.tls.existingSecret }}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.external.tls.existingSecret }}
{{- end }}
{{- if and .Values.tracing.otlpEndpoint .Values.tracing.tls.existingSecret }}
- name: otlp-tls
  secret:
    secretName: {{ .Values.tracing.tls.existingSecret }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "tandem.tlsSecretName" . }}
{{- end }}
{{- end -}}

{{- define "tandem.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- $m := .Values.model }}
{{- if ne $m.source "image" }}
- name: model
  mountPath: /models
  readOnly: true
{{- if and (eq $m.source "pvc") $m.pvc.subPath }}
  subPath: {{ $m.pvc.subPath }}
{{- end }}
{{- end }}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.tls.existingSecret }}
- name: redis-tls
  mountPath: /etc/tandem/redis-tls
  readOnly: true
{{- end }}
{{- if and .Values.tracing.otlpEndpoint .Values.tracing.tls.existingSecret }}
- name: otlp-tls
  mountPath: /etc/tandem/otlp-tls
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/tandem/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* The init container that fills the model emptyDir, when model.source is initContainer. */}}
{{- define "tandem.initContainers" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "initContainer" }}
- name: model
  image: {{ $m.initContainer.image | default (include "tandem.image" .) }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: {{ toJson $m.initContainer.command }}
  securityContext: {{- toYaml .Values.securityContext | nindent 4 }}
  resources: {{- toYaml $m.initContainer.resources | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: /models
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}

{{/* Refusals no JSON schema can express (they compare values with each other). */}}
{{- define "tandem.validate" -}}
{{- $r := .Values.transfer.portRange -}}
{{- if gt (int $r.start) (int $r.end) -}}
{{- fail (printf "transfer.portRange: start (%d) must not exceed end (%d)" (int $r.start) (int $r.end)) -}}
{{- end -}}
{{- range $name := list "workerGrpc" "metrics" -}}
{{- $port := int (get $.Values.ports $name) -}}
{{- if and (ge $port (int $r.start)) (le $port (int $r.end)) -}}
{{- fail (printf "ports.%s: %d lies inside transfer.portRange (%d-%d), which the workers open to each other" $name $port (int $r.start) (int $r.end)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.planner.enabled (or .Values.prefill.autoscaling.enabled .Values.decode.autoscaling.enabled) -}}
{{- fail "planner.enabled: the planner sets the prefill and decode replica counts; turn off prefill.autoscaling and decode.autoscaling (two controllers would fight)" -}}
{{- end -}}
{{- if and (or .Values.planner.enabled (eq .Values.discovery "kubernetes")) (not .Values.rbac.create) (not .Values.serviceAccount.create) -}}
{{- fail "rbac.create: kubernetes discovery and the planner need their Roles (or bring ServiceAccounts bound to equivalent ones)" -}}
{{- end -}}
{{- range $who := list "router" "prefill" "decode" "aggregated" -}}
{{- $v := get $.Values $who -}}
{{- if and $v.autoscaling.enabled $v.autoscaling.targetCPUUtilizationPercentage (not (dig "requests" "cpu" "" $v.resources)) -}}
{{- fail (printf "%s.autoscaling.targetCPUUtilizationPercentage: needs %s.resources.requests.cpu (utilisation is relative to the request)" $who $who) -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (not $v.autoscaling.targetCPUUtilizationPercentage) (not $v.autoscaling.customMetrics) -}}
{{- fail (printf "%s.autoscaling: give targetCPUUtilizationPercentage or customMetrics" $who) -}}
{{- end -}}
{{- end -}}
{{- if not (or .Values.prefill.enabled .Values.decode.enabled .Values.aggregated.enabled) -}}
{{- fail "prefill, decode, aggregated: enable a prefill and a decode worker, or an aggregated one" -}}
{{- end -}}
{{- if ne .Values.prefill.enabled .Values.decode.enabled -}}
{{- fail "prefill.enabled, decode.enabled: a prefill worker needs a decode worker and the other way round" -}}
{{- end -}}
{{- end -}}
