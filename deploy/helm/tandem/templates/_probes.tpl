{{/*
Startup, readiness and liveness probes on grpc.health.v1 (the server reports "" SERVING once
started, NOT_SERVING once stopping). Plaintext: Kubernetes' native gRPC probe. TLS: the
kubelet's gRPC probe speaks plaintext only, so an exec probe, `python -m cluster.health_probe`,
asks over TLS with the pod's own certificate. The startup probe covers model loading; the
kubelet stops liveness probes once a pod is terminating, so a draining worker is not killed
for answering NOT_SERVING.
*/}}
{{- define "tandem.probeCheck" -}}
{{- if .tls.enabled -}}
exec: {command: ["python", "-m", "cluster.health_probe", "--port", "{{ .portNumber }}", "--server-name", {{ .tls.workerServerName | quote }}]}
{{- else -}}
grpc: {port: {{ .portNumber }}}
{{- end -}}
{{- end -}}

{{- define "tandem.probes" -}}
{{- $p := .probes -}}
startupProbe:
  {{ include "tandem.probeCheck" . }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.startupFailureThreshold }}
readinessProbe:
  {{ include "tandem.probeCheck" . }}
  periodSeconds: 5
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: 2
livenessProbe:
  {{ include "tandem.probeCheck" . }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: 3
{{- end -}}
