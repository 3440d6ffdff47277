{{/*
Startup, readiness and liveness probes on grpc.health.v1 (Kubernetes' native gRPC probe; the
server reports "" SERVING once started, NOT_SERVING once stopping). The startup probe covers
model loading; the kubelet stops liveness probes once a pod is terminating, so a draining
worker is not killed for answering NOT_SERVING.
*/}}
{{- define "tandem.probes" -}}
{{- $p := .probes -}}
startupProbe:
  grpc: {port: {{ .portNumber }}}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.startupFailureThreshold }}
readinessProbe:
  grpc: {port: {{ .portNumber }}}
  periodSeconds: 5
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: 2
livenessProbe:
  grpc: {port: {{ .portNumber }}}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: 3
{{- end -}}
